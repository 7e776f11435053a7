"""Guided sampling in plain torch: the specification, the CPU path and the test oracle.

For each row (``V`` columns, inputs ``x_0 = logits`` and guides ``x_i`` with weights ``w_i``):

1. ``z = x_0[:V] + w_1 * x_1[:V] + ... + w_G * x_G[:V]`` in float32 (float64 for float64
   logits), added in that order.
2. Temperature ``T``: ``T == 0`` is greedy: the first index of ``max z``. Otherwise ``x = z * (1 / T)``
   (the reciprocal rounded once, then the product: two correctly rounded operations).
3. Filters, each a threshold on ``x`` (a token is kept iff ``x >= tau``; ties are kept together):

   * top-k (``0 < k < V``): ``tau_k`` = the k-th largest ``x``;
   * top-p (``p < 1``): over the tokens kept by top-k, each with the integer mass
     ``mass_int(x - max x)`` (``exp`` in units of ``2**-40``, :mod:`.portable`), ``tau_p`` = the
     largest value ``s`` with ``mass(x >= s) >= nucleus_target(p, mass(all kept))``, i.e. a token is
     kept iff the tokens strictly more likely than it hold less than ``p`` (within a relative
     ``2**-20``; ``p`` rounded to float32). Integer sums make this the same on every backend;
   * min-p (``m > 0``): ``tau_m = max x + plog(max(m, FLT_MIN))`` (``m`` rounded to float32);
   * ``tau = max(tau_k, tau_p, tau_m)``.

   This is Hugging Face's ``TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper ->
   MinPLogitsWarper`` chain, except that tokens tied at a threshold are always kept together.
4. Draw (sampled rows). A row with a filter active (top-k, top-p or min-p): Gumbel-max over the
   kept tokens, the token whose *exact* sum ``x[v] + g(seed, offset, v)`` is largest (first index
   on ties), with ``g`` from :mod:`ivg_kernels.reference.philox`; the sum is compared as the pair
   (rounded sum, its rounding error), so tokens tied in ``x`` stay tied at any temperature.
   A row without filters: the inverse CDF of integer masses, in two levels over fixed granules of
   ``GRANULE`` tokens (``[g * GRANULE, (g + 1) * GRANULE)``), so that a kernel needs no noise per
   token and every sum is exact in any order:

   * ``a_g`` = the granule's max ``x``; ``m_v = mass_int(x[v] - a_g)``; ``S_g`` = their sum;
   * the granule's weight ``W_g = floor(S_g * mass_int(a_g - max x) * 2**-40)`` (float64 product);
   * with ``(u1, u2) = draw_uniforms(seed, offset)``: the granule ``g`` is the first whose running
     sum of ``W`` exceeds ``floor(u1 * sum W)``, and the token the first of ``g`` whose running sum
     of ``m`` exceeds ``floor(u2 * S_g)``.

   Each token is drawn with probability ``W_g / sum W * m_v / S_g``, which is ``softmax(x)[v]`` up
   to float32 rounding of the masses (a token whose mass rounds to 0 is below ``exp(-27)`` of the
   max); tied tokens have equal masses, so ties stay uniform at any temperature.
   Greedy rows take the first index of ``max z``.
5. ``logprob = (x[y] - max x) - logsumexp(x[kept] - max x)`` (0 for greedy rows).

Every operation the token depends on is correctly rounded (``+ - * /``) or built from such
operations (:mod:`.portable`), so the kernels draw the same token for the same key.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .._args import prepare_sample_args, row_tensor
from .._types import SampleOutput
from .philox import HOST_CALLS, gumbel_noise, philox_call, philox_calls_on_host, philox_on_host
from .portable import FLT_MIN, mass_int, mass_int_numpy, nucleus_target, plog
from .dtypes import as_dtype
from .slices import rows_per_slice


GRANULE = 256  # tokens per granule of the unfiltered draw: part of the definition, whatever a kernel's tiles
DRAW_COUNTER = (1 << 31) + 1  # Philox c0 of a row's draw: above every token's (id >> 2) and the speculative column


def draw_uniforms(seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two uniforms of a row's inverse-CDF draw, float64 ``[N]`` in ``[0, 1)`` with 53 random bits each:
    one Philox call at counter ``(DRAW_COUNTER, offset lo, offset hi, 0)``, words ``(w0, w1)`` and
    ``(w2, w3)`` as ``(w0 * 2**21 + (w1 >> 11)) * 2**-53``."""
    host = philox_calls_on_host(seed, offset, DRAW_COUNTER)
    if host is not None:  # the same values in Python, in one tensor
        u = torch.tensor(_uniform_pairs(host[0]), dtype=torch.float64).view(*host[1], 2)
        return u[..., 0], u[..., 1]
    w0, w1, w2, w3 = philox_call(seed, offset, DRAW_COUNTER)
    return ((w0 << 21) | (w1 >> 11)).double() * 2.0 ** -53, ((w2 << 21) | (w3 >> 11)).double() * 2.0 ** -53


def _uniform_pairs(words: list) -> list:
    """:func:`draw_uniforms`' two uniforms of each call's four words (Python integers): 53-bit integers times
    2**-53, exact as Python floats."""
    return [[((w0 << 21) | (w1 >> 11)) * 2.0 ** -53, ((w2 << 21) | (w3 >> 11)) * 2.0 ** -53]
            for w0, w1, w2, w3 in words]


def _index_draw(cum: torch.Tensor, total: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose running sum ``cum`` (int64 [N, M]) exceeds ``floor(u * total)``."""
    r = torch.minimum(torch.floor(u * total.double()).long(), total - 1)
    return (cum <= r.unsqueeze(1)).sum(dim=1).clamp(max=cum.shape[1] - 1)


def granule_weights(x: torch.Tensor, x_max: torch.Tensor):
    """The two levels of masses of step 4: ``(m, S, W)``, the tokens' ``mass_int(x - a_g)`` int64 [N, G, GR],
    their sums per granule ``S`` [N, G] and the granules' weights ``W = floor(S * mass_int(a_g - max x) *
    2^-40)`` [N, G] (``sum W`` is also the total a top-p row without top-k measures its nucleus against)."""
    n, v = x.shape
    ng = -(-v // GRANULE)
    xg = torch.nn.functional.pad(x, (0, ng * GRANULE - v), value=-math.inf).view(n, ng, GRANULE)
    a = xg.amax(dim=2)  # [N, G]
    # One mass_int call for the tokens' masses (a granule of -inf gives NaN: mass 0) and the granules'.
    d = torch.cat([(xg - a.unsqueeze(2)).view(n, ng * GRANULE), a - x_max.unsqueeze(1)], dim=1).float()
    m, e = mass_int(d).split([ng * GRANULE, ng], dim=1)
    m = m.view(n, ng, GRANULE)  # int64 [N, G, GR]
    s = m.sum(dim=2)  # [N, G]
    return m, s, torch.floor(s.double() * e.double() * 2.0 ** -40).long()


def granule_draw(x: torch.Tensor, x_max: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor):
    """Step 4 for rows without filters: ``(tokens [N], total mass sum W [N])`` (see the module docstring)."""
    if x.device.type == "cpu" and x.numel() <= CPU_NUMPY_DRAW:
        return _granule_draw_numpy(x, x_max, seed, offset)
    n = x.shape[0]
    m, s, w = granule_weights(x, x_max)
    cw = w.cumsum(dim=1)
    u1, u2 = draw_uniforms(seed, offset)
    g = _index_draw(cw, cw[:, -1], u1)  # [N]
    mg = m.gather(1, g.view(n, 1, 1).expand(n, 1, GRANULE)).squeeze(1)  # [N, GR]
    j = _index_draw(mg.cumsum(dim=1), s.gather(1, g.unsqueeze(1)).squeeze(1), u2)
    return g * GRANULE + j, cw[:, -1]


# The CPU makes the unfiltered draw of at most this many scores in numpy (the same operations: integer sums,
# correctly rounded products, ``mass_int_numpy``), where torch's cost per operation dominates. One thread, numpy
# against torch: 1 x 596 91 against 247 us, 64 x 596 545 against 682, 1 x 32000 263 against 510; 2 x 32000 468
# against 450, 256 x 596 5.5 against 5.0 ms (torch there).
CPU_NUMPY_DRAW = 1 << 16


def _granule_draw_numpy(x, x_max, seed, offset):
    """:func:`granule_draw` on CPU tensors, its every operation in numpy: the same tokens and totals."""
    n, v = x.shape
    ng = -(-v // GRANULE)
    x, x_max = x.detach().numpy(), x_max.detach().numpy()  # (the draw is not differentiable: inputs may be)
    xg = np.full((n, ng * GRANULE), -np.inf, dtype=x.dtype)
    xg[:, :v] = x
    xg = xg.reshape(n, ng, GRANULE)
    with np.errstate(invalid="ignore"):  # (a granule of -inf gives NaN: mass 0, as in torch)
        a = xg.max(axis=2)  # [N, G]
        d = np.concatenate([(xg - a[:, :, None]).reshape(n, ng * GRANULE), a - x_max[:, None]], axis=1)
    masses = mass_int_numpy(d)
    m, e = masses[:, :ng * GRANULE].reshape(n, ng, GRANULE), masses[:, ng * GRANULE:]
    s = m.sum(axis=2)
    cw = np.floor(s.astype(np.float64) * e.astype(np.float64) * 2.0 ** -40).astype(np.int64).cumsum(axis=1)
    u1, u2 = _draw_uniforms_numpy(seed, offset)
    rows = np.arange(n)
    g = _index_draw_numpy(cw, cw[:, -1], u1)
    j = _index_draw_numpy(m[rows, g].cumsum(axis=1), s[rows, g], u2)
    return torch.from_numpy(g * GRANULE + j), torch.from_numpy(cw[:, -1])


def _index_draw_numpy(cum, total, u):
    """:func:`_index_draw` in numpy."""
    r = np.minimum(np.floor(u * total.astype(np.float64)).astype(np.int64), total - 1)
    return np.minimum((cum <= r[:, None]).sum(axis=1), cum.shape[1] - 1)


def _draw_uniforms_numpy(seed: torch.Tensor, offset: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """:func:`draw_uniforms` of CPU ``seed``, ``offset`` ``[N]`` as numpy arrays (a few rows: from the Philox
    words in Python, with no tensor made)."""
    if len(seed) > HOST_CALLS:
        return tuple(u.numpy() for u in draw_uniforms(seed, offset))
    words = philox_on_host(seed.tolist(), offset.tolist(), [DRAW_COUNTER] * len(seed))
    u = np.array(_uniform_pairs(words), dtype=np.float64).reshape(len(words), 2)
    return u[:, 0], u[:, 1]


def _kth_largest(x_sorted: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    idx = (k.clamp(min=1, max=x_sorted.shape[1]) - 1).unsqueeze(1)
    return x_sorted.gather(1, idx).squeeze(1)


def guided_sample_ref(
    logits, guides=(), *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed, offset, vocab_size=None
) -> SampleOutput:
    """Plain-torch :func:`ivg_kernels.guided_sample`; same arguments, same result."""
    a = prepare_sample_args(logits, guides, temperature, top_k, top_p, min_p, seed, offset, vocab_size)
    return _guided_sample_ref(a)


def _warp(a):
    """Steps 1-3 for every row: ``(x, x_max, kept, greedy, filtered, ok, inputs)``: the scaled scores ``x``
    [N, V] (``z`` for greedy rows), their row max, the tokens the filters keep, the greedy rows, the sampled
    rows with a filter active, the rows without NaN/inf or bad parameters, and the inputs cut to V. Where no
    filter can be active ``kept`` is None (every token of an ok row), and where moreover one temperature > 0
    holds for all rows (:func:`_all_unfiltered_draws`) so are ``greedy`` and ``filtered``."""
    n, v, dev = a.num_rows, a.vocab_size, a.logits.device
    cdt = torch.float64 if a.logits.dtype == torch.float64 else torch.float32
    inputs = [as_dtype(x[:, :v], cdt) for x in [a.logits, *a.guides]]  # (1+G) x [N, V]
    z = inputs[0]
    for x_i, w in zip(inputs[1:], a.weights):
        # a scalar weight multiplies as its value rounded to cdt, exactly as a [N, 1] tensor of it would
        z = z + (row_tensor(w, n, cdt, dev).unsqueeze(1) if isinstance(w, torch.Tensor) else w) * x_i  # [N, V]

    # x = z * (1 / T): the reciprocal correctly rounded once per row, then one rounding per token (a
    # kernel multiplies where a division per token would cost about ten instructions).
    if isinstance(a.temperature, torch.Tensor):
        t = a.temperature.to(cdt)
        greedy = t == 0
        x = z * (1.0 / torch.where(greedy, torch.ones_like(t), t)).unsqueeze(1)  # [N, V]
    else:  # one temperature: its reciprocal in cdt on the host, the same rounding as the row tensor's
        # (no greedy or filtered masks where every row draws without filters: nothing reads them)
        greedy = None if _all_unfiltered_draws(a) else torch.full((n,), a.temperature == 0, dtype=torch.bool,
                                                                   device=dev)
        x = z * (1.0 if a.temperature == 0 else _reciprocal(a.temperature, cdt))
    x_max = x.amax(dim=1)  # [N]
    # A row is bad if an input's max or x's is NaN (max propagates it) or +inf (it holds +inf), or x is all
    # -inf. With x = z * (1 / T) for T > 0 (or x = z), x's max is finite only if z holds no NaN and no +inf,
    # and the base's NaN or +inf (any weight) or a guide's NaN (or +inf at weight 0) reaches z as NaN or +inf:
    # so a finite x_max leaves only a guide's +inf that a non-zero weight made -inf in z to test: the guides'.
    # (A tensor temperature's greedy rows have x = z; its negative or NaN ones are flagged by the check below.)
    ok = x_max.abs() < math.inf  # (torch.isfinite takes four operations on the CPU)
    if inputs[1:]:
        ok &= (torch.stack([x_i.amax(dim=1) for x_i in inputs[1:]]) < math.inf).all(dim=0)
    if any(isinstance(v, torch.Tensor) for v in (a.temperature, a.top_p, a.min_p)):  # scalars are checked already
        t, p, m = (row_tensor(x, n, cdt, dev) for x in (a.temperature, a.top_p, a.min_p))
        ok &= ~(torch.isnan(t) | (t < 0) | torch.isnan(p) | (p <= 0) | (p > 1) | torch.isnan(m) | (m < 0) | (m > 1))

    filtered = None if greedy is None else torch.zeros_like(greedy)
    if a.any_filter_possible:
        k = row_tensor(a.top_k, n, torch.int64, dev)
        p = row_tensor(a.top_p, n, cdt, dev)
        m = row_tensor(a.min_p, n, cdt, dev)
        neg_inf = torch.full_like(x_max, -math.inf)
        k_on = (k > 0) & (k < v)
        filtered = ~greedy & (k_on | (p < 1) | (m > 0))
        tau_k, tau_p = _rank_thresholds(x, x_max, k, k_on, p, neg_inf)
        tau = torch.maximum(tau_k, tau_p)
        if isinstance(a.min_p, torch.Tensor) or a.min_p > 0:  # (min-p 0: tau_m = -inf)
            tau = torch.maximum(tau, torch.where(m > 0, x_max + plog(m.float().clamp(min=FLT_MIN)).to(cdt), neg_inf))
        kept = x >= torch.where(greedy, neg_inf, tau).unsqueeze(1)  # [N, V]
    else:
        kept = None  # every token of an ok row (a NaN one flags its row)
    return x, x_max, kept, greedy, filtered, ok, inputs


# On the CPU, the thresholds of step 3 that rank tokens (top-k, top-p) first read only each row's largest scores
# (``topk``: the k largest for top-k alone, ``max(CPU_TOP_CANDIDATES, 2 * k)`` with top-p), and sort whole only
# the rows whose thresholds those do not decide (a nucleus wider than them, or ties at the k-th score spilling
# past them): the same thresholds either way. One CPU thread, top-k 50 and two guides: the sort took half of a
# call of 16 rows of 151,936 tokens (3 rows: 36 ms, their topk 0.7 ms).
CPU_TOP_CANDIDATES = 256


def _rank_thresholds(x, x_max, k, k_on, p, neg_inf):
    """``(tau_k, tau_p)`` of step 3 for every row (-inf where that filter is off)."""
    v = x.shape[1]
    if x.device.type == "cpu":  # (elsewhere the whole rows are sorted: no host read)
        p_on = p < 1
        if not bool((k_on | p_on).any()):  # min-p alone ranks nothing
            return neg_inf, neg_inf
        k_most = int(torch.where(k_on, k, 0).max())
        if not bool(p_on.any()):  # top-k alone: each row's k-th score, among its k largest (k < V)
            return torch.where(k_on, _kth_largest(x.topk(k_most, dim=1).values, k), neg_inf), neg_inf
        width = max(CPU_TOP_CANDIDATES, 2 * k_most)  # a nucleus: its top-k set and the mass down to its target
        if width < v:
            # the granules' totals once, for the top columns and for the rows sorted after them
            wide = granule_weights(x, x_max)[2].sum(dim=1) if bool((p_on & ~k_on).any()) else None
            top = x.topk(width, dim=1).values  # [N, width], descending: the sorted rows' first columns
            tau_k, tau_p, reach_all, covered = _thresholds(top, x, x_max, k, k_on, p, neg_inf, wide)
            # Decided by the top columns where a nucleus is reached within them, and, with top-k too, every
            # token of the top-k set (ties at the k-th score included) lies among them (the nucleus's total);
            # the other rows are sorted whole.
            rows = (p_on & ~(reach_all & (covered | ~k_on))).nonzero().squeeze(1)
            if len(rows):
                tau_k[rows], tau_p[rows] = _thresholds(_sorted_descending(x[rows], torch.get_num_threads()), x[rows],
                                                       x_max[rows], k[rows], k_on[rows], p[rows], neg_inf[rows],
                                                       None if wide is None else wide[rows])[:2]
            return tau_k, tau_p
    return _thresholds(x.sort(dim=1, descending=True).values, x, x_max, k, k_on, p, neg_inf)[:2]


def _sorted_descending(x: torch.Tensor, threads: int) -> torch.Tensor:
    """``x.sort(dim=1, descending=True).values`` of CPU rows, by numpy where that is faster: its vectorised sort took
    a third of torch's time per row (one thread, 151,936 float32 scores: 4.4 against 12.8 ms), but it sorts the rows
    one after another where torch sorts ``threads`` at once, so numpy takes them where its rows cost less than
    torch's rounds (always on one or two threads). The same values in the same order, but that tied zeros may come
    in another order of signs, which no threshold tells apart (``-0.0 == 0.0``, and both have the same mass); a
    row with NaN, sorted elsewhere by either, is flagged and never read."""
    if len(x) >= 3 * -(-len(x) // threads):  # torch's rounds of ``threads`` rows each: numpy's rows cost a third
        return x.sort(dim=1, descending=True).values
    return torch.from_numpy(np.sort(x.detach().numpy(), axis=1)[:, ::-1].copy())  # (a copy: positive strides)


def _thresholds(x_sorted, x, x_max, k, k_on, p, neg_inf, wide=None):
    """``(tau_k, tau_p, reached, covered)`` from the first columns ``x_sorted`` of the rows sorted in descending
    order (all of them, or a prefix: ``reached``, whether each row's nucleus target is reached within them, and
    ``covered``, whether its top-k set ends within them, say where the thresholds are decided). ``wide``: the
    rows' granule totals (below) if the caller has them."""
    tau_k = torch.where(k_on, _kth_largest(x_sorted, k), neg_inf)
    kept_k = x_sorted >= tau_k.unsqueeze(1)
    mass = torch.where(kept_k, mass_int((x_sorted - x_max.unsqueeze(1)).float()), 0)  # int64 [N, V]
    cum = mass.cumsum(dim=1)
    # The nucleus's total: the top-k set's mass, or without top-k the granules' total of step 4 (which a
    # kernel has from its one read of the row; it differs from the sum of the masses by their float32
    # rounding). Should the tokens' masses not reach the target, every token is kept.
    total = cum[:, -1]
    if wide is None and (x.device.type != "cpu" or bool(((p < 1) & ~k_on).any())):  # (no host read on a device)
        wide = granule_weights(x, x_max)[2].sum(dim=1)
    if wide is not None:
        total = torch.where(k_on, total, wide)
    target = nucleus_target(p, total)
    reach = cum >= target.unsqueeze(1)
    first = reach.to(torch.int8).argmax(dim=1)  # first index reaching the target
    tau_p = torch.where((p < 1) & reach[:, -1], x_sorted.gather(1, first.unsqueeze(1)).squeeze(1), neg_inf)
    return tau_k, tau_p, reach[:, -1], x_sorted[:, -1] < tau_k


def _reciprocal(t: float, cdt: torch.dtype) -> float:
    """``1 / t`` correctly rounded in ``cdt`` (float32 or float64), as torch divides a tensor of ``t``."""
    if cdt == torch.float64:
        return 1.0 / t
    return float(np.float32(1.0) / np.float32(t))


def warped_probs(a) -> torch.Tensor:
    """The distribution step 4 draws from, float64 ``[N, V]``: ``softmax(x)`` over the kept tokens, or
    for a greedy row all its mass on the first index of ``max z``; NaN rows where ``ok`` is False."""
    p, ok = warped_probs_ok(a)
    return torch.where(ok.unsqueeze(1), p, math.nan)


def warped_probs_ok(a) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, ok)``: :func:`warped_probs` without its NaN rows (a row that is not ``ok`` holds anything) and
    the rows' ``ok`` flags, for callers that mask the bad rows themselves."""
    x, x_max, kept, greedy, _, ok, _ = _warp(a)
    w = (x - x_max.unsqueeze(1)).double().exp_()
    if a.any_filter_possible:  # else every token of an ok row is kept (only NaN is not: its row is flagged)
        w = torch.where(kept, w, 0.0)
    p = w / w.sum(dim=1, keepdim=True)
    if isinstance(a.temperature, torch.Tensor) or a.temperature == 0:  # (one temperature > 0: no greedy row)
        first = torch.nn.functional.one_hot(x.argmax(dim=1), x.shape[1]).double()  # argmax: the first maximum
        p = torch.where(greedy.unsqueeze(1), first, p)
    return p, ok


def _gumbel_max(x, kept, x_max, seed, offset):
    """Step 4 for rows with a filter: the kept token with the largest exact ``x + g``. On the CPU, where the
    filters keep few tokens, only those tokens' noise is made (``_kept_columns``): the same token."""
    cols = _kept_columns(kept) if x.device.type == "cpu" else None
    if cols is None:
        return _gumbel_argmax(x, kept, seed, offset, torch.arange(x.shape[1], device=x.device))
    ids, valid = cols
    if ids.shape[1] == 0:  # no row keeps a token (rows that are not ok: their tokens are dropped)
        return torch.zeros(x.shape[0], dtype=torch.int64)
    return ids.gather(1, _gumbel_argmax(x.gather(1, ids), valid, seed, offset, ids).unsqueeze(1)).squeeze(1)


# The CPU draws a filtered row's noise only for its kept tokens where every row keeps at most this fraction of
# the vocabulary (then the Philox words, a call per token instead of per four, cost less than the whole row's).
CPU_SPARSE_KEPT = 1 / 8


def _kept_columns(kept):
    """``(ids, valid)``: each row's kept token ids in increasing order, padded to the most any row keeps (int64
    ``[N, M]``, padding 0, ``valid`` False there); None where a row keeps more than ``CPU_SPARSE_KEPT`` of its
    tokens."""
    n, v = kept.shape
    counts = kept.sum(dim=1)
    most = int(counts.max()) if n else 0
    if most > v * CPU_SPARSE_KEPT:
        return None
    rows, cols = kept.nonzero(as_tuple=True)  # row by row, increasing ids
    at = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]  # each one's place in its row
    ids = torch.zeros(n, most, dtype=torch.int64)
    valid = torch.zeros(n, most, dtype=torch.bool)
    ids[rows, at] = cols
    valid[rows, at] = True
    return ids, valid


def _gumbel_argmax(x, kept, seed, offset, token_ids):
    """The first column of the largest exact ``x + g`` among ``kept`` (``x``, ``kept`` ``[N, M]``; ``g`` the noise
    of ``token_ids``, ``[M]`` or ``[N, M]``, the columns' token ids)."""
    g = gumbel_noise(seed, offset, token_ids).to(x.dtype)  # [N, M]
    s = x + g  # the exact sum as (rounded sum, its error): TwoSum
    bb = s - x
    err = (x - (s - bb)) + (g - bb)
    s = torch.where(kept, s, -math.inf)
    err = torch.where(torch.isfinite(s), err, 0.0)
    on_top = s == s.max(dim=1, keepdim=True).values
    err = torch.where(on_top, err, -math.inf)
    return (on_top & (err == err.max(dim=1, keepdim=True).values)).to(torch.int8).argmax(dim=1)  # the first


def _all_unfiltered_draws(a) -> bool:
    """Every row draws without filters, known without reading a tensor: one temperature > 0, no filter possible."""
    return not isinstance(a.temperature, torch.Tensor) and a.temperature > 0 and not a.any_filter_possible


def _granule_tokens(x, kept, x_max, seed, offset):
    return granule_draw(x, x_max, seed, offset)[0]


def _row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``x.logsumexp(dim=1)`` for rows with a finite max (the others are flagged and overwritten): the same
    operations without torch's handling of infinite maxima, in about two thirds of its time on the CPU."""
    m = x.amax(dim=1, keepdim=True)
    return (x - m).exp_().sum(dim=1).log_().add_(m.squeeze(1))


# The CPU reference draws its rows in slices whose float32 (float64 for float64 logits) ``[rows, V]`` temporaries
# take at most this many bytes each per intra-op thread, so that the dozen passes of the draw over them stay in the
# cores' L2 caches (on two threads 64 rows of 50,257: 36 ms with 4 MiB a call, 40 with 2, 89 in one call).
# With two guides, one CPU thread, medians of 20 interleaved: 16 rows of 151,936 tokens 36.7 against 72.9 ms in
# one call, 64 of 50,257 46.8 against 103.5 ms, 64 of 32,000 29.3 against 60.0 ms (256 rows of 596: one call).
# The tokens do not depend on the slices (the draw sums integer masses); on one intra-op thread no other bit does
# either, while with several torch may split a row's float reductions between threads by the call's size (the
# log-sum-exps and log-probs may then differ in the last place, as between batches of other sizes). The speculative
# verification slices its rows by the same budget (``speculative.speculative_verify_ref``).
# Calls without filters take half of it: with glibc's default allocator, whose temporaries of 2 MiB come back
# from the system page by page each time, one thread, two bf16 guides, medians of 5 interleaved on 2026-12-03:
# 64 rows of 32,000 65.7 against 30.1 ms, 32 of 50,257 61.3 against 31.4, 16 of 32,000 23.4 against 14.4, and
# 16 of 151,936 or 256 of 596 alike; with filters half the budget was slower (16 rows of 151,936, top-k 50: 44.8
# against 57.4 ms: the per-slice work of the thresholds and the noise, once per row).
CPU_SAMPLE_BYTES = 1 << 21


def _guided_sample_ref(a) -> SampleOutput:
    """:func:`guided_sample_ref` of checked arguments: on the CPU in slices of rows (``CPU_SAMPLE_BYTES``, half of
    it without filters)."""
    n = a.num_rows
    itemsize = 8 if a.logits.dtype == torch.float64 else 4
    budget = CPU_SAMPLE_BYTES if a.any_filter_possible else CPU_SAMPLE_BYTES // 2
    step = rows_per_slice(a.logits.device, n, a.vocab_size * itemsize, budget)
    if step >= n:
        return _sample_rows(a)
    parts = [_sample_rows(row_slice(a, i, min(n, i + step))) for i in range(0, n, step)]
    return SampleOutput(*(torch.cat(field) for field in zip(*parts)))


def row_slice(a, i: int, j: int):
    """The arguments ``a`` of rows ``i:j`` (per-row tensors cut, scalars kept)."""
    cut = lambda v: v[i:j] if isinstance(v, torch.Tensor) else v  # noqa: E731
    return dataclasses.replace(a, logits=a.logits[i:j], guides=[g[i:j] for g in a.guides],
                               weights=[cut(w) for w in a.weights], temperature=cut(a.temperature),
                               top_k=cut(a.top_k), top_p=cut(a.top_p), min_p=cut(a.min_p), seed=cut(a.seed),
                               offset=cut(a.offset))


def _sample_rows(a) -> SampleOutput:
    x, x_max, kept, greedy, filtered, ok, inputs = _warp(a)
    n, dev = a.num_rows, a.logits.device
    seed, offset = row_tensor(a.seed, n, torch.int64, dev), row_tensor(a.offset, n, torch.int64, dev)
    cdt = x.dtype
    if greedy is None:  # every row draws without filters (_all_unfiltered_draws; its tokens where it is ok)
        tokens = granule_draw(x, x_max, seed, offset)[0]
    else:
        tokens = x.argmax(dim=1)  # greedy rows: the first max
        sampled = ~greedy
        draws = [(sampled & ~filtered, _granule_tokens)] + ([(filtered, _gumbel_max)] if a.any_filter_possible else [])
        for rows_mask, draw in draws:
            # On the CPU only the rows that need a draw compute it; elsewhere every row does (no host read).
            rows = rows_mask.nonzero().squeeze(1) if dev.type == "cpu" else None
            if rows is None or rows.numel() == n:
                tokens = torch.where(rows_mask, draw(x, kept, x_max, seed, offset), tokens)
            elif rows.numel():
                tokens[rows] = draw(x[rows], None if kept is None else kept[rows], x_max[rows], seed[rows],
                                    offset[rows])
    x_tok = x.gather(1, tokens.unsqueeze(1)).squeeze(1)
    # Relative to max x, so that a huge x (tiny temperature) loses no precision: -log(3) for three ties. The
    # max token is always kept, so this is logsumexp with its max (0) known: the same operations, one pass fewer.
    # (Without filters every token of an ok row is kept; a row that is not ok gets NaN below.)
    shifted = x - x_max.unsqueeze(1)
    lse_kept = (shifted if kept is None else torch.where(kept, shifted, -math.inf)).exp_().sum(dim=1).log_()
    logprob = (x_tok - x_max) - lse_kept
    if greedy is not None:
        logprob = torch.where(greedy, torch.zeros_like(x_tok), logprob)

    lse = torch.stack([_row_logsumexp(x_i) for x_i in inputs], dim=1)  # [N, 1+G]
    input_logits = torch.stack([x_i.gather(1, tokens.unsqueeze(1)).squeeze(1) for x_i in inputs], dim=1)
    input_logprobs = input_logits - lse

    nan = torch.tensor(math.nan, dtype=cdt, device=dev)
    tokens = torch.where(ok, tokens, -1)
    logprob = torch.where(ok, logprob, nan)
    okc = ok.unsqueeze(1)
    return SampleOutput(
        tokens, logprob, torch.where(okc, lse, nan), torch.where(okc, input_logprobs, nan),
        torch.where(okc, input_logits, nan), ok,
    )
