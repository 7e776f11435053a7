"""The speculative verification step in Triton: per row, the warped target ``p`` and draft ``q`` at
each drafted position, the acceptance test and the residual (or final) draw, in one program; and the
draft's own draw (``_draft_kernel``: one program per row, the same passes over the draft's row).

One program per row. For each position ``k <= num_draft`` a pass over the vocabulary computes the max
and the float64 sum of ``exp(x - max)`` of the target scores ``x = (x_0 + sum_i w_i x_i) * (1 / T)``
(``div_rn``, no FMA contraction, as the sampler) and of the draft's scores, and flags NaN/+inf inputs;
the acceptance test ``u * q(d) < p(d)`` runs in float64 on those sums while no draft has been
rejected. The final position is decided as the reference decides it: after every draft was kept, a
draw from ``q`` there and its test; unless that draw is kept, a draw from the residual
``max(p - q, 0)`` (from ``p`` where that has no mass, as the reference's ``residual``). Each draw is two
passes (the total mass, then the scan for the first token whose cumulative mass exceeds ``u`` times it).
Greedy rows (temperature 0) compare first argmaxes instead.
Uniforms: the Philox words of ivg_kernels/reference/speculative.py.

Filters (top-k, top-p, min-p) are not built here: ``ivg_kernels.speculative`` sends rows that use them
(or more than four guides) to the reference. Memory traffic: each used position's input rows are read
once; the final position's up to four times more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KeyedKernels, Plans, direct, next_power_of_2, tensor_key
from .sampling_kernels import ROW_STAGES, _philox_words

SPEC_C0 = tl.constexpr(1 << 31)  # reference/speculative.py: SPEC_COLUMN >> 2


@triton.jit
def _spec_uniform(seed, offset, LANE: tl.constexpr):
    """The uniform of word LANE of the speculative counter for key (seed, offset), as float64."""
    w0, w1, w2, w3 = _philox_words(seed, offset, tl.full([1], SPEC_C0, tl.uint32))
    w = w0 if LANE == 0 else (w1 if LANE == 1 else (w2 if LANE == 2 else w3))
    u = ((w >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
    return tl.sum(u.to(tl.float64), 0)


@triton.jit
def _scores(inputs, strides, w_vals, row, cols, mask, t, GREEDY: tl.constexpr, NIN: tl.constexpr):
    """Scores ``(x_0 + sum_i w_i x_i) * (1 / t)`` of the NIN inputs at ``cols`` of flat row ``row`` (correctly
    rounded; greedy rows keep ``z``; -inf off the mask); also whether any input there is NaN or +inf."""
    v = tl.load(inputs[0] + row * strides[0] + cols, mask=mask, other=0.0).to(tl.float32)
    bad = (v != v) | (v == float("inf"))
    z = v
    for i in tl.static_range(1, NIN):
        v = tl.load(inputs[i] + row * strides[i] + cols, mask=mask, other=0.0).to(tl.float32)
        bad = bad | (v != v) | (v == float("inf"))
        z = z + w_vals[i - 1] * v
    if not GREEDY:
        z = z * tl.div_rn(1.0, t)  # x = z * (1 / T), as the sampler
    return tl.where(mask, z, float("-inf")), tl.max((bad & mask).to(tl.int32), 0)


@triton.jit
def _row_stats(inputs, strides, w_vals, row, t, V, GREEDY: tl.constexpr,
               NIN: tl.constexpr, BLOCK: tl.constexpr):
    """(max, float64 sum of exp(x - max), first argmax, bad) of one position's scores over the vocabulary; bad: an
    input NaN or +inf there, or no finite score (every score -inf), which flags the row wherever it reads it."""
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float64)
    best = tl.zeros([1], tl.int64)
    bad = tl.zeros([1], tl.int32)
    for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        x, b = _scores(inputs, strides, w_vals, row, cols, mask, t, GREEDY, NIN)
        bad = tl.maximum(bad, b)
        bm = tl.max(x, 0)
        bi = tl.argmax(x, 0, tie_break_left=True).to(tl.int64) + v0
        best = tl.where(bm > m, bi, best)  # strictly greater: the first maximum wins
        m_new = tl.maximum(m, bm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp((m - m_safe).to(tl.float64)) + tl.sum(tl.exp((x - m_safe).to(tl.float64)), 0)
        m = m_new
    mx = tl.max(m, 0)
    return mx, tl.sum(total, 0), tl.max(best, 0), tl.maximum(tl.max(bad, 0), (mx == float("-inf")).to(tl.int32))


@triton.jit
def _prob_at(inputs, strides, w_vals, row, t, tok, m, total, GREEDY: tl.constexpr,
             NIN: tl.constexpr):
    """The warped probability of token ``tok`` (float64), given the position's max and sum."""
    cols = tl.zeros([1], tl.int64) + tok
    x, _ = _scores(inputs, strides, w_vals, row, cols, cols >= 0, t, GREEDY, NIN)
    return tl.sum(tl.exp((x - m).to(tl.float64)), 0) / total


@triton.jit(do_not_specialize=["t"])
def _verify_kernel(inputs, strides, w_vals, draft, d_strides, d_w,
                   drafts, d_stride, num_draft, seed, offset, o_stride, t, V, S, SQ,
                   out_n, out_tok, out_ok,
                   NIN: tl.constexpr, GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    """One row (module docstring). Target rows are ``r * S + k``, draft rows ``r * SQ + k``."""
    r = tl.program_id(0).to(tl.int64)
    nd = tl.load(num_draft + r).to(tl.int32)
    sd = tl.load(seed + r)
    n = tl.full([], 0, tl.int32)  # drafts accepted so far
    alive = tl.full([], 1, tl.int32)  # no rejection yet
    bad = tl.full([], 0, tl.int32)
    for k in range(0, nd):  # every drafted position is read (its NaN flag counts, as in the reference)
        off = tl.load(offset + r * o_stride + k)
        prow = r * S + k
        qrow = r * SQ + k
        mp, lp, bp, badp = _row_stats(inputs, strides, w_vals, prow, t, V,
                                      GREEDY, NIN, BLOCK)
        mq, lq, bq, badq = _row_stats(draft, d_strides, d_w, qrow, t, V,
                                      GREEDY, 1, BLOCK)
        bad = tl.maximum(bad, tl.maximum(badp, badq))
        d = tl.load(drafts + r * d_stride + k).to(tl.int64)
        if GREEDY:
            acc = d == bp
        else:
            pd = _prob_at(inputs, strides, w_vals, prow, t, d, mp, lp, GREEDY, NIN)
            qd = _prob_at(draft, d_strides, d_w, qrow, t, d, mq, lq, GREEDY, 1)
            acc = _spec_uniform(sd, off, 1) * qd < pd
        alive = alive * acc.to(tl.int32)
        n += alive
    # The last position n: the first rejection, or the one after every draft, decided as if drafted
    # there too (a draw from q, the test, else the residual), like the reference.
    off = tl.load(offset + r * o_stride + n)
    prow = r * S + n
    qrow = r * SQ + n
    mp, lp, bp, badp = _row_stats(inputs, strides, w_vals, prow, t, V, GREEDY, NIN, BLOCK)
    mq, lq, bq, badq = _row_stats(draft, d_strides, d_w, qrow, t, V, GREEDY, 1, BLOCK)
    bad = tl.maximum(bad, tl.maximum(badp, badq))
    if n < nd:  # position nd is read too (it is a used position of the row)
        _, _, _, b2 = _row_stats(inputs, strides, w_vals, r * S + nd, t, V, GREEDY, NIN, BLOCK)
        _, _, _, b3 = _row_stats(draft, d_strides, d_w, r * SQ + nd, t, V, GREEDY, 1, BLOCK)
        bad = tl.maximum(bad, tl.maximum(b2, b3))
    if GREEDY:
        tok = bp
    else:
        extra = _draw(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, t, V, mp, lp, mq, lq,
                      _spec_uniform(sd, off, 0), False, NIN, BLOCK)
        pd = _prob_at(inputs, strides, w_vals, prow, t, extra, mp, lp, GREEDY, NIN)
        qd = _prob_at(draft, d_strides, d_w, qrow, t, extra, mq, lq, GREEDY, 1)
        if (n == nd) & (_spec_uniform(sd, off, 1) * qd < pd):
            tok = extra
        else:
            tok = _draw(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, t, V, mp, lp, mq, lq,
                        _spec_uniform(sd, off, 2), True, NIN, BLOCK)
    ok = bad == 0
    tl.store(out_n + r, tl.where(ok, n.to(tl.int64), -1))
    tl.store(out_tok + r, tl.where(ok, tok, -1))
    tl.store(out_ok + r, ok)


@triton.jit
def _mass(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, cols, mask, t, mp, lp, mq, lq, qs,
          RESIDUAL: tl.constexpr, NIN: tl.constexpr):
    """A tile's mass (float64) in the draft's ``q``, or (RESIDUAL) in ``max(p - qs * q, 0)`` (``qs`` 1, or 0
    for ``p`` itself)."""
    xq, _ = _scores(draft, d_strides, d_w, qrow, cols, mask, t, False, 1)
    q = tl.exp((xq - mq).to(tl.float64)) / lq
    if RESIDUAL:
        x, _ = _scores(inputs, strides, w_vals, prow, cols, mask, t, False, NIN)
        q = tl.maximum(tl.exp((x - mp).to(tl.float64)) / lp - qs * q, 0.0)
    return tl.where(mask, q, 0.0)


@triton.jit
def _total(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, t, V, mp, lp, mq, lq, qs,
           RESIDUAL: tl.constexpr, NIN: tl.constexpr, BLOCK: tl.constexpr):
    """The row's whole mass (float64) in ``q`` or ``max(p - qs * q, 0)``: one pass over the vocabulary."""
    total = tl.full([], 0.0, tl.float64)
    for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
        cols = v0 + tl.arange(0, BLOCK)
        total += tl.sum(_mass(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, cols, cols < V, t,
                              mp, lp, mq, lq, qs, RESIDUAL, NIN), 0)
    return total


@triton.jit
def _draw(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, t, V, mp, lp, mq, lq, u,
          RESIDUAL: tl.constexpr, NIN: tl.constexpr, BLOCK: tl.constexpr):
    """Inverse-CDF draw with uniform ``u`` from ``q`` or the residual: two passes (total, then scan). A
    residual without mass (see the reference's ``residual``) is replaced by ``p``: one more pass, then."""
    qs = tl.full([], 1.0, tl.float64)
    total = _total(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, t, V, mp, lp, mq, lq, qs,
                   RESIDUAL, NIN, BLOCK)
    if RESIDUAL:
        if not (total > 0):
            qs = tl.full([], 0.0, tl.float64)
            total = _total(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, t, V, mp, lp, mq, lq, qs,
                           RESIDUAL, NIN, BLOCK)
    target = u * total
    cum = tl.full([], 0.0, tl.float64)
    tok = tl.full([], -1, tl.int64)
    for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        m = _mass(inputs, strides, w_vals, prow, draft, d_strides, d_w, qrow, cols, mask, t, mp, lp, mq, lq, qs,
                  RESIDUAL, NIN)
        c = cum + tl.cumsum(m, 0)
        hit = tl.min(tl.where(mask & (c > target), cols, 2147483647), 0).to(tl.int64)
        tok = tl.where((tok < 0) & (hit < 2147483647), hit, tok)
        cum += tl.sum(m, 0)
    return tl.where(tok < 0, V - 1, tok)


@triton.jit(do_not_specialize=["t"])
def _draft_kernel(draft, d_strides, d_w, seed, offset, t, V, out_tok,
                  GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    """One row's draft token: the first argmax (greedy), else the inverse-CDF draw from the draft's ``q``
    with the draft uniform of its key, as ``draft_draw_ref``; -1 for a row with NaN/+inf or no finite score."""
    r = tl.program_id(0).to(tl.int64)
    m, total, best, bad = _row_stats(draft, d_strides, d_w, r, t, V, GREEDY, 1, BLOCK)
    if GREEDY:
        tok = best
    else:
        u = _spec_uniform(tl.load(seed + r), tl.load(offset + r), 0)
        tok = _draw(draft, d_strides, d_w, r, draft, d_strides, d_w, r, t, V, m, total, m, total, u,
                    False, 1, BLOCK)
    tl.store(out_tok + r, tl.where(bad == 0, tok, -1))


class DraftLaunch(KeyedKernels):
    """A draft draw for one kind of call (rows, row stride, dtypes, alignment, temperature, vocabulary), made once
    (:func:`draft_launch`), then called with a call's logits and int64 ``[R]`` keys. Holds no tensor."""

    __slots__ = ("r", "scalars", "tuples")

    def __init__(self, key, r, stride, temperature, vocab_size, block):
        greedy = temperature == 0
        self.r = r
        self.scalars = (float(temperature) if not greedy else 1.0, vocab_size)
        self.tuples = ((stride,), (0.0,))  # the kernel's per-input tuples: the one input's row stride and weight
        super().__init__(key, (_draft_kernel,), (dict(GREEDY=greedy, BLOCK=block, enable_fp_fusion=False),))

    def __call__(self, draft_logits, seed, offset) -> torch.Tensor:
        out = torch.empty(self.r, dtype=torch.int64, device=draft_logits.device)
        if self.r:
            strides, weights = self.tuples
            self.launch(direct, (((self.r,), ((draft_logits,), strides, weights, seed, offset, *self.scalars, out)),))
        return out


_DRAFT_LAUNCHES = Plans()  # launch key -> DraftLaunch


def draft_launch(draft_logits: torch.Tensor, temperature: float, seed: torch.Tensor, offset: torch.Tensor,
                 vocab_size: int, block: int = 1024) -> DraftLaunch:
    """The :class:`DraftLaunch` of an eager call with these arguments."""
    block = min(block, next_power_of_2(vocab_size))
    # What the specialisation depends on (launch.DirectLaunch.key): the integers' classes, the pointers' dtypes
    # and alignment (``out`` is a fresh allocation: aligned), the constexprs; the plan: rows and the scalars.
    stride = draft_logits.stride(0)
    key = (draft_logits.shape[0], stride, float(temperature), vocab_size, block,
           tensor_key(draft_logits, seed, offset))
    return _DRAFT_LAUNCHES.get(key, lambda: DraftLaunch(key, draft_logits.shape[0], stride, temperature, vocab_size,
                                                        block))


def launch_draft_sample(draft_logits: torch.Tensor, temperature: float, seed: torch.Tensor, offset: torch.Tensor,
                        vocab_size: int, block: int = 1024) -> torch.Tensor:
    """Draft tokens ``[R]`` of ``draft_draw_ref`` for rows without filters (scalar temperature; ``seed`` and
    ``offset`` int64 ``[R]``). One program per row, launched directly (:class:`DraftLaunch`)."""
    return draft_launch(draft_logits, temperature, seed, offset, vocab_size, block)(draft_logits, seed, offset)


def launch_speculative_verify(logits: torch.Tensor, guides: list, weights: list, draft_logits: torch.Tensor,
                              draft_tokens: torch.Tensor, num_draft: torch.Tensor, temperature: float,
                              seed: torch.Tensor, offset: torch.Tensor, vocab_size: int, block: int = 1024):
    """``(num_accepted [R], token [R], ok [R])`` of every row; inputs as ``speculative_verify_ref``'s, with
    scalar weights and temperature, no filters. The kernel is launched directly."""
    r, s = logits.shape[:2]
    flat = tuple(x.reshape(r * s, x.shape[-1]) for x in [logits, *guides])
    q = draft_logits.reshape(r * s, draft_logits.shape[-1])
    d = draft_tokens if s > 1 else torch.zeros(r, 1, dtype=torch.int64, device=logits.device)
    out_n = torch.empty(r, dtype=torch.int64, device=logits.device)
    out_tok = torch.empty(r, dtype=torch.int64, device=logits.device)
    out_ok = torch.empty(r, dtype=torch.bool, device=logits.device)
    if r == 0:
        return out_n, out_tok, out_ok
    greedy = temperature == 0
    direct(_verify_kernel)[(r,)](
        flat, tuple(x.stride(0) for x in flat), tuple(float(w) for w in weights) + (0.0,), (q,), (q.stride(0),),
        (0.0,), d, d.stride(0), num_draft, seed, offset, offset.stride(0), float(temperature) if not greedy else 1.0,
        vocab_size, s, s, out_n, out_tok, out_ok,
        NIN=len(flat), GREEDY=greedy, BLOCK=min(block, next_power_of_2(vocab_size)), enable_fp_fusion=False,
    )
    return out_n, out_tok, out_ok
