"""The speculative reference's common CPU case in fewer operations: the same results, bit for bit.

A speculative round on the CPU verifies a few rows of a few positions (one prompt: one row of five), where
each torch operation costs several microseconds whatever its size: :func:`.speculative._verify_rows` spent
most of a call on about 200 of them. Where no filter can be active, one temperature > 0 holds for every row
and the weights are scalars (the fused kernel's case, and the demo's), this module computes ``p`` and ``q``
with the reference's torch operations (the products, sums, ``exp``, ``log`` and ``logsumexp``, whose
roundings depend on how torch vectorises them), both distributions in one call, and does the rest in
numpy: the gathers, the acceptance test, the cumulative sums of the inverse-CDF draws (a sequential sum in
both) and their searches, and the residual's ``max(p - q, 0)`` (correctly rounded in both). Every decision
reads the same float64 values as the reference, so the tokens, log-probs and values are the reference's
(``tests/test_speculative_cpu.py``: random rows with ties, ``-inf`` tails, NaN and +inf), on one intra-op thread;
with several, torch may split a row's sums between threads by a call's size (the reference's own caveat), and
here p and q are one call where the reference makes two. One thread, two
guides, 5 positions of 596 tokens, the public ``speculative_verify``, interleaved medians: one row 0.98
against 0.72 ms (1.53 against 1.19 in a slower hour of the machine), 4 rows 1.89 against 1.49, 16 rows 3.02
against 2.72. The draft draw's common case (:func:`draft_rows_cpu`) takes the same operations on one distribution.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .dtypes import as_dtype


def lean_applies(target, draft) -> bool:
    """Whether :func:`verify_rows_cpu` takes the call: CPU rows, one temperature > 0 and scalar weights, and no
    filter that can be active (``target`` and ``draft``: the prepared arguments of the two distributions)."""
    t = target.temperature
    return (target.logits.device.type == "cpu" and not isinstance(t, torch.Tensor) and t > 0
            and not target.any_filter_possible and not draft.any_filter_possible
            and not any(isinstance(w, torch.Tensor) for w in target.weights))


def _scores(a) -> tuple:
    """``(x, guide maxes)`` of one distribution's prepared arguments ``a``: the reference's scaled scores
    ``x = (base + sum of weight * guide) * (1 / T)`` ``[N, V]`` and the row maxes of the guides with a negative
    weight (a guide's NaN or +inf flags its row, the reference's test; ``x``'s max holds it unless the weight is
    negative, where +inf becomes -inf: only those guides' maxes are read)."""
    from .sampling import _reciprocal

    cdt = torch.float64 if a.logits.dtype == torch.float64 else torch.float32
    # (detached: the draw is not differentiable, and numpy reads no tensor that requires grad)
    inputs = [as_dtype(x[:, :a.vocab_size].detach(), cdt) for x in [a.logits, *a.guides]]
    z = inputs[0]
    for x_i, w in zip(inputs[1:], a.weights):
        z = z + w * x_i  # (a scalar weight, rounded to cdt: the reference's product)
    return z * _reciprocal(a.temperature, cdt), [x_i.amax(dim=1) for x_i, w in zip(inputs[1:], a.weights) if w < 0]


def _softmax(x: torch.Tensor) -> tuple:
    """``(p, x_max)``: the reference's ``softmax`` of the rows of ``x`` (each row's max, ``exp`` in float64, sum and
    quotient), ``p`` as numpy float64 ``[N, V]``, and the row maxes ``[N, 1]``."""
    x_max = x.amax(dim=1, keepdim=True)
    w = (x - x_max).double().exp_()
    return (w / w.sum(dim=1, keepdim=True)).numpy(), x_max


def probs_ok(args: list) -> list:
    """``warped_probs_ok`` of distributions without filters at one temperature > 0 (``args``: their prepared
    arguments) as numpy: per distribution ``(p, ok)``, ``p`` float64 ``[N, V]`` and ``ok`` bool ``[N]``. The
    reference's operations on the scores, in one call for all where their scores share a dtype (each row's
    max, ``exp`` and sum are its own in any batch)."""
    xs, guide_maxes = zip(*(_scores(a) for a in args))
    same = len({(x.dtype, x.shape[1]) for x in xs}) == 1
    groups = [torch.cat(xs)] if same and len(xs) > 1 else xs
    probs, x_maxes = [], []
    for x in groups:
        p, x_max = _softmax(x)
        probs.append(p)
        x_maxes.append(x_max.squeeze(1).double())
    prob = probs[0] if len(probs) == 1 else np.concatenate(probs)  # every distribution's rows, in order
    maxes = torch.cat(x_maxes + [m.double() for ms in guide_maxes for m in ms]).numpy()  # (one read)
    out, row, at = [], 0, len(prob)  # ``at``: where the guides' maxes start
    for x, ms in zip(xs, guide_maxes):
        p = prob[row: row + len(x)]
        ok = np.abs(maxes[row: row + len(x)]) < math.inf  # x's max finite
        for _ in ms:
            ok &= maxes[at: at + len(x)] < math.inf
            at += len(x)
        out.append((p, ok))
        row += len(x)
    return out


def draft_rows_cpu(a, u: torch.Tensor) -> torch.Tensor:
    """``reference.speculative.draft_draw_ref``'s tokens where :func:`lean_applies` to the draft's prepared
    arguments ``a`` (no guides), ``u`` the rows' draft uniforms (float64 ``[N]``): its torch operations on the
    scores without the general path's branches, and the inverse-CDF draw in numpy; -1 for a row whose max is
    not finite (NaN, +inf, or no finite score). One draft token of one row took about 60 instead of 85 us."""
    x, _ = _scores(a)
    q, x_max = _softmax(x)
    ok = np.abs(x_max.numpy()[:, 0]) < math.inf
    return torch.from_numpy(np.where(ok, inverse_cdf_np(q, u.numpy()), -1))


def inverse_cdf_np(dist: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``reference.speculative.inverse_cdf`` of rows ``[R, V]`` in numpy: the same cumulative sums (sequential
    in both), the same product with ``u``, the same search."""
    cdf = np.cumsum(dist, axis=1)
    target = u * cdf[:, -1]
    # searchsorted(side="right") on the non-decreasing rows: how many sums are <= the target
    return np.minimum((cdf <= target[:, None]).sum(axis=1), dist.shape[1] - 1)


def verify_rows_cpu(logits, guides, draft_tokens, num_draft, target, draft, u):
    """``reference.speculative._verify_rows`` where :func:`lean_applies`: the same ``SpeculativeOutput``."""
    from .speculative import ACCEPT, DRAFT, RESIDUAL, SpeculativeOutput, input_values  # (it imports this module)

    r, s = logits.shape[:2]
    v = target.vocab_size
    (p, ok_p), (q, ok_q) = ((x.reshape(r, s, v), ok.reshape(r, s)) for x, ok in probs_ok([target, draft]))
    un = u.numpy()
    nd = num_draft.to(torch.int64).numpy()
    pos = np.arange(s)
    used = pos <= nd[:, None]
    ok = ((ok_p & ok_q) | ~used).all(axis=1)
    d = np.minimum(np.maximum(draft_tokens.to(torch.int64).numpy(), 0), v - 1)
    rows = np.arange(r)
    if s > 1:
        k = np.arange(s - 1)
        p_d, q_d = p[rows[:, None], k, d], q[rows[:, None], k, d]
        accept = (un[:, :-1, ACCEPT] * q_d < p_d) & used[:, 1:]
        n = np.cumprod(accept, axis=1).sum(axis=1)
    else:
        n = np.zeros(r, dtype=np.int64)
    p_n, q_n, u_n = p[rows, n], q[rows, n], un[rows, n]
    extra = inverse_cdf_np(q_n, u_n[:, DRAFT])
    took = (n == nd) & (u_n[:, ACCEPT] * q_n[rows, extra] < p_n[rows, extra])
    res = np.maximum(p_n - q_n, 0.0)
    res = np.where(res.sum(axis=1, keepdims=True) > 0, res, p_n)  # (a sum of non-negatives: > 0 in any order)
    y = np.where(took, extra, inverse_cdf_np(res, u_n[:, RESIDUAL]))
    tokens = np.concatenate([d, np.zeros((r, 1), dtype=np.int64)], axis=1)
    tokens[rows, n] = y
    live = (pos <= n[:, None]) & ok[:, None]
    tokens = np.where(live, tokens, -1)
    picked = p[rows[:, None], pos, np.maximum(tokens, 0)]
    tokens_t, live_t = torch.from_numpy(tokens), torch.from_numpy(live)
    logprob = torch.where(live_t, torch.from_numpy(picked).log(), math.nan)  # (torch's log: the reference's bits)
    return SpeculativeOutput(torch.from_numpy(np.where(ok, n, -1)), tokens_t, logprob,
                             *input_values(logits, guides, v, tokens_t, live_t), torch.from_numpy(ok))

