"""Speculative sampling of the guided, warped distribution in plain torch: the draft draw, the
acceptance test and the residual draw (the specification, CPU path and test oracle).

A draft model proposes ``n`` tokens ``d_0 .. d_{n-1}`` of a row, ``d_k`` drawn from ``q_k``, the
draft's own warped distribution at position ``k``. Every model then scores the positions ``0 .. n``
(position ``k`` follows ``d_0 .. d_{k-1}``) in one forward, which gives ``p_k``: exactly the
distribution ``guided_sample`` draws from (:func:`.sampling.warped_probs` of the base logits and the
weighted guide rows, with the same temperature, top-k, top-p and min-p). Then, for ``k = 0, 1, ...``:

* ``d_k`` is accepted iff ``u_accept(k) * q_k(d_k) < p_k(d_k)``, i.e. with probability
  ``min(1, p_k(d_k) / q_k(d_k))``;
* at the first rejection, position ``k``'s token is drawn from ``max(p_k - q_k, 0)`` (normalised; from
  ``p_k`` itself where that has no mass, see :func:`residual`);
* if all ``n`` are accepted, position ``n`` is decided the same way with a draft drawn there too (the
  draft's logits at ``n`` come with its last forward): kept if it passes the test, else the residual.

Every position is thus decided by the same rule (draft from ``q_k``, test, residual), so a row's tokens
do not depend on how many drafts each round made: for a given seed every ``speculate >= 1`` gives the
same output, and only the speed changes.

Every token so produced is distributed exactly as ``p`` at its position (Leviathan et al., ICML 2023;
Chen et al., 2023), whatever ``q`` is. Greedy rows (temperature 0) have one-hot ``p`` and ``q``: a draft
is kept iff it is the target's argmax, and the replacement is that argmax, so greedy speculative
decoding gives the tokens of greedy decoding.

Randomness: the same stateless Philox stream as the sampler. The uniforms of the token at response
position ``t`` of candidate ``j`` are ``philox_uniform(seed, row_offset(t, j), SPEC_COLUMN + lane)``
with lane 0 for the draft draw, 1 for the acceptance test and 2 for the residual (or final) draw: one
Philox call per position, on a counter no vocabulary reaches. Draws from a distribution use the
inverse CDF with one uniform: the first token whose cumulative mass exceeds ``u`` times the total.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .._args import prepare_sample_args, row_tensor
from .philox import philox_call, philox_calls_on_host, word_uniform
from . import sampling
from .sampling import row_slice, warped_probs_ok
from .dtypes import as_dtype
from .slices import rows_per_slice
from .speculative_cpu import draft_rows_cpu, lean_applies, verify_rows_cpu

SPEC_COLUMN = 1 << 33  # Philox counter c0 = 2**31: far above any token id
DRAFT, ACCEPT, RESIDUAL = 0, 1, 2


@dataclass
class SpeculativeOutput:
    """What :func:`speculative_verify_ref` returns for ``R`` rows and ``S`` positions.

    num_accepted : int64 ``[R]``, drafts kept (the row's new tokens are ``num_accepted + 1``)
    tokens : int64 ``[R, S]``, the kept drafts, then the drawn token, then -1
    logprob : ``[R, S]``, log ``p_k`` of each new token (NaN after the last)
    input_logprobs, input_logits : ``[R, S, 1 + G]``, each input's log-softmax and raw value at each new
        token (what the implicit and explicit values add up; NaN after the last)
    ok : bool ``[R]``, False for rows with NaN/inf inputs or bad parameters (their tokens are -1)
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    logprob: torch.Tensor
    input_logprobs: torch.Tensor
    input_logits: torch.Tensor
    ok: torch.Tensor


def spec_uniforms(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float64 ``[..., 3]``: the draft, acceptance and residual uniforms of keys ``seed`` [R] and
    ``offset`` [R] or [R, S] (one per position): ``philox_uniform(seed, offset, SPEC_COLUMN + lane)``,
    computed as the one Philox call those three tokens share (words 0, 1, 2 of counter
    ``SPEC_COLUMN >> 2``)."""
    rows = seed.reshape(-1, *[1] * (offset.dim() - 1)).expand_as(offset).reshape(-1)  # each position: its row's seed
    flat = offset.reshape(-1).to(torch.int64)
    host = philox_calls_on_host(rows, flat, SPEC_COLUMN >> 2)
    if host is not None:  # word_uniform's exact values (each a 24-bit odd integer times 2**-24), in Python
        return torch.tensor([[((w >> 9) * 2 + 1) * 2.0 ** -24 for w in call[:3]] for call in host[0]],
                            dtype=torch.float64).view(*offset.shape, 3)
    words = philox_call(rows, flat, SPEC_COLUMN >> 2)[:3]
    return word_uniform(torch.stack(words, dim=-1)).double().view(*offset.shape, 3)


def inverse_cdf(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative mass exceeds ``u`` times the total: a draw from ``dist`` [..., V]
    (non-negative, any positive total) with uniforms ``u`` [...] in (0, 1). Never a zero-mass token."""
    cdf = dist.cumsum(dim=-1)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=dist.shape[-1] - 1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(p - q, 0)`` per row of ``[R, V]``, or ``p`` itself where that has no mass.

    A rejected draft leaves mass there whenever the draft was drawn from ``q``: ``p(d) < q(d)`` and both
    sum to one. It has none only where ``q(d) = 0`` too (drafts not drawn from ``q``, e.g. a caller's own
    or greedy drafts that are not ``q``'s argmax) or where rounding makes ``p <= q`` everywhere; the
    replacement is then drawn from ``p``, the distribution every kept token must follow, never from a
    zero-mass row (whose inverse-CDF draw would be the last token)."""
    res = (p - q).clamp(min=0)
    return torch.where((res.sum(dim=-1, keepdim=True) > 0), res, p)


def _expand(value, s):
    """A per-row parameter repeated for each of ``s`` positions (scalars stay scalars)."""
    return value.repeat_interleave(s) if isinstance(value, torch.Tensor) else value


def draft_draw_ref(draft_logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed, offset,
                   vocab_size=None, uniforms=None) -> torch.Tensor:
    """Draft tokens ``[R]`` (-1 for rows with NaN/inf logits) from the draft's warped distribution ``q``
    at one position per row, drawn with the draft uniform of ``(seed, offset)`` (``uniforms``: those
    of :func:`spec_uniforms`, if the caller has them already); greedy rows take the first argmax."""
    a = prepare_sample_args(draft_logits, [], temperature, top_k, top_p, min_p, seed, offset, vocab_size)
    if uniforms is None:
        n, dev = a.num_rows, a.logits.device
        uniforms = spec_uniforms(row_tensor(a.seed, n, torch.int64, dev), row_tensor(a.offset, n, torch.int64, dev))
    if lean_applies(a, a):  # the common CPU case in fewer operations, the same tokens (speculative_cpu)
        return draft_rows_cpu(a, uniforms[:, DRAFT])
    q, ok = warped_probs_ok(a)
    return torch.where(ok, inverse_cdf(q, uniforms[:, DRAFT]), -1)  # (a bad row's q may hold NaN: its draw is dropped)


def speculative_verify_ref(logits, guides, draft_logits, draft_tokens, num_draft, *, temperature=1.0, top_k=0,
                           top_p=1.0, min_p=0.0, seed, offset, vocab_size=None, uniforms=None) -> SpeculativeOutput:
    """Accept or reject each row's drafts and draw its next token.

    Parameters
    ----------
    logits : ``[R, S, V]`` base logits at positions ``0 .. S-1`` (position k after k drafts)
    guides : ``(tensor [R, S, V_i], weight)`` pairs, as ``guided_sample``'s (weights floats or ``[R]``)
    draft_logits : ``[R, S, V_d]``, the draft model's logits at positions ``0 .. S-1``
    draft_tokens : int ``[R, S - 1]``, the drafts (drawn by :func:`draft_draw_ref` from those logits)
    num_draft : int ``[R]``, drafts of each row, ``0 .. S-1`` (positions past ``num_draft`` are unused)
    temperature, top_k, top_p, min_p, vocab_size : as ``guided_sample`` (scalars or ``[R]``)
    seed : int64 ``[R]`` or int; offset : int64 ``[R, S]``, the key of each position's token
    uniforms : float64 ``[R, S, 3]``, :func:`spec_uniforms` of those keys if the caller has them already

    On the CPU the rows go in slices whose float64 ``[rows, S, V]`` probabilities take at most
    ``sampling.CPU_SAMPLE_BYTES``: with two guides and ``S = 5``, 16 rows of 151,936 tokens took 280 against 848
    ms in one call, 64 rows of 32,000 246 against 705 ms, 16 of 50,257 88 against 160 ms (one CPU thread, medians
    of 10 interleaved). On one intra-op thread the result is the same bit for bit; with several, torch may split a
    row's float64 sums between threads by the call's size, so ``p`` may differ in the last place (as between
    batches of other sizes), which decides a test only where ``u * q`` and ``p`` agree to that place.
    """
    r, s = logits.shape[:2]
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    params = [_expand(x, s) for x in (temperature, top_k, top_p, min_p, seed)]  # each row's, for its S positions
    target = prepare_sample_args(flat(logits), [(flat(g), _expand(w, s)) for g, w in guides], *params,
                                 offset.reshape(-1), vocab_size)
    draft = prepare_sample_args(flat(draft_logits), [], *params, offset.reshape(-1), target.vocab_size)
    if uniforms is None:
        uniforms = spec_uniforms(row_tensor(seed, r, torch.int64, logits.device), offset.to(torch.int64))
    step = rows_per_slice(logits.device, r, s * target.vocab_size * 8, sampling.CPU_SAMPLE_BYTES)  # float64 p, q
    if step >= r:
        return _verify_rows(logits, guides, draft_tokens, num_draft, target, draft, uniforms)
    # (the weights are in target's arguments; the values read only the guides' tensors)
    parts = [_verify_rows(logits[i:i + step], [(g[i:i + step], None) for g, _ in guides], draft_tokens[i:i + step],
                          num_draft[i:i + step], row_slice(target, i * s, (i + step) * s),
                          row_slice(draft, i * s, (i + step) * s), uniforms[i:i + step]) for i in range(0, r, step)]
    return SpeculativeOutput(*(torch.cat([getattr(o, f.name) for o in parts]) for f in dataclasses.fields(parts[0])))


def _verify_rows(logits, guides, draft_tokens, num_draft, target, draft, u) -> SpeculativeOutput:
    """:func:`speculative_verify_ref` of rows ``[R', S]`` whose arguments are checked: ``target`` and ``draft`` the
    warped distributions' arguments at their ``R' * S`` positions, ``u`` their uniforms (``guides``: the raw
    tensors, for the values)."""
    if lean_applies(target, draft):
        return verify_rows_cpu(logits, guides, draft_tokens, num_draft, target, draft, u)
    r, s = logits.shape[:2]
    dev = logits.device
    v = target.vocab_size
    # (a position that is not ok holds anything in p or q: the row is flagged, and nothing of it is read)
    p, ok_p = warped_probs_ok(target)
    q, ok_q = warped_probs_ok(draft)
    p, q = p.view(r, s, v), q.view(r, s, v)
    nd = num_draft.to(dev).to(torch.int64)
    pos = torch.arange(s, device=dev)
    used = pos <= nd.unsqueeze(1)  # positions a row reads
    ok = ((ok_p & ok_q).view(r, s) | ~used).all(dim=1)
    d = draft_tokens.to(torch.int64).clamp(0, v - 1)
    if s > 1:
        at = d.unsqueeze(2)
        p_d, q_d = p[:, :-1].gather(2, at).squeeze(2), q[:, :-1].gather(2, at).squeeze(2)
        accept = (u[:, :-1, ACCEPT] * q_d < p_d) & used[:, 1:]  # (drafts 0 .. nd - 1)
        n = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading accepts
    else:
        n = torch.zeros(r, dtype=torch.int64, device=dev)
    # The last position is decided as if it had been drafted too: a draw from q (draft uniform), the
    # acceptance test, else the residual. So a token never depends on how many drafts a round made.
    # (a row that is not ok may draw anything here: its tokens and values are masked below)
    rows = torch.arange(r, device=dev)
    p_n, q_n, u_n = p[rows, n], q[rows, n], u[rows, n]
    extra = inverse_cdf(q_n, u_n[:, DRAFT])
    at = extra.unsqueeze(1)
    took = (n == nd) & (u_n[:, ACCEPT] * q_n.gather(1, at)[:, 0] < p_n.gather(1, at)[:, 0])
    y = torch.where(took, extra, inverse_cdf(residual(p_n, q_n), u_n[:, RESIDUAL]))
    tokens = torch.cat([d, d.new_zeros(r, 1)], dim=1)  # the kept drafts before position n, y at n, -1 after
    tokens[rows, n] = y
    live = (pos <= n.unsqueeze(1)) & ok.unsqueeze(1)  # [R, S]
    tokens = torch.where(live, tokens, -1)
    tok = tokens.clamp(min=0).unsqueeze(2)
    logprob = torch.where(live, p.gather(2, tok).squeeze(2).log(), math.nan)
    return SpeculativeOutput(torch.where(ok, n, -1), tokens, logprob, *input_values(logits, guides, v, tokens, live),
                             ok)


def input_values(logits, guides, v: int, tokens: torch.Tensor, live: torch.Tensor) -> tuple:
    """Each input's log-prob and raw value (float32, float64 for float64 logits) at ``tokens`` ``[R, S]``:
    ``(input_logprobs, input_logits)``, each ``[R, S, 1+G]``, NaN where not ``live``. What the verification's
    values are, on every backend."""
    r, s = tokens.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    inputs = torch.stack([as_dtype(x[..., :v], cdt) for x in [logits, *(g for g, _ in guides)]], dim=2)  # [R,S,1+G,V]
    tok = tokens.clamp(min=0)[:, :, None, None].expand(r, s, inputs.shape[2], 1)
    raw = inputs.gather(3, tok).squeeze(3)  # [R, S, 1+G]
    lse = inputs.logsumexp(dim=3)
    # NaN as a Python scalar: torch.tensor(nan, device=...) would be a copy from pageable host memory, which
    # waits for the device (on a GPU it made every speculative round synchronise once more)
    live = live.unsqueeze(2)
    return torch.where(live, raw - lse, math.nan), torch.where(live, raw, math.nan)
