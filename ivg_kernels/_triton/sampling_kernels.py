"""Fused guided sampling in Triton: combine 1+G logit rows, warp, draw, one pass.

Memory traffic per call: each input row ``[:V]`` is read once by stage 1
(``(1+G) * N * V * elem_size`` bytes); stage 1 writes ``O(N * V / 256)`` words of partials and
stage 2 reads them back, and re-reads one 256-token granule per row without filters. Only a row
whose top-p/top-k/min-p kept set is not proven by the candidate lists reads its inputs again (the
exact fallback: two passes over the row and a pool, or, when the pool is full, more passes).

Stage 1, grid ``N * S`` (``S = ceil(V / BLOCK)`` slices of whole granules per row, so N=1 still
fills the GPU; slice ``s`` holds granules ``s, s + S, s + 2S, ...``, since byte-level BPE vocabularies
number their frequent tokens first and a contiguous slice of the low ids would hold most of a row's
likely tokens beside C candidate places): per granule, each input's max and sum-exp (a fixed partition of
the row, merged by stage 2 in one order: each input's log-sum-exp is the same bits however wide the slices,
which follow the call's row count); the combined score ``x = (x_0 + sum w_i x_i) * (1 / T)``, its max and
first argmax, each granule's max ``a_g`` and integer mass ``sum mass_int(x - a_g)`` (no random numbers),
and (when filters may be active) the
slice's top-C candidates (C extractions of the next largest 32-bit key, stored with their exact keys)
and a bound on every other token's key (the cut). Maxima propagate NaN, so bad rows need no per-element
checks.

Stage 2, grid ``N``: merges the partials. A row without filters draws by the inverse CDF in two
levels (a granule from the granule masses, then a token of that granule, whose masses it recomputes
from the inputs). A row with filters finds the thresholds by bisection on the float's ordered
integer key over the candidates (top-p against the granules' total from stage 1, or with top-k the
top-k set's mass), proves the kept set lies in the candidates (every threshold above every slice's
bound) or falls back: each threshold lies between the candidates' own and the cut (a top-p threshold
without top-k also above a bound from the row's total mass, for rows whose candidates cannot reach the
target: ``_nucleus_floor``), so one pass counts the row's tokens with keys in that range, a second copies
them into a pool the call's rows share, and the thresholds (8 pivots per pass over the pool: the range
narrows 9-fold) and the draw run over the pool and the candidates above the cut; a row whose range does
not fit takes the same narrowing in passes over its full row. Then it draws by Gumbel-max among the kept
tokens and gathers the per-input values at the token. The log-prob of a filtered row's token comes from the
kept set's exact integer mass on every path (proven or either fallback), so it too is the same bits however
the row went.

Every operation a token depends on is the reference's, bit for bit: products and sums rounded
separately (both stages launch with ``enable_fp_fusion=False``), ``div_rn`` for ``1 / T``, the
IEEE-only ``plog`` and ``mass_int`` of reference/portable.py, integer masses, and the Gumbel-max
compared on the exact sum (TwoSum). The maths is ivg_kernels/reference/sampling.py; the random
stream ivg_kernels/reference/philox.py.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..reference import portable as _p
from ..reference.sampling import DRAW_COUNTER, GRANULE
from .launch import DATA_PTR, KeyedKernels, Plans, cdiv, direct, int_class, next_power_of_2, packed, tensor_key

INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)
_SQRT2 = tl.constexpr(_p.SQRT2)
_LN2_HI = tl.constexpr(_p.LN2_HI)
_LN2_LO = tl.constexpr(_p.LN2_LO)
_L1 = tl.constexpr(_p.LOG_L1)
_L2 = tl.constexpr(_p.LOG_L2)
_L3 = tl.constexpr(_p.LOG_L3)
_L4 = tl.constexpr(_p.LOG_L4)
_LOG2E = tl.constexpr(_p.LOG2E)
_E0, _E1, _E2, _E3, _E4, _E5 = (tl.constexpr(c) for c in _p.EXP2_C)
_MASS_BITS = tl.constexpr(_p.MASS_BITS)
_FLT_MIN = tl.constexpr(_p.FLT_MIN)
_DRAW_COUNTER = tl.constexpr(DRAW_COUNTER)
_TWO_M40 = tl.constexpr(2.0 ** -40)
_TAIL_ZERO = tl.constexpr(-30.0)  # x - max x below this has mass_int 0 (exp(-30) * 2**40 < 1)


@triton.jit
def _float_key(x):
    """float32 -> int32 whose signed order is the float order, with -0.0 and +0.0 one key (0), as the
    reference's float comparisons see them: the magnitude bits, negated for a negative sign."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, (b ^ 0x7FFFFFFF) + 1)


@triton.jit
def _key_float(k):
    """The float of a key of ``_float_key`` (+0.0 for key 0)."""
    b = tl.where(k >= 0, k, (k - 1) ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 values (see reference/philox.py)."""
    for _ in tl.static_range(10):
        hi_b = tl.umulhi(c2, 0xCD9E8D57)
        lo_b = c2 * 0xCD9E8D57
        hi_a = tl.umulhi(c0, 0xD2511F53)
        lo_a = c0 * 0xD2511F53
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_words(seed, offset, c0):
    """The four words of the Philox call at counter ``(c0, offset lo, offset hi, 0)`` with key ``seed``
    (reference/philox.py), for a uint32 tensor of ``c0``: the stream of every draw."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    o0 = (offset & 0xFFFFFFFF).to(tl.uint32)
    o1 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    return _philox4x32(c0, zero + o0, zero + o1, zero, zero + k0, zero + k1)


@triton.jit
def _plog(x):
    """log of positive normal float32 from IEEE operations only (reference/portable.py: plog)."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    s = tl.div_rn(f, 2.0 + f)
    z = s * s
    r = z * (_L1 + z * (_L2 + z * (_L3 + z * _L4)))
    ef = e.to(tl.float32)
    return ef * _LN2_HI + (ef * _LN2_LO + (s + s + s * r))


@triton.jit
def _mass_int(d):
    """exp(d) * 2**40 rounded down, int64, for float32 d <= 0 (reference/portable.py: mass_int)."""
    t = d * _LOG2E
    t = tl.where(t >= -64.0, t, -64.0)
    n = tl.floor(t)
    r = t - n
    q = r * _E5
    q = (q + _E4) * r
    q = (q + _E3) * r
    q = (q + _E2) * r
    q = (q + _E1) * r
    q = (q + _E0) * r
    q = q + 1.0
    scale = ((n.to(tl.int32) + (_MASS_BITS + 127)) << 23).to(tl.float32, bitcast=True)  # 2**(n + 40)
    return tl.floor(q * scale).to(tl.int64)


@triton.jit
def _nucleus_target(p, total):
    """ceil(p * total * (1 - 2**-20)) in float64, at least 1 (reference/portable.py: nucleus_target)."""
    want = (p.to(tl.float64) * total.to(tl.float64)) * 0.99999904632568359375
    return tl.maximum(tl.ceil(want).to(tl.int64), 1)


_TAIL_SHARE = tl.constexpr(0.25)  # of the mass outside a nucleus that the tokens below the tail bound may hold


@triton.jit
def _nucleus_floor(p, total, mx, V):
    """A key no larger than a top-p threshold without top-k (the largest key whose tokens reach the nucleus
    target in integer mass): below it each of the row's ``V`` tokens has less than ``(1 - p) * total / (4 V)``
    of mass, so together they hold under a quarter of the mass outside the nucleus and every token above it
    holds the target. INT32_MIN (no bound) for ``p`` within 1e-3 of 1 or a bound below the smallest mass.
    ``total`` is the granules' total, within 1e-5 of the tokens' own (two roundings of 24-bit masses), which the
    margin between a quarter and the whole of ``1 - p`` covers many times over."""
    share = (1.0 - p.to(tl.float64)) * _TAIL_SHARE / V
    m = total.to(tl.float64) * share  # integer-mass units
    x = mx + tl.log((m * _TWO_M40).to(tl.float32))
    return tl.where((1.0 - p.to(tl.float64) >= 1e-3) & (m >= 1.0), _float_key(x).to(tl.int64) - 16, INT32_MIN)


@triton.jit
def _gumbel_from_word(w):
    u = ((w >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # (2 * (w >> 9) + 1) * 2**-24
    return -_plog(-_plog(u))


@triton.jit
def _gumbel_tile(seed, offset, start, BLOCK: tl.constexpr):
    """Gumbel noise for tokens start .. start+BLOCK-1 (start a multiple of 4): one Philox call per 4 tokens."""
    w0, w1, w2, w3 = _philox_words(seed, offset, (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32))
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])  # token 4i+j takes word j
    return _gumbel_from_word(w)


@triton.jit
def _gumbel_at(seed, offset, idx):
    """Gumbel noise at arbitrary token ids ``idx`` (int64, >= 0)."""
    w0, w1, w2, w3 = _philox_words(seed, offset, (idx >> 2).to(tl.uint32))
    lane = idx & 3
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return _gumbel_from_word(w)


@triton.jit
def _noisy(x, g, kept):
    """(rounded x + g, its rounding error): the exact sum as a pair (TwoSum); (-inf, 0) where not kept."""
    s = x + g
    bb = s - x
    err = (x - (s - bb)) + (g - bb)
    s = tl.where(kept, s, float("-inf"))
    return s, tl.where(kept & (s > float("-inf")), err, 0.0)


@triton.jit
def _argmax_exact(s, err, idx, valid):
    """(s, err, idx) of the largest exact sum s + err over ``valid`` lanes; ties to the lowest idx."""
    s = tl.where(valid, s, float("-inf"))
    best = tl.max(s, 0)
    top = valid & (s == best)
    e = tl.where(top, err, float("-inf"))
    best_e = tl.max(e, 0)
    best_i = tl.min(tl.where(top & (e == best_e), idx, INT32_MAX), 0)
    return best, best_e, best_i


@triton.jit
def _row_param(ptr, value, row, IS_TENSOR: tl.constexpr, DT: tl.constexpr):
    if IS_TENSOR:
        return tl.load(ptr + row).to(DT)
    else:
        # ``+ 0``: Triton's interpreter holds a scalar int in [2**31, 2**32) as uint32 data under its int64 type,
        # so 64-bit work on it (the Philox key's and counter's high words, ``>> 32``) went wrong there; the sum is
        # data of the type (compiled, it folds away)
        return tl.cast(value, DT) + 0


@triton.jit
def _weight(w_vals, w_ptr, w_stride, row, i: tl.constexpr, W_TENSOR: tl.constexpr):
    """Weight of guide i-1 (input i) for ``row``."""
    if W_TENSOR:
        return tl.load(w_ptr + row * w_stride + (i - 1))
    else:
        return w_vals[i - 1]


@triton.jit
def _combined(inputs, strides, w_vals, w_ptr, w_stride, row, cols, mask, NIN: tl.constexpr, W_TENSOR: tl.constexpr):
    """z = x_0 + sum_i w_i x_i at ``cols`` of ``row`` in float32 (masked lanes are 0)."""
    z = tl.load(inputs[0] + row * strides[0] + cols, mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(1, NIN):
        v = tl.load(inputs[i] + row * strides[i] + cols, mask=mask, other=0.0).to(tl.float32)
        z = z + _weight(w_vals, w_ptr, w_stride, row, i, W_TENSOR) * v
    return z


@triton.jit
def _scaled(z, t, sampling):
    """x = z * (1 / T), each operation correctly rounded (z itself for greedy rows)."""
    return tl.where(sampling, z * tl.div_rn(1.0, tl.where(sampling, t, 1.0)), z)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _workspace(ws, off_i, off_g, off_m, off_cand, off_pool):
    """The stages' scratch buffers inside one allocation ``ws`` (bytes; offsets multiples of 16, from
    ``workspace_layout``): part_f float32, part_i int32, part_g float32, part_m int64, part_cand int64, and the
    fallback's pool: an int64 count of the entries taken (int64: every row of a huge call may add up to V to it,
    fitting or not), then the int64 entries from byte 16 on."""
    return (ws.to(tl.pointer_type(tl.float32)), (ws + off_i).to(tl.pointer_type(tl.int32)),
            (ws + off_g).to(tl.pointer_type(tl.float32)), (ws + off_m).to(tl.pointer_type(tl.int64)),
            (ws + off_cand).to(tl.pointer_type(tl.int64)), (ws + off_pool).to(tl.pointer_type(tl.int64)),
            (ws + off_pool + 16).to(tl.pointer_type(tl.int64)))


@triton.jit
def _top_keys(keys, C: tl.constexpr):
    """The ``C`` largest of the distinct int32 ``keys`` [NGB, GR], descending, by ``C`` extractions of the
    next largest: below ``m``, the largest key minimises ``(m - 1) - key`` as uint32 (keys at or above
    ``m`` wrap past every key below it), so each extraction is a subtraction and an unsigned min per key
    (a bitonic ``tl.topk`` cost about 125 more instructions per token)."""
    j = tl.arange(0, C)
    m = tl.max(keys)
    top = tl.where(j == 0, m, 0)
    for i in tl.static_range(1, C):
        d = ((m - 1) - keys).to(tl.uint32, bitcast=True)
        m = (m - 1) - tl.min(d).to(tl.int32, bitcast=True)
        top = tl.where(j == i, m, top)
    return top


@triton.jit(do_not_specialize=["t_val"])
def _stage1_kernel(
    inputs, strides, w_vals, w_ptr, w_stride, t_ptr, t_val,
    ws, off_i, off_g, off_m, off_cand, off_pool,
    V, S, NG,
    NIN: tl.constexpr, W_TENSOR: tl.constexpr, T_TENSOR: tl.constexpr,
    FILTER: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr, GR: tl.constexpr,
):
    """One slice of one row, read once: per-input stats, the granules' max and integer mass, top-C candidates.

    ``part_f[part]`` = max x; ``part_i[part]`` = (first index of max x, written for greedy rows; the cut, a
    bound on the key of every token not among the candidates); ``part_g[row, 0, granule]``
    = the granule's max x, ``part_g[row, 1 + i, granule]`` and ``part_g[row, 1 + NIN + i, granule]`` = input
    i's max over the granule and its sum of exp(x_i - that max), and ``part_m[row * NG + granule]``, for
    sampled rows, the granule's sum of ``mass_int(x - max)``. The inputs' sums are per granule, a fixed
    partition of the row, and stage 2 merges them in one fixed order, so each input's log-sum-exp is the same
    bits however wide the slices (which follow the call's row count). Maxima propagate NaN, so stage 2 finds
    bad rows from them."""
    part_f, part_i, part_g, part_m, part_cand, pool_n, pool = _workspace(ws, off_i, off_g, off_m, off_cand, off_pool)
    pid = tl.program_id(0)
    row = (pid // S).to(tl.int64)
    sl = pid % S
    NGB: tl.constexpr = BLOCK // GR  # granules in the slice: every S-th granule of the row from granule sl
    g_idx = sl + S * tl.arange(0, NGB)
    local = tl.arange(0, NGB)[:, None] * GR + tl.arange(0, GR)[None, :]  # [NGB, GR] position in the slice
    cols = g_idx[:, None] * GR + tl.arange(0, GR)[None, :]  # [NGB, GR] token ids, in the order of ``local``
    mask = cols < V
    part = row * S + sl
    NEG_INF: tl.constexpr = float("-inf")
    LOG2E: tl.constexpr = 1.4426950408889634
    g_mask = g_idx < NG
    g_row = _granule_row(part_g, row, NG, NIN)

    # The only read of the inputs: per-input stats and the combined score from the same registers.
    z = tl.zeros([NGB, GR], tl.float32)
    for i in tl.static_range(NIN):
        v = tl.load(inputs[i] + row * strides[i] + cols, mask=mask, other=NEG_INF).to(tl.float32)
        m = tl.reduce(v, 1, _max_nan)  # [NGB] each granule's max
        m_safe = tl.where(m == NEG_INF, 0.0, m)
        tl.store(g_row + (1 + i) * NG + g_idx, m, mask=g_mask)
        tl.store(g_row + (1 + NIN + i) * NG + g_idx,
                 tl.sum(tl.math.exp2(tl.fma(v, LOG2E, -m_safe[:, None] * LOG2E)), 1), mask=g_mask)
        if i == 0:
            z = v
        else:
            z = z + _weight(w_vals, w_ptr, w_stride, row, i, W_TENSOR) * v

    t = _row_param(t_ptr, t_val, row, T_TENSOR, tl.float32)
    sampling = t > 0
    x = tl.where(mask, _scaled(z, t, sampling), NEG_INF)
    a = tl.reduce(x, 1, _max_nan)  # [NGB] the granules' max
    amax = tl.reduce(a, 0, _max_nan)
    tl.store(part_f + part, amax)
    tl.store(g_row + g_idx, a, mask=g_mask)
    if sampling:
        mass = _mass_int(x - a[:, None])  # a granule of -inf gives NaN here, and mass_int(NaN) = 0
        tl.store(part_m + row * NG + g_idx, tl.sum(mass, 1), mask=g_mask)
    else:
        tl.store(part_i + part * 2, tl.min(tl.where(x == amax, cols, INT32_MAX)))

    if FILTER:
        if pid == 0:
            tl.store(pool_n, tl.zeros([], tl.int64))  # stage 2's fallback pool starts empty
        # Candidates: the top C of a 32-bit key, the float's ordered key with its low 12 bits replaced by
        # the slice position (ties: lower id first). That sorts half the bits of an exact 64-bit key;
        # the candidates' exact keys are then recomputed from the inputs, and the cut is an upper bound
        # on the exact key of every token left out: its high bits are those of the C-th packed key.
        LOW: tl.constexpr = 0xFFF  # BLOCK <= 4096
        packed = (_float_key(x) & ~LOW) | (LOW - local)  # [NGB, GR], distinct (ids rise with ``local``)
        top = _top_keys(packed, C)  # [C], descending
        at = LOW - (top & LOW)  # the candidates' positions in the slice
        ccols = (sl + S * (at // GR)) * GR + at % GR
        cvalid = ccols < V
        cx = tl.where(cvalid, _scaled(_combined(inputs, strides, w_vals, w_ptr, w_stride, row, ccols, cvalid, NIN,
                                                W_TENSOR), t, sampling), NEG_INF)
        key = (_float_key(cx).to(tl.int64) << 32) | ((0 - ccols) + INT32_MAX).to(tl.int64)
        tl.store(part_cand + part * C + tl.arange(0, C), key)
        n_valid = tl.sum(tl.minimum(tl.maximum(V - g_idx * GR, 0), GR), 0)  # the slice's tokens
        cut = tl.where(n_valid > C, tl.min(top, 0) | LOW, INT32_MIN)
        tl.store(part_i + part * 2 + 1, cut)


@triton.jit
def _granule_row(part_g, row, NG, NIN: tl.constexpr):
    """A row's granule records in ``part_g`` (stage 1): x's maxima, then each input's maxima, then its sum-exps."""
    return part_g + row * ((2 * NIN + 1) * NG)


@triton.jit
def _merged_lse(part_g, row, NG, j, NIN: tl.constexpr, G_PAD: tl.constexpr):
    """(max, logsumexp) of input j, merged over the row's granules in one order, whatever the slices (stage 1);
    the max propagates NaN."""
    gs = tl.arange(0, G_PAD)
    gmask = gs < NG
    at = _granule_row(part_g, row, NG, NIN)
    m = tl.load(at + (1 + j) * NG + gs, mask=gmask, other=float("-inf"))
    sm = tl.load(at + (1 + NIN + j) * NG + gs, mask=gmask, other=0.0)
    mmax = tl.reduce(m, 0, _max_nan)
    m_safe = tl.where(mmax == float("-inf"), 0.0, mmax)
    return mmax, m_safe + tl.log(tl.sum(sm * tl.exp(m - m_safe), 0))


@triton.jit
def _draw_uniforms(seed, offset):
    """The row's two float64 uniforms in [0, 1) (reference/sampling.py: draw_uniforms): one Philox call."""
    w0, w1, w2, w3 = _philox_words(seed, offset, tl.full([1], _DRAW_COUNTER, tl.uint32))
    u1 = ((w0.to(tl.int64) << 21) | (w1.to(tl.int64) >> 11)).to(tl.float64) * 1.1102230246251565e-16  # 2**-53
    u2 = ((w2.to(tl.int64) << 21) | (w3.to(tl.int64) >> 11)).to(tl.float64) * 1.1102230246251565e-16
    return tl.sum(u1, 0), tl.sum(u2, 0)


@triton.jit
def _index_draw(cum, total, u, valid):
    """The first index whose running sum ``cum`` exceeds floor(u * total) (reference: _index_draw)."""
    r = tl.minimum(tl.floor(u * total.to(tl.float64)).to(tl.int64), total - 1)
    return tl.sum(((cum <= r) & valid).to(tl.int32), 0)


@triton.jit
def _bisect_count(keys, valid, target):
    """Largest int32 key t with count(valid & keys >= t) >= target."""
    lo = tl.full([], INT32_MIN, tl.int64)
    hi = tl.full([], INT32_MAX, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        hit = tl.sum((valid & (keys >= mid)).to(tl.int32), 0) >= target
        lo = tl.where(hit, mid, lo)
        hi = tl.where(hit, hi, mid - 1)
    return lo


@triton.jit
def _bisect_mass(keys, mass, target):
    """Largest int32 key t with sum(mass[keys >= t]) >= target (int64 masses, 0 where invalid)."""
    lo = tl.full([], INT32_MIN, tl.int64)
    hi = tl.full([], INT32_MAX, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        hit = tl.sum(tl.where(keys >= mid, mass, 0), 0) >= target
        lo = tl.where(hit, mid, lo)
        hi = tl.where(hit, hi, mid - 1)
    return lo


@triton.jit
def _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, v0, t, V,
            NIN: tl.constexpr, W_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    cols = v0 + tl.arange(0, BLOCK)
    mask = cols < V
    z = _combined(inputs, strides, w_vals, w_ptr, w_stride, row, cols, mask, NIN, W_TENSOR)
    return cols, mask, tl.where(mask, z * tl.div_rn(1.0, t), float("-inf"))


_PIVOTS = tl.constexpr(8)  # thresholds tried per pass of the fallback: the range shrinks 9-fold
# Software-pipelining depth of a loop in which one program streams a whole row (tl.range's num_stages: loads of
# tile i+1 issued as cp.async while tile i is reduced): the fallback's passes below and the speculative kernels'.
# The launch's num_stages pipelines only loads that feed dots, so without it these loops had no cp.async on sm_90
# and each tile waited on DRAM. 3 stages spilled in stage 2.
ROW_STAGES = tl.constexpr(2)
_FB_TILE = tl.constexpr(2048)  # tokens per tile of the full-row passes (a [tile, pivots] comparison in registers)
# Stage 2 with filters runs 16 warps: a row's exact fallback is one program's passes over the row (on the H200
# at bc7a757, 6 of 256 peaked rows at top-p 0.9 fell back to a dozen full-row passes and took the whole call
# to 3.9 ms with 4 warps), and its candidate bisections reduce over S_PAD * C keys; at 4 warps it needed
# 233-255 registers and spilled, at 16 at most 128, with 40 bytes spilled at N=1 (S_PAD * C = 4,096
# candidates; benchmarks/compile_offline.py).
_STAGE2_WARPS_FILTER = 16


@triton.jit
def _pivots(lo, hi):
    """``_PIVOTS`` increasing int64 keys in ``[lo, hi]`` splitting it into ``_PIVOTS + 1`` near-equal parts."""
    j = tl.arange(0, _PIVOTS).to(tl.int64)
    return lo + ((hi - lo + 1) * (j + 1)) // (_PIVOTS + 1)


@triton.jit
def _narrow(lo, hi, piv, hit):
    """The new ``[lo, hi]`` around the answer, the largest key whose measure reaches the target, from the
    pivots that reach it (``hit``: a prefix, the measure falling as the key rises)."""
    INT64_MIN: tl.constexpr = -9223372036854775808
    INT64_MAX: tl.constexpr = 9223372036854775807
    lo2 = tl.maximum(lo, tl.max(tl.where(hit, piv, INT64_MIN), 0))
    hi2 = tl.minimum(hi, tl.min(tl.where(hit, INT64_MAX, piv - 1), 0))
    return lo2, hi2


@triton.jit
def _fallback_threshold(inputs, strides, w_vals, w_ptr, w_stride, row, t, V, floor_key, mx, target, lo, hi,
                        MASS: tl.constexpr, NIN: tl.constexpr, W_TENSOR: tl.constexpr):
    """An exact threshold from full passes over the row: the largest key t whose tokens (those with key >=
    ``floor_key``) reach ``target`` in count (top-k) or, with ``MASS``, in integer mass (top-p; INT32_MIN,
    keep all, if no key does), known to lie in ``[lo, hi]`` (int64). Each pass tries ``_PIVOTS``
    thresholds, so the whole 32-bit range takes at most 11 passes (a bisection took 32); the range the
    candidates leave (stage 2) needs 5 to 8 on the benchmark's peaked rows at top-p 0.95."""
    while lo < hi:
        piv = _pivots(lo, hi)
        acc = tl.zeros([_PIVOTS], tl.int64)
        for v0 in tl.range(0, V, _FB_TILE, num_stages=ROW_STAGES):
            cols, mask, x = _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, v0, t, V, NIN, W_TENSOR, _FB_TILE)
            key = _float_key(x).to(tl.int64)
            counted = mask & (key >= floor_key)
            if MASS:
                m = tl.where(counted, _mass_int(x - mx), 0)
            else:
                m = counted.to(tl.int64)
            acc += tl.sum(tl.where(key[:, None] >= piv[None, :], m[:, None], 0), 0)
        lo, hi = _narrow(lo, hi, piv, acc >= target)
    return lo


_POOL_TILE = tl.constexpr(512)  # pool entries per tile of the passes over a row's pool (1024 spilled at N=1)


@triton.jit
def _measure(key, on, mx, MASS: tl.constexpr):
    """Each token's share of a threshold's measure: 1 (count) or, with ``MASS``, its integer mass; 0 where not
    ``on``."""
    if MASS:
        return tl.where(on, _mass_int(_key_float(key.to(tl.int32)) - mx), 0)
    else:
        return on.to(tl.int64)


@triton.jit
def _candidate_masses(ckey, cmask, cx, mx, floor_key):
    """The candidates' integer masses, 0 below ``floor_key`` (a top-k threshold) and in padding slots."""
    return tl.where(cmask & (ckey >= floor_key), _mass_int(cx - mx), 0)


@triton.jit
def _pool_entries(pool, start, e0, n):
    """(keys, ids, valid) of pool entries ``start + e0 ..`` (one tile; ``n`` entries in all)."""
    e = e0 + tl.arange(0, _POOL_TILE)
    valid = e < n
    ent = tl.load(pool + start + e, mask=valid, other=0)
    return ent >> 32, ent & 0xFFFFFFFF, valid


@triton.jit
def _pool_threshold(pool, start, n, ckey, above, lo, hi, mx, target, MASS: tl.constexpr):
    """``_fallback_threshold`` over the tokens the pool holds (keys in ``[low, cut]``) and the candidates
    ``above`` the cut: every token with a key of at least ``lo`` (>= low), which is all the measure at the
    pivots counts (and a top-p floor, tau_k <= lo, excludes nothing there)."""
    cm = _measure(ckey, above, mx, MASS)
    j = tl.arange(0, _PIVOTS)
    while lo < hi:
        piv = _pivots(lo, hi)
        acc = tl.zeros([_PIVOTS], tl.int64)
        for i in tl.static_range(_PIVOTS):  # a pivot at a time: the candidates x pivots matrix would spill
            acc += tl.where(j == i, tl.sum(tl.where(ckey >= tl.sum(tl.where(j == i, piv, 0), 0), cm, 0), 0), 0)
        for e0 in range(0, n, _POOL_TILE):
            key, ids, valid = _pool_entries(pool, start, e0, n)
            m = _measure(key, valid, mx, MASS)
            acc += tl.sum(tl.where(key[:, None] >= piv[None, :], m[:, None], 0), 0)
        lo, hi = _narrow(lo, hi, piv, acc >= target)
    return lo


@triton.jit
def _pool_mass(pool, start, n, ckey, above, floor_key, mx):
    """The integer mass of the tokens with key >= ``floor_key`` (at least the pool's lowest key)."""
    total = tl.sum(_measure(ckey, above & (ckey >= floor_key), mx, True), 0)
    for e0 in range(0, n, _POOL_TILE):
        key, ids, valid = _pool_entries(pool, start, e0, n)
        total += tl.sum(_measure(key, valid & (key >= floor_key), mx, True), 0)
    return total


@triton.jit
def _take(best, err, tok, yb, eb, yi):
    """The larger of two (exact sum, token) draws; ties to the lower token id."""
    take = (yb > best) | ((yb == best) & ((eb > err) | ((eb == err) & (yi < tok))))
    return tl.where(take, yb, best), tl.where(take, eb, err), tl.where(take, yi, tok)


@triton.jit
def _pool_draw(pool, start, n, ckey, cx, cidx, above, tau, mx, seed, offset):
    """Gumbel-max over the kept tokens (key >= ``tau``, at least the pool's lowest key): the candidates above
    the cut and the pool's entries. Returns (token, integer mass of the kept tokens)."""
    kept = above & (ckey >= tau)
    y, err = _noisy(cx, _gumbel_at(seed, offset, cidx), kept)
    best, best_e, tok = _argmax_exact(y, err, cidx, kept)
    tok = tok.to(tl.int64)
    kept_mass = tl.sum(_measure(ckey, kept, mx, True), 0)
    for e0 in range(0, n, _POOL_TILE):  # (names of their own: a loop's tile has its own shape)
        key, ids, valid = _pool_entries(pool, start, e0, n)
        kept_e = valid & (key >= tau)
        y_e, err_e = _noisy(_key_float(key.to(tl.int32)), _gumbel_at(seed, offset, ids), kept_e)
        yb, eb, yi = _argmax_exact(y_e, err_e, ids, kept_e)
        best, best_e, tok = _take(best, best_e, tok, yb, eb, yi.to(tl.int64))
        kept_mass += tl.sum(_measure(key, kept_e, mx, True), 0)
    return tok, kept_mass


@triton.jit
def _granule_weights(part_g, part_m, row, mx, NG, NIN: tl.constexpr, G_PAD: tl.constexpr):
    """The granules of a row from stage 1 (reference/sampling.py: granule_weights): ``(ids, mask, max x,
    mass sum S, weight W)``, each [G_PAD]."""
    gs = tl.arange(0, G_PAD)
    gmask = gs < NG
    a = tl.load(_granule_row(part_g, row, NG, NIN) + gs, mask=gmask, other=float("-inf"))
    sg = tl.load(part_m + row * NG + gs, mask=gmask, other=0)
    e = _mass_int(tl.where(a > float("-inf"), a - mx, float("-inf")))
    return gs, gmask, a, sg, tl.floor(sg.to(tl.float64) * e.to(tl.float64) * _TWO_M40).to(tl.int64)


@triton.jit
def _granule_draw(inputs, strides, w_vals, w_ptr, w_stride, part_g, part_m, row, t, mx, seed, offset, V, NG,
                  NIN: tl.constexpr, W_TENSOR: tl.constexpr, GR: tl.constexpr, G_PAD: tl.constexpr):
    """Step 4 of a row without filters (reference/sampling.py: granule_draw): (token, log of the total mass)."""
    gs, gmask, a, sg, w = _granule_weights(part_g, part_m, row, mx, NG, NIN, G_PAD)
    total = tl.sum(w, 0)
    u1, u2 = _draw_uniforms(seed, offset)
    g = _index_draw(tl.cumsum(w, 0), total, u1, gmask)
    s_g = tl.sum(tl.where(gs == g, sg, 0), 0)
    a_g = tl.max(tl.where(gs == g, a, float("-inf")), 0)
    # The granule's masses again, from the inputs: the same operations as stage 1.
    cols, mask, x = _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, g * GR, t, V, NIN, W_TENSOR, GR)
    j = _index_draw(tl.cumsum(_mass_int(x - a_g), 0), s_g, u2, mask)
    return (g * GR + j).to(tl.int64), tl.log(total.to(tl.float64) * _TWO_M40).to(tl.float32)


@triton.jit(do_not_specialize=["t_val", "k_val", "p_val", "mp_val", "seed_val", "off_val"])
def _stage2_kernel(
    inputs, strides, w_vals, w_ptr, w_stride,
    t_ptr, t_val, k_ptr, k_val, p_ptr, p_val, mp_ptr, mp_val, seed_ptr, seed_val, off_ptr, off_val,
    ws, off_i, off_g, off_m, off_cand, off_pool, pool_cap,
    out_tokens, out_logprob, out_lse, out_in_logprobs, out_in_logits, out_ok,
    V, S, NG,
    NIN: tl.constexpr, W_TENSOR: tl.constexpr, T_TENSOR: tl.constexpr, K_TENSOR: tl.constexpr,
    P_TENSOR: tl.constexpr, MP_TENSOR: tl.constexpr, SEED_TENSOR: tl.constexpr, OFF_TENSOR: tl.constexpr,
    FILTER: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr, GR: tl.constexpr, S_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
):
    """One row: merge the slices, apply the filters, draw, gather per-input values at the token."""
    part_f, part_i, part_g, part_m, part_cand, pool_n, pool = _workspace(ws, off_i, off_g, off_m, off_cand, off_pool)
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, S_PAD)
    smask = s < S
    base = row.to(tl.int64) * S
    NEG_INF: tl.constexpr = float("-inf")
    POS_INF: tl.constexpr = float("inf")

    # Bad rows from the reduced values: a NaN or +inf anywhere makes its slice's (its granule's) max NaN or +inf.
    sx = tl.load(part_f + base + s, mask=smask, other=NEG_INF)
    mx = tl.reduce(sx, 0, _max_nan)
    bad = (mx != mx) | (mx == POS_INF)
    for i in tl.static_range(NIN):
        # each input's log-sum-exp now (its granules read once), stored as it is, masked below once ``ok`` is known
        mi, lse_i = _merged_lse(part_g, row, NG, i, NIN, G_PAD)
        bad = bad | (mi != mi) | (mi == POS_INF)
        tl.store(out_lse + row * NIN + i, lse_i)

    t = _row_param(t_ptr, t_val, row, T_TENSOR, tl.float32)
    p = _row_param(p_ptr, p_val, row, P_TENSOR, tl.float32)
    mp = _row_param(mp_ptr, mp_val, row, MP_TENSOR, tl.float32)
    ok = (~bad) & (t >= 0) & (p > 0) & (p <= 1) & (mp >= 0) & (mp <= 1) & (mx > NEG_INF)
    sampling = t > 0
    # Greedy rows: the first index of the max (slices in id order).
    tok = tl.min(tl.load(part_i + (base + s) * 2, mask=smask & (sx == mx), other=INT32_MAX), 0).to(tl.int64)
    log_kept = tl.zeros([], tl.float32)
    seed = _row_param(seed_ptr, seed_val, row, SEED_TENSOR, tl.int64)
    offset = _row_param(off_ptr, off_val, row, OFF_TENSOR, tl.int64)
    plain = ok & sampling
    if FILTER:
        k = _row_param(k_ptr, k_val, row, K_TENSOR, tl.int64)
        k_on = (k > 0) & (k < V)
        p_on = p < 1
        m_on = mp > 0
        filtered = k_on | p_on | m_on
        plain = plain & ~filtered
    if plain:
        tok, log_kept = _granule_draw(inputs, strides, w_vals, w_ptr, w_stride, part_g, part_m, row, t, mx,
                                      seed, offset, V, NG, NIN, W_TENSOR, GR, G_PAD)

    if FILTER:
        if ok & sampling & filtered:
            cs = tl.arange(0, S_PAD * C)
            cmask = (cs // C) < S
            cand = tl.load(part_cand + base * C + cs, mask=cmask, other=0)
            ckey = (cand >> 32).to(tl.int32)
            cidx = ((0 - cand.to(tl.int32)) + INT32_MAX).to(tl.int64)
            cx = _key_float(ckey)
            cut = tl.max(tl.load(part_i + (base + s) * 2 + 1, mask=smask, other=INT32_MIN), 0).to(tl.int64)
            # Every token outside the candidates has a key <= the largest cut: zero mass below this.
            tail_zero = (cut == INT32_MIN) | (_key_float(cut.to(tl.int32)) - mx < _TAIL_ZERO)

            tau_k = tl.full([], INT32_MIN, tl.int64)
            if k_on:
                tau_k = _bisect_count(ckey, cmask, k)
            valid_k = tl.where(k_on, tau_k > cut, True)
            mass = _candidate_masses(ckey, cmask, cx, mx, tau_k)
            # The nucleus's total: with top-k the top-k set's mass (known when that set lies among the
            # candidates, or nothing outside them has mass); without, the granules' total from stage 1.
            total_known = tl.where(k_on, valid_k | tail_zero, True)
            w_total = tl.zeros([], tl.int64)
            if p_on & ~k_on:
                w_total = tl.sum(_granule_weights(part_g, part_m, row, mx, NG, NIN, G_PAD)[4], 0)
            tau_p = tl.full([], INT32_MIN, tl.int64)
            if p_on & total_known:
                tau_p = _bisect_mass(ckey, mass, _nucleus_target(p, tl.where(k_on, tl.sum(mass, 0), w_total)))
            tau_m = tl.full([], INT32_MIN, tl.int64)
            if m_on:
                tau_m = _float_key(mx + _plog(tl.maximum(mp, _FLT_MIN))).to(tl.int64)
            tau = tl.maximum(tl.maximum(tau_k, tau_p), tau_m)
            valid_p = tl.where(p_on, total_known & (tau_p > cut), True)
            exact = (cut == INT32_MIN) | (valid_k & valid_p & (tau > cut))
            if exact:
                kept = cmask & (ckey >= tau)
                y, err = _noisy(cx, _gumbel_at(seed, offset, cidx), kept)
                best, best_e, tok = _argmax_exact(y, err, cidx, kept)
                kept_mass = tl.sum(_measure(ckey, kept, mx, True), 0)
            else:
                # Exact fallback. The candidates bound each threshold: it is at least what they alone give for
                # the same target and floor (the row's tokens reach a target wherever the candidates do) and at
                # most the cut when that is (above the cut every token is a candidate). So every token a
                # threshold or the draw needs is a candidate above the cut or has a key in [low, cut]: one pass
                # counts those, a second copies them (key, id) into the pool, and the thresholds and the draw
                # run over the pool. Rows whose range does not fit the pool take full-row passes instead.
                low = tau_m
                floor_p = tl.full([], INT32_MIN, tl.int64)  # a bound below a top-p threshold without top-k
                if k_on:
                    low = tau_k
                elif p_on:
                    # the candidates' threshold for the same target (no top-k: the total known), or, where the
                    # candidates do not reach the target (a wide nucleus), a bound from the total mass: without
                    # it such a row's range was the whole row below the cut, and a few rows overflowed the pool
                    floor_p = _nucleus_floor(p, w_total, mx, V)
                    low = tl.maximum(tau_p, floor_p)
                n_low = tl.zeros([], tl.int32)
                for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
                    cols, mask, x = _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, v0, t, V, NIN, W_TENSOR,
                                            BLOCK)
                    key = _float_key(x)
                    n_low += tl.sum((mask & (key >= low) & (key <= cut)).to(tl.int32), 0)
                start = tl.atomic_add(pool_n, n_low.to(tl.int64))
                above = cmask & (ckey > cut)
                if start + n_low <= pool_cap:
                    at = start
                    for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
                        cols, mask, x = _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, v0, t, V, NIN,
                                                W_TENSOR, BLOCK)
                        key = _float_key(x)
                        inr = mask & (key >= low) & (key <= cut)
                        tl.store(pool + at + tl.cumsum(inr.to(tl.int32), 0) - 1,
                                 (key.to(tl.int64) << 32) | cols.to(tl.int64), mask=inr)
                        at += tl.sum(inr.to(tl.int32), 0)
                    tl.debug_barrier()  # the pool's entries, written by every thread, are read by others below
                    if k_on & ~valid_k:
                        tau_k = _pool_threshold(pool, start, n_low, ckey, above, tau_k, cut, mx, k, False)
                    if p_on:
                        total = w_total
                        if k_on:
                            total = _pool_mass(pool, start, n_low, ckey, above, tau_k, mx)
                        target = _nucleus_target(p, total)
                        tau_c = _bisect_mass(ckey, _candidate_masses(ckey, cmask, cx, mx, tau_k), target)
                        # at least tau_k (>= low): the top-k set alone reaches any target; and at least the
                        # mass bound (= low without top-k)
                        tau_c = tl.maximum(tl.maximum(tau_c, tau_k), floor_p)
                        tau_p = _pool_threshold(pool, start, n_low, ckey, above, tau_c,
                                                tl.where(tau_c > cut, tau_c, cut), mx, target, True)
                    tau = tl.maximum(tl.maximum(tau_k, tau_p), tau_m)
                    tok, kept_mass = _pool_draw(pool, start, n_low, ckey, cx, cidx, above, tau, mx, seed, offset)
                else:
                    if k_on & ~valid_k:
                        tau_k = _fallback_threshold(inputs, strides, w_vals, w_ptr, w_stride, row, t, V, INT32_MIN,
                                                    mx, k, tau_k, cut, False, NIN, W_TENSOR)
                    if p_on:
                        total = w_total
                        if k_on:
                            for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
                                cols, mask, x = _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, v0, t, V,
                                                        NIN, W_TENSOR, BLOCK)
                                total += tl.sum(tl.where(_float_key(x) >= tau_k, _mass_int(x - mx), 0), 0)
                        target = _nucleus_target(p, total)
                        tau_c = _bisect_mass(ckey, _candidate_masses(ckey, cmask, cx, mx, tau_k), target)
                        tau_c = tl.maximum(tau_c, floor_p)
                        tau_p = _fallback_threshold(inputs, strides, w_vals, w_ptr, w_stride, row, t, V, tau_k, mx,
                                                    target, tau_c, tl.where(tau_c > cut, tau_c, cut), True, NIN,
                                                    W_TENSOR)
                    tau = tl.maximum(tl.maximum(tau_k, tau_p), tau_m)
                    run_best = tl.full([], NEG_INF, tl.float32)
                    run_err = tl.zeros([], tl.float32)
                    run_tok = tl.full([], INT32_MAX, tl.int64)
                    kept_mass = tl.zeros([], tl.int64)
                    for v0 in tl.range(0, V, BLOCK, num_stages=ROW_STAGES):
                        cols, mask, x = _x_tile(inputs, strides, w_vals, w_ptr, w_stride, row, v0, t, V,
                                                NIN, W_TENSOR, BLOCK)
                        kept = mask & (_float_key(x) >= tau)
                        y, err = _noisy(x, _gumbel_tile(seed, offset, v0, BLOCK), kept)
                        yb, eb, yi = _argmax_exact(y, err, cols, kept)
                        run_best, run_err, run_tok = _take(run_best, run_err, run_tok, yb, eb, yi.to(tl.int64))
                        kept_mass += tl.sum(tl.where(kept, _mass_int(x - mx), 0), 0)
                    tok = run_tok
            # The kept set's exact integer mass, whichever way the row went (proven from the candidates, the
            # pool, full-row passes) and however wide its slices (which follow the call's row count): the same bits.
            log_kept = tl.log(kept_mass.to(tl.float64) * _TWO_M40).to(tl.float32)

    tok_safe = tl.where(ok, tok, 0)
    z = _combined(inputs, strides, w_vals, w_ptr, w_stride, row, tok_safe, True, NIN, W_TENSOR)
    x_tok = _scaled(z, t, sampling)
    logprob = tl.where(sampling, (x_tok - mx) - log_kept, 0.0)
    NAN: tl.constexpr = float("nan")
    tl.store(out_tokens + row, tl.where(ok, tok, -1))
    tl.store(out_logprob + row, tl.where(ok, logprob, NAN))
    tl.store(out_ok + row, ok)
    tl.debug_barrier()  # (the log-sum-exps stored above, read back by every thread)
    for i in tl.static_range(NIN):
        lse_i = tl.load(out_lse + row * NIN + i)
        v = tl.load(inputs[i] + row * strides[i] + tok_safe).to(tl.float32)
        tl.store(out_lse + row * NIN + i, tl.where(ok, lse_i, NAN))
        tl.store(out_in_logits + row * NIN + i, tl.where(ok, v, NAN))
        tl.store(out_in_logprobs + row * NIN + i, tl.where(ok, v - lse_i, NAN))


# ----------------------------------------------------------------------------------------------
# Launcher and torch.library registration
# ----------------------------------------------------------------------------------------------
# Candidates per slice that stage 1 keeps for the filters (its top keys). At 8 instead of 16, stage 1 with filters
# issues 110 instead of 127 instructions per token (sm_90, 3 bf16 inputs, `benchmarks/sass_count.py`), and
# `benchmarks/candidate_coverage.py` predicts 1 to 5 more of 256 benchmark rows taking the exact fallback; which is
# faster is a GPU measurement (`benchmarks/tune_stage1.py --candidates 16 8`, owed).
MAX_CANDIDATES = 16
_MIN_PROGRAMS = 264  # two waves of a 132-SM H100: keep N=1 from running on a few SMs


def pick_block(n: int, v: int) -> int:
    """Slice width: the widest that still gives enough programs to fill the GPU."""
    for block in (4096, 2048, 1024):
        if n * cdiv(v, block) >= _MIN_PROGRAMS:
            return block
    return max(16, min(1024, next_power_of_2(v)))


MAX_BLOCK = 4096  # a slice position fits the 12 low bits of stage 1's candidate keys
# Warps of a stage-1 program over a slice of MAX_BLOCK tokens (narrower slices: 4). With 8, each thread holds 16
# tokens; with 4, 32, and the granules' reductions (each input's max and sum-exp, x's max) cost each token less:
# `benchmarks/sass_count.py --warps 8 4` reads 82 -> 72 instructions per token without filters and 127 -> 110 with
# (sm_90, 3 bf16 inputs), at 128 registers instead of 64 and 60, so fewer programs fit an SM at once.
# Which is faster is a GPU measurement (`benchmarks/tune_stage1.py`, owed); 8 is what every GPU row so far ran.
STAGE1_WARPS_WIDE = 8


def slice_width(block: int, v: int) -> int:
    """A slice holds whole granules (reference GRANULE): at least one, or the whole row when it is narrower;
    at most MAX_BLOCK tokens."""
    return min(max(block, min(GRANULE, next_power_of_2(v)), 16), MAX_BLOCK)


POOL_PER_ROW = 1 << 14  # the fallback pool holds this many entries per row, shared by the rows, at most POOL_MAX
# 8 MiB: a wide nucleus's range on the benchmark's peaked rows (V = 151,936) is about 50,000 tokens even above
# the mass bound (_nucleus_floor), and up to 8 of 256 such rows fall back (candidate_coverage.py); 2**18 held 5
POOL_MAX = 1 << 20


def pool_entries(n: int, v: int, filters: bool) -> int:
    """Entries of the fallback pool (stage 2): none without filters."""
    return min(POOL_PER_ROW * n, POOL_MAX, n * v) if filters else 0


def workspace_layout(n: int, s: int, ng: int, nin: int, c: int,
                     pool: int = 0) -> tuple[tuple[int, int, int, int, int], int]:
    """Byte offsets of part_i, part_g, part_m, part_cand and the pool in the scratch allocation (part_f at 0),
    and its size: per slice the max x (float32) and two int32, per granule a
    float32 max of x and each input's max and sum-exp (float32 ``2 * nin + 1`` in all) and an int64 mass, per
    slice ``c`` int64 candidates (``c`` 0: none, one unused entry), and the fallback's pool: a 16-byte header
    (its int64 count) and ``pool`` int64 entries."""
    offsets, size = packed((n * s * 4, n * s * 2 * 4, n * ng * (2 * nin + 1) * 4, n * ng * 8,
                            max(n * s * c, 1) * 8, 16 + pool * 8))
    return tuple(offsets[1:]), size


def _plan(n: int, v: int, block: int, nin: int, filters: bool) -> tuple:
    """``(block, granule, candidates per slice, slices per row, granules per row, pool entries, workspace
    offsets, workspace bytes)`` of a launch (``block`` 0: picked from the shape)."""
    block = slice_width(block if block > 0 else pick_block(n, v), v)
    c, s, ng, pool = min(MAX_CANDIDATES, block), cdiv(v, block), cdiv(v, GRANULE), pool_entries(n, v, filters)
    offsets, size = workspace_layout(n, s, ng, nin, c if filters else 0, pool)
    return block, min(GRANULE, block), c, s, ng, pool, offsets, size


def _param(t, scalar, dtype):
    """(pointer tensor or None, scalar value, is_tensor) for a row parameter."""
    if t is not None:
        return t.to(dtype).contiguous(), 0, True
    return None, scalar, False


class SampleLaunch(KeyedKernels):
    """Everything of a launch of the two stages that its launch key decides (slices, workspace layout, grids,
    constexprs, warps), made once per key (:func:`sample_launch`) and then called with a call's tensors and
    values. Holds no tensor: a call's inputs live only as long as the call."""

    __slots__ = ("n", "nin", "strides", "w_stride", "size", "grid1", "grid2", "rest1", "rest2", "settings")

    def __init__(self, key, n, v, nin, block, filters, strides, w_stride, kinds):
        w_ten, t_ten, k_ten, p_ten, m_ten, sd_ten, of_ten = kinds
        block, gr, c, s, ng, pool, offsets, size = _plan(n, v, block, nin, filters)
        self.n, self.nin, self.strides, self.w_stride = n, nin, strides, w_stride
        self.settings = _settings()
        self.size = size
        self.grid1, self.grid2 = (n * s,), (n,)
        self.rest1 = (*offsets, v, s, ng)  # stage 1's arguments after the workspace
        self.rest2 = (*offsets, pool)  # stage 2's after the workspace, before the outputs
        warps1 = STAGE1_WARPS_WIDE if block >= MAX_BLOCK else 4
        const1 = dict(NIN=nin, W_TENSOR=w_ten, T_TENSOR=t_ten, FILTER=filters, C=c, BLOCK=block, GR=gr,
                      num_warps=warps1, enable_fp_fusion=False)
        const2 = dict(NIN=nin, W_TENSOR=w_ten, T_TENSOR=t_ten, K_TENSOR=k_ten, P_TENSOR=p_ten, MP_TENSOR=m_ten,
                      SEED_TENSOR=sd_ten, OFF_TENSOR=of_ten, FILTER=filters, C=c, BLOCK=block, GR=gr,
                      S_PAD=next_power_of_2(s), G_PAD=next_power_of_2(ng),
                      num_warps=_STAGE2_WARPS_FILTER if filters else 4, enable_fp_fusion=False)
        super().__init__(key, (_stage1_kernel, _stage2_kernel), (const1, const2))

    def current(self) -> bool:
        """Whether the module's settings this launch was planned with (pool size, stage 1's warps, candidates) still
        hold."""
        return self.settings == _settings()

    def __call__(self, inputs, w_vals, w_ptr, t_ptr, t_val, k_ptr, k_val, p_ptr, p_val, m_ptr, m_val,
                 sd_ptr, sd_val, of_ptr, of_val):
        """Allocate the outputs and the scratch, launch both stages; absent tensors are passed as ``inputs[0]``
        (never read). Returns the six outputs of :func:`launch_guided_sample`."""
        n, nin, dev = self.n, self.nin, inputs[0].device
        f32 = torch.float32
        # (sizes as separate ints: torch parses them faster than a tuple, about 0.4 us a call)
        ws = torch.empty(self.size, dtype=torch.uint8, device=dev)  # the stages' scratch, one allocation
        tokens = torch.empty(n, dtype=torch.int64, device=dev)
        logprob = torch.empty(n, dtype=f32, device=dev)
        lse = torch.empty(n, nin, dtype=f32, device=dev)
        in_logprobs = torch.empty(n, nin, dtype=f32, device=dev)
        in_logits = torch.empty(n, nin, dtype=f32, device=dev)
        ok = torch.empty(n, dtype=torch.bool, device=dev)
        if n == 0:
            return tokens, logprob, lse, in_logprobs, in_logits, ok
        outs = (tokens, logprob, lse, in_logprobs, in_logits, ok)
        ready = self.by_address(direct)
        if ready is not None:  # (the same launches, each tensor by its address: launch.POINTERS_AS_INTS)
            ptr = DATA_PTR
            inputs, outs = tuple(map(ptr, inputs)), tuple(map(ptr, outs))
            w_ptr, t_ptr, k_ptr, p_ptr, m_ptr, sd_ptr, of_ptr, ws_arg = map(
                ptr, (w_ptr, t_ptr, k_ptr, p_ptr, m_ptr, sd_ptr, of_ptr, ws))
        else:
            ws_arg = ws
        strides, w_stride = self.strides, self.w_stride
        args1 = (inputs, strides, w_vals, w_ptr, w_stride, t_ptr, t_val, ws_arg, *self.rest1)
        args2 = (inputs, strides, w_vals, w_ptr, w_stride, t_ptr, t_val, k_ptr, k_val, p_ptr, p_val, m_ptr, m_val,
                 sd_ptr, sd_val, of_ptr, of_val, ws_arg, *self.rest2, *outs, *self.rest1[-3:])
        self.launch(direct, ((self.grid1, args1), (self.grid2, args2)), ready)
        return tokens, logprob, lse, in_logprobs, in_logits, ok


_LAUNCHES = Plans()  # launch key -> SampleLaunch


def _settings() -> tuple:
    """The module-level settings a launch's plan reads (tests and tune_stage1.py change them; sample_launch's key
    holds them too)."""
    return STAGE1_WARPS_WIDE, MAX_CANDIDATES, POOL_PER_ROW, POOL_MAX


def sample_launch(n, v, block, nin, filters, strides, w_stride, tensors, t_val, k_val, p_val, m_val, sd_val,
                  of_val) -> SampleLaunch:
    """The :class:`SampleLaunch` of a call: ``tensors`` are the inputs, then the weight rows and the six row
    parameters' tensors (None where absent: a scalar); the values are the scalars' (0 for a tensor's)."""
    # What the two kernels' specialisations and the plan depend on (launch.DirectLaunch.key): the constexprs and
    # options (from nin, the parameters' kinds, filters, block, the module's settings), the integers' values or
    # classes, the pointers' dtypes and 16-byte alignment (the workspace and outputs are fresh allocations: aligned;
    # an absent weight or row-parameter tensor: None).
    key = (n, v, block, *_settings(), filters, strides, w_stride, tensor_key(*tensors), type(t_val), type(p_val),
           type(m_val), int_class(k_val), int_class(sd_val), int_class(of_val))
    return _LAUNCHES.get(key, lambda: SampleLaunch(key, n, v, nin, block, filters, strides, w_stride,
                                                   tuple(t is not None for t in tensors[nin:])))


def launch_guided_sample(
    logits: torch.Tensor,
    guides: list[torch.Tensor],
    weight_scalars: list[float],
    weight_rows: torch.Tensor | None,
    temperature: torch.Tensor | None,
    temperature_s: float,
    top_k: torch.Tensor | None,
    top_k_s: int,
    top_p: torch.Tensor | None,
    top_p_s: float,
    min_p: torch.Tensor | None,
    min_p_s: float,
    seed: torch.Tensor | None,
    seed_s: int,
    offset: torch.Tensor | None,
    offset_s: int,
    vocab_size: int,
    filters: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two stages; also registered below as ``torch.ops.ivg_kernels.guided_sample``.

    Scalars are passed by value, tensors ``[N]`` by pointer; ``weight_rows`` is an optional
    float32 ``[N, G]`` that replaces ``weight_scalars``. ``filters`` False skips the candidate
    lists (no row can have top-k/top-p/min-p active); ``block`` 0 picks the slice width.

    The kernels are launched directly, never through ``wrap_triton``: torch's higher-order-op
    path would cost about a millisecond per eager call and keep every call's arguments alive in
    its side table. Eager calls come here without the op's dispatch (``sampling.py``).
    """
    run, args = bind_guided_sample(logits, guides, weight_scalars, weight_rows, temperature, temperature_s, top_k,
                                   top_k_s, top_p, top_p_s, min_p, min_p_s, seed, seed_s, offset, offset_s, vocab_size,
                                   filters, block)
    return run(*args)


def bind_guided_sample(logits, guides, weight_scalars, weight_rows, temperature, temperature_s, top_k, top_k_s, top_p,
                       top_p_s, min_p, min_p_s, seed, seed_s, offset, offset_s, vocab_size, filters, block):
    """``(SampleLaunch, its call's arguments)`` for :func:`launch_guided_sample`'s arguments."""
    inputs = (logits, *guides)
    nin = len(inputs)
    strides = tuple(x.stride(0) for x in inputs)
    w_vals = (*map(float, weight_scalars), *([0.0] * (6 - len(weight_scalars))))  # fp32 arguments
    w_stride = weight_rows.stride(0) if weight_rows is not None else 0
    t_ptr, t_val, _ = _param(temperature, temperature_s, torch.float32)
    k_ptr, k_val, _ = _param(top_k, top_k_s, torch.int64)
    p_ptr, p_val, _ = _param(top_p, top_p_s, torch.float32)
    m_ptr, m_val, _ = _param(min_p, min_p_s, torch.float32)
    sd_ptr, sd_val, _ = _param(seed, seed_s, torch.int64)
    of_ptr, of_val, _ = _param(offset, offset_s, torch.int64)
    run = sample_launch(logits.shape[0], vocab_size, block, nin, filters, strides, w_stride,
                        (*inputs, weight_rows, t_ptr, k_ptr, p_ptr, m_ptr, sd_ptr, of_ptr),
                        t_val, k_val, p_val, m_val, sd_val, of_val)

    def ptr(x):
        return logits if x is None else x

    return run, (inputs, w_vals, ptr(weight_rows), ptr(t_ptr), t_val, ptr(k_ptr), k_val, ptr(p_ptr), p_val,
                 ptr(m_ptr), m_val, ptr(sd_ptr), sd_val, ptr(of_ptr), of_val)


# An opaque custom op for torch.compile(fullgraph=True): one node with the fake below (inductor cannot
# trace kernels that take tuples of tensors). CUDA-graph capture records its two launches either way.
guided_sample_op = torch.library.custom_op("ivg_kernels::guided_sample", mutates_args=())(launch_guided_sample)


@guided_sample_op.register_fake
def _guided_sample_fake(logits, guides, weight_scalars, weight_rows, temperature, temperature_s, top_k, top_k_s,
                        top_p, top_p_s, min_p, min_p_s, seed, seed_s, offset, offset_s, vocab_size, filters, block):
    n, nin = logits.shape[0], 1 + len(guides)
    f32 = torch.float32
    return (logits.new_empty((n,), dtype=torch.int64), logits.new_empty((n,), dtype=f32),
            logits.new_empty((n, nin), dtype=f32), logits.new_empty((n, nin), dtype=f32),
            logits.new_empty((n, nin), dtype=f32), logits.new_empty((n,), dtype=torch.bool))
