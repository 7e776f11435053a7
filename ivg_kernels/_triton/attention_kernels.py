"""Paged KV writes and paged attention in Triton (decode with a split over the KV length; ragged prefill).

Memory traffic per call: ``write_kv`` reads and writes 2 * T * H_kv * D elements. Decode reads each
row's K and V once (2 * seq_len * H_kv * D elements; a program serves all query heads of one KV head,
so grouped-query attention does not re-read) plus q and a float32 partial per split. Prefill reads,
per query tile of BLOCK_M tokens, the K/V of the positions that tile may see.
Logit soft-capping (``SOFTCAP``: each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``, Gemma 2) and
attention sinks (``SINKS``: one logit per query head added to the softmax's denominator, gpt-oss) are compile-time
switches: without them a kernel compiles as before.
References: ivg_kernels/reference/attention.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .launch import DATA_PTR, KeyedKernels, Plans, cdiv, direct, int_class, next_power_of_2, packed, tensor_key


@triton.jit
def _write_kv_kernel(key, value, k_cache, v_cache, slots, stride_kt, stride_kh, stride_vt, stride_vh,
                     H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """One token: copy its H_kv x D keys and values into its slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < H * D
        h = offs // D
        d = offs % D
        k = tl.load(key + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(value + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache + slot * (H * D) + offs, k.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + slot * (H * D) + offs, v.to(v_cache.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, F32: tl.constexpr):
    """a @ b with float32 accumulation. F32 upcasts the operands (Triton 3.6's interpreter
    computes bfloat16 dots wrongly); IEEE keeps float32 operands out of TF32."""
    if F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _gather_kv(cache, block_table_row, pos, pmask, kvh, d, dmask, H_KV: tl.constexpr, D: tl.constexpr,
               BS: tl.constexpr):
    """[len(pos), DP] rows of one KV head at token positions ``pos`` of a sequence."""
    page = tl.load(block_table_row + pos // BS, mask=pmask, other=0).to(tl.int64)
    slot = page * BS + pos % BS
    return tl.load(cache + slot[:, None] * (H_KV * D) + kvh * D + d[None, :], mask=pmask[:, None] & dmask[None, :],
                   other=0.0)


@triton.jit
def _tanh(x):
    """tanh from one exponential (the interpreter has no libdevice): ``sign(x) (1 - e) / (1 + e)``, ``e = exp(-2|x|)``;
    its absolute error is a few float32 ulps of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softmax_step(qt, k, v, allowed, scale, m_i, l_i, acc, IEEE: tl.constexpr, F32: tl.constexpr, softcap,
                  SOFTCAP: tl.constexpr):
    """One tile of keys in the online softmax: scores of the queries ``qt`` against ``k`` where
    ``allowed`` (capped to ``softcap * tanh(s / softcap)`` with ``SOFTCAP``), the running max ``m_i``, sum
    ``l_i`` and unnormalised output ``acc`` updated."""
    s = _dot(qt, tl.trans(k), IEEE, F32)
    # The scale in float32: torch.compile's generated launcher passes a Python float as float64, which would
    # turn the running max into float64 inside the loop (Triton refuses a loop-carried type change).
    s = s * tl.cast(scale, tl.float32)
    if SOFTCAP:
        cap = tl.cast(softcap, tl.float32)
        s = cap * _tanh(s / cap)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, F32)
    return m_new, l_i, acc


@triton.jit
def _normalised(acc, m_i, l_i, sinks, heads, hmask, SINKS: tl.constexpr):
    """The output of an online softmax: ``acc / l_i`` (0 where no key was allowed), or with ``SINKS`` each head's
    sink logit (``sinks[heads]``) in the denominator: ``acc e^(m - M) / (l e^(m - M) + e^(sink - M))``,
    ``M = max(m, sink)``."""
    if SINKS:
        sink = tl.load(sinks + heads, mask=hmask, other=0.0).to(tl.float32)
        top = tl.maximum(m_i, sink)
        a = tl.exp(m_i - top)  # 0 where no key was allowed (m_i = -inf)
        return acc * (a / (l_i * a + tl.exp(sink - top)))[:, None]
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def _decode_split_kernel(q, k_cache, v_cache, block_table, seq_lens, part_o, part_m, part_l, out, sinks,
                         stride_qn, stride_qh, stride_on, stride_oh, stride_bt, scale, window, chunk, SPLITS, softcap,
                         H_KV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         DP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                         F32: tl.constexpr, DIRECT: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr):
    """One (row, KV head, split): attention of the GROUP query heads over a KV range; unnormalised
    partials for the reduce kernel, or (DIRECT, a single split) the normalised output itself."""
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(seq_lens + n).to(tl.int32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, length)
    lo = tl.where(window > 0, tl.maximum(lo, length - window), lo)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    qt = tl.load(q + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :],
                 other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    bt_row = block_table + n * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        k = _gather_kv(k_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
        v = _gather_kv(v_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
        m_i, l_i, acc = _softmax_step(qt, k, v, pmask[None, :], scale, m_i, l_i, acc, IEEE, F32, softcap, SOFTCAP)
    if DIRECT:
        res = _normalised(acc, m_i, l_i, sinks, heads, gmask, SINKS)
        tl.store(out + n * stride_on + heads[:, None] * stride_oh + d[None, :], res.to(out.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
        return
    base = (n * (H_KV * GROUP) + heads) * SPLITS + sp  # [GP]
    tl.store(part_o + base[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    tl.store(part_m + base, m_i, mask=gmask)
    tl.store(part_l + base, l_i, mask=gmask)


@triton.jit
def _decode_reduce_kernel(part_o, part_m, part_l, out, sinks, stride_on, stride_oh, H, SPLITS,
                          D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr, SINKS: tl.constexpr):
    """Merge a (row, head)'s splits: softmax-weighted sum of the partial outputs (with ``SINKS``, the head's
    sink logit in the denominator)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // H
    h = pid % H
    s = tl.arange(0, SP)
    smask = s < SPLITS
    d = tl.arange(0, DP)
    dmask = d < D
    m = tl.load(part_m + pid * SPLITS + s, mask=smask, other=float("-inf"))
    l = tl.load(part_l + pid * SPLITS + s, mask=smask, other=0.0)
    o = tl.load(part_o + (pid * SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    mmax = tl.max(m, 0)
    if SINKS:
        sink = tl.load(sinks + h).to(tl.float32)
        top = tl.maximum(mmax, sink)
        w = tl.exp(m - top)
        res = tl.sum(o * w[:, None], 0) / (tl.sum(l * w, 0) + tl.exp(sink - top))
    else:
        m_safe = tl.where(mmax == float("-inf"), 0.0, mmax)
        w = tl.exp(m - m_safe)
        total = tl.sum(l * w, 0)
        res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + n * stride_on + h * stride_oh + d, res.to(out.dtype.element_ty), mask=dmask)


@triton.jit
def _prefill_kernel(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens, out, sinks,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, scale, window, softcap,
                    H_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                    F32: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr):
    """One (sequence, query head, tile of BLOCK_M new tokens): causal attention over the cached prefix and itself."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(cu_seqlens + b).to(tl.int64)
    m_len = (tl.load(cu_seqlens + b + 1) - q_start).to(tl.int32)
    if mt * BLOCK_M < m_len:
        length = tl.load(seq_lens + b).to(tl.int32)
        prefix = length - m_len
        kvh = h // GROUP
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < m_len
        d = tl.arange(0, DP)
        dmask = d < D
        qt = tl.load(q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        q_pos = prefix + rows
        hi = prefix + tl.minimum(m_len, (mt + 1) * BLOCK_M)
        lo = tl.where(window > 0, tl.maximum(0, prefix + mt * BLOCK_M - window + 1), 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DP], tl.float32)
        bt_row = block_table + b * stride_bt
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pmask = pos < hi
            k = _gather_kv(k_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
            v = _gather_kv(v_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
            allowed = pmask[None, :] & (pos[None, :] <= q_pos[:, None])
            allowed = allowed & ((window <= 0) | (q_pos[:, None] - pos[None, :] < window))
            m_i, l_i, acc = _softmax_step(qt, k, v, allowed, scale, m_i, l_i, acc, IEEE, F32, softcap, SOFTCAP)
        res = _normalised(acc, m_i, l_i, sinks, h + 0 * rows, rmask, SINKS)
        tl.store(out + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 res.to(out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _shared_prefix_kernel(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, part_o, part_m,
                          part_l, stride_qn, stride_qh, stride_bt, scale, window, chunk, SPLITS, softcap,
                          H_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                          F32: tl.constexpr, SOFTCAP: tl.constexpr):
    """One (group, KV head x tile of BLOCK_M (row, query head) pairs, split): every query of the tile
    over one range of the group's shared prefix, whose K/V is read once for the whole tile (from the
    group's first row's blocks). Unnormalised partials per (row, head, split) for the suffix kernel."""
    grp = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1) % H_KV
    mt = tl.program_id(1) // H_KV
    sp = tl.program_id(2)
    r0 = tl.load(group_starts + grp).to(tl.int64)
    nq = (tl.load(group_starts + grp + 1) - r0).to(tl.int32) * GROUP
    if mt * BLOCK_M < nq:
        shared = tl.load(shared_lens + grp).to(tl.int32)
        mi = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = mi < nq
        row = r0 + mi // GROUP
        head = kvh * GROUP + mi % GROUP
        d = tl.arange(0, DP)
        dmask = d < D
        qt = tl.load(q + row[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                     mask=mmask[:, None] & dmask[None, :], other=0.0)
        length = tl.load(seq_lens + row, mask=mmask, other=1).to(tl.int32)
        first = tl.where(window > 0, length - window, 0)  # first key each query may see
        lo = tl.maximum(sp * chunk, tl.min(tl.where(mmask, first, 2147483647), 0))
        hi = tl.minimum(sp * chunk + chunk, shared)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DP], tl.float32)
        bt_row = block_table + r0 * stride_bt
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pmask = pos < hi
            k = _gather_kv(k_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
            v = _gather_kv(v_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
            allowed = pmask[None, :] & (pos[None, :] >= first[:, None])
            m_i, l_i, acc = _softmax_step(qt, k, v, allowed, scale, m_i, l_i, acc, IEEE, F32, softcap, SOFTCAP)
        base = (row * (H_KV * GROUP) + head) * SPLITS + sp
        tl.store(part_o + base[:, None] * D + d[None, :], acc, mask=mmask[:, None] & dmask[None, :])
        tl.store(part_m + base, m_i, mask=mmask)
        tl.store(part_l + base, l_i, mask=mmask)


@triton.jit
def _shared_suffix_kernel(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, G, part_o, part_m,
                          part_l, out, sinks, stride_qn, stride_qh, stride_on, stride_oh, stride_bt, scale, window,
                          SPLITS, softcap, H_KV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          DP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                          F32: tl.constexpr, GS: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr):
    """One (row, KV head): start from the merged partials of the shared prefix, continue the online
    softmax over the row's own tokens after it, normalise and store. The row's group (and so its shared
    length) is the number of the ``G`` groups that end at or before it (``GS``: a power of two >= G)."""
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    length = tl.load(seq_lens + n).to(tl.int32)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    ph = (n * (H_KV * GROUP) + heads) * SPLITS  # [GP]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    # Unrolled by 8 so the splits' partials are loaded together, not one global round trip per split.
    for sp in tl.range(0, SPLITS, loop_unroll_factor=8):
        m_i = tl.maximum(m_i, tl.load(part_m + ph + sp, mask=gmask, other=float("-inf")))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for sp in tl.range(0, SPLITS, loop_unroll_factor=8):
        w = tl.exp(tl.load(part_m + ph + sp, mask=gmask, other=float("-inf")) - m_safe)
        l_i += w * tl.load(part_l + ph + sp, mask=gmask, other=0.0)
        acc += w[:, None] * tl.load(part_o + (ph + sp)[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :],
                                    other=0.0)
    qt = tl.load(q + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :],
                 other=0.0)
    gi = tl.arange(0, GS)
    ends = tl.load(group_starts + 1 + gi, mask=gi < G, other=2147483647)
    lo = tl.load(shared_lens + tl.sum((ends <= n).to(tl.int32), 0)).to(tl.int32)
    lo = tl.where(window > 0, tl.maximum(lo, length - window), lo)
    bt_row = block_table + n * stride_bt
    for start in range(lo, length, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < length
        k = _gather_kv(k_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
        v = _gather_kv(v_cache, bt_row, pos, pmask, kvh, d, dmask, H_KV, D, BS)
        m_i, l_i, acc = _softmax_step(qt, k, v, pmask[None, :], scale, m_i, l_i, acc, IEEE, F32, softcap, SOFTCAP)
    res = _normalised(acc, m_i, l_i, sinks, heads, gmask, SINKS)
    tl.store(out + n * stride_on + heads[:, None] * stride_oh + d[None, :], res.to(out.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers: plain functions that eager calls use directly, and torch ops (``triton_op``) over the same
# launchers with ``wrap_triton`` for torch.compile
# ----------------------------------------------------------------------------------------------
_TARGET_PROGRAMS = 264  # two waves of a 132-SM H100
_LONG_KEYS = 4096  # decode rows of at least this many keys (the table's width) read 16-bit caches in tiles of 64
# The shared-prefix kernel's largest tile of (row, query head) pairs: one program reads the prefix's keys once for
# this many queries (``benchmarks/diagnose_beam_group.py`` times smaller tiles, which make more programs)
_PREFIX_TILE_M = 64
# Every launch here asks for FMA contraction (Triton's default up to 3.9, which warns when it is left unset; 3.10
# turns it off by default), so the attention's rounding stays the same across Triton versions. The sampler and the
# speculative kernels launch without it: their draws must match the reference bit for bit.
_FUSED = {"enable_fp_fusion": True}


def _interpreted_bf16(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and triton_interpreted()


class WriteLaunch(KeyedKernels):
    """A KV write for one kind of call (heads, dims, strides, dtypes, alignment), made once (:func:`write_launch`),
    then called with a call's tensors (any number of tokens). Holds no tensor."""

    __slots__ = ("scalars",)

    def __init__(self, launch_key, key, value):
        _, h, d = key.shape
        self.scalars = (key.stride(0), key.stride(1), value.stride(0), value.stride(1))
        super().__init__(launch_key, (_write_kv_kernel,), (dict(H=h, D=d, BLOCK=next_power_of_2(h * d), **_FUSED),))

    def __call__(self, k_cache, v_cache, key, value, slot_mapping) -> None:
        t = key.shape[0]
        if t:
            self.launch(direct, (((t,), (key, value, k_cache, v_cache, slot_mapping, *self.scalars)),))


_WRITE_LAUNCHES = Plans()  # launch key -> WriteLaunch


def write_launch(k_cache, v_cache, key, value, slot_mapping) -> WriteLaunch:
    """The :class:`WriteLaunch` of an eager call with these arguments."""
    # what the kernel's specialisation depends on (launch.DirectLaunch.key)
    launch_key = (key.shape[1:], key.stride(), value.stride(), tensor_key(key, value, k_cache, v_cache, slot_mapping))
    return _WRITE_LAUNCHES.get(launch_key, lambda: WriteLaunch(launch_key, key, value))


def launch_write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slot_mapping: torch.Tensor, wrap=None) -> None:
    """Store new keys/values: one program per token. ``wrap``: ``wrap_triton`` inside the torch op
    (for torch.compile); eager calls run their :class:`WriteLaunch` (no op dispatch: ``attention.py``)."""
    if wrap is None:
        return write_launch(k_cache, v_cache, key, value, slot_mapping)(k_cache, v_cache, key, value, slot_mapping)
    t, h, d = key.shape
    if t == 0:
        return
    wrap(_write_kv_kernel)[(t,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        H=h, D=d, BLOCK=next_power_of_2(h * d), **_FUSED,
    )


@torch.library.triton_op("ivg_kernels::write_kv", mutates_args={"k_cache", "v_cache"})
def write_kv_op(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    from torch.library import wrap_triton

    launch_write_kv(k_cache, v_cache, key, value, slot_mapping, wrap=wrap_triton)


def _num_splits(n: int, h_kv: int, max_len: int, block_n: int) -> int:
    """Split the KV length until the grid fills the GPU, keeping at least 4 tiles per split."""
    tiles = cdiv(max(max_len, 1), block_n)
    want = cdiv(_TARGET_PROGRAMS, max(n * h_kv, 1))
    return max(1, min(want, tiles // 4 if tiles >= 8 else 1))


def _tile_keys(bs: int, ieee: bool, max_len: int, long_keys: int) -> int:
    """Keys per tile: 64 for blocks of 64 or more, and for 16-bit caches of at least ``long_keys`` keys (for
    float32 they would spill registers); else one block (at least 16), for the grid's sake on short rows."""
    return 64 if bs >= 64 or (not ieee and max_len >= long_keys) else max(16, bs)


def _prefix_splits(tiles: int, h_kv: int, max_len: int, block_n: int, block_m: int, elem: int) -> int:
    """Splits of the shared-prefix kernel: as many as fill the GPU (``_num_splits``), but each split's keys
    at least ``8 * block_m / elem``. A split writes float32 partials for its whole tile of ``block_m``
    queries (``4 * block_m`` bytes per dimension) while it reads two ``elem``-byte values per key and
    dimension, so this keeps the partials, which the suffix kernel reads back, at most a quarter of the
    prefix's bytes. (With the decode kernel's rule, 16 beams of a 2,048-token prompt took 33 splits of 64
    keys, and wrote and re-read as many partial bytes as the prefix holds.)"""
    fill = _num_splits(tiles, h_kv, max_len, block_n)
    return max(1, min(fill, max_len * elem // (8 * block_m)))


def _decode_plan(n: int, h: int, d: int, h_kv: int, bs: int, width: int, num_splits: int, ieee: bool, f32: bool):
    """What a decode launch derives from its shapes: ``(splits, chunk, parts, the partial buffers' float
    offsets and total, the split kernel's constexprs, the reduce kernel's)``. The three partial buffers share
    one allocation (:func:`launch.packed`: each on 16 bytes, as fresh allocations are)."""
    max_len = width * bs
    # Tiles of 64 keys for 16-bit caches from 4,096 keys on (for float32 they would spill registers): on the
    # H200 at bc7a757 tiles of 16 (one block) streamed 33% of copy at N=1 from 4,096 to 65,536 keys and 65% at
    # N=64, the per-tile work weighing on every key; shorter rows keep 16, for the grid's sake.
    block_n = _tile_keys(bs, ieee, max_len, _LONG_KEYS)
    splits = num_splits if num_splits > 0 else _num_splits(n, h_kv, max_len, block_n)
    chunk = cdiv(cdiv(max(max_len, 1), splits), block_n) * block_n
    one_split = splits == 1
    parts = 1 if one_split else n * h * splits
    (_, m_at, l_at), size = packed((parts * d * 4, parts * 4, parts * 4))  # float32 part_o, part_m, part_l
    dp = max(16, next_power_of_2(d))
    split_c = dict(H_KV=h_kv, GROUP=h // h_kv, GP=max(16, next_power_of_2(h // h_kv)), D=d, DP=dp, BS=bs,
                   BLOCK_N=block_n, IEEE=ieee, F32=f32, DIRECT=one_split)
    reduce_c = dict(D=d, DP=dp, SP=max(2, next_power_of_2(splits)))
    return splits, chunk, parts, (m_at // 4, l_at // 4, size // 4), split_c, reduce_c


def _extras(q, softcap: float, sinks):
    """The soft-capping and sink arguments of a launch: ``(softcap, the sinks' pointer (q's where there are
    none: never read), constexprs)``."""
    return softcap, (q if sinks is None else sinks), dict(SOFTCAP=softcap > 0, SINKS=sinks is not None)


def _partials(buf, m_at: int, l_at: int, by_address: bool) -> tuple:
    """The three float32 partial buffers (output, max, sum) that share ``buf``, the last two at float offsets
    ``m_at`` and ``l_at``: views of it, or, for a launch by address (``launch.POINTERS_AS_INTS``), addresses."""
    if by_address:
        at = DATA_PTR(buf)
        return at, at + 4 * m_at, at + 4 * l_at
    return buf, (buf[m_at:] if m_at else buf), (buf[l_at:] if l_at else buf)


class DecodeLaunch(KeyedKernels):
    """A decode launch for one kind of call (shapes, strides, dtypes, alignment, scalars): its plan, grids, scalar
    arguments and constexprs, made once (:func:`decode_launch`), then called with a call's tensors. Holds no
    tensor: a call's arguments live only as long as the call."""

    __slots__ = ("n", "splits", "m_at", "l_at", "size", "grid1", "grid2", "scalars1", "scalars2", "settings")

    def __init__(self, key, q, h_kv, bs, width, num_splits, bt_stride, scale, window, softcap, sinks):
        n, h, d = q.shape
        splits, chunk, _, (m_at, l_at, size), split_c, reduce_c = _decode_plan(
            n, h, d, h_kv, bs, width, num_splits, q.dtype == torch.float32, _interpreted_bf16(q))
        softcap, _, extra_c = _extras(q, softcap, sinks)
        out_stride = torch.empty_like(q, device="meta").stride()[:2]  # (every call's output's: q's shape and strides)
        self.n, self.splits, self.m_at, self.l_at, self.size = n, splits, m_at, l_at, size
        self.grid1, self.grid2 = (n, h_kv, splits), (n * h,)
        self.scalars1 = (q.stride(0), q.stride(1), *out_stride, bt_stride, scale, window, chunk, splits, softcap)
        self.scalars2 = (*out_stride, h, splits)
        self.settings = _settings()
        consts = [dict(split_c, **extra_c, **_FUSED), dict(reduce_c, SINKS=extra_c["SINKS"], **_FUSED)]
        fns = [_decode_split_kernel, _decode_reduce_kernel]
        super().__init__(key, fns[:1 if splits == 1 else 2], consts[:1 if splits == 1 else 2])

    def current(self) -> bool:
        """Whether the module's settings this launch was planned with still hold."""
        return self.settings == _settings()

    def __call__(self, q, k_cache, v_cache, block_table, seq_lens, sinks) -> torch.Tensor:
        out = torch.empty_like(q)
        if self.n == 0:
            return out
        # the three float32 partial buffers in one allocation (with one split the kernel writes the output
        # itself and never touches them: the one buffer stands for all three)
        buf = torch.empty(self.size, dtype=torch.float32, device=q.device)
        sinks_arg = q if sinks is None else sinks  # (no sinks: never read)
        ready = self.by_address(direct)
        if ready is not None:  # (the same launches, each tensor by its address: launch.POINTERS_AS_INTS)
            q, k_cache, v_cache, block_table, seq_lens, out_arg, sinks_arg = map(
                DATA_PTR, (q, k_cache, v_cache, block_table, seq_lens, out, sinks_arg))
        else:
            out_arg = out
        part_o, part_m, part_l = _partials(buf, *((0, 0) if self.splits == 1 else (self.m_at, self.l_at)),
                                           ready is not None)
        split = (self.grid1, (q, k_cache, v_cache, block_table, seq_lens, part_o, part_m, part_l, out_arg, sinks_arg,
                              *self.scalars1))
        if self.splits == 1:
            self.launch(direct, (split,), ready)
        else:
            self.launch(direct, (split, (self.grid2, (part_o, part_m, part_l, out_arg, sinks_arg, *self.scalars2))),
                        ready)
        return out


_DECODE_LAUNCHES = Plans()  # key -> DecodeLaunch


def _settings() -> tuple:
    """The module-level settings a decode or shared-prefix plan reads (tests and diagnostics change them)."""
    return _LONG_KEYS, _TARGET_PROGRAMS, _PREFIX_TILE_M


def decode_launch(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, softcap, sinks):
    """The :class:`DecodeLaunch` of an eager call with these arguments."""
    h_kv, bs = k_cache.shape[2], k_cache.shape[1]
    # what the kernels' specialisations and the plan depend on (launch.DirectLaunch.key): the shapes and strides,
    # the scalars (passed as the launch's constants), the pointers' dtypes and alignment (the partial buffers
    # and the output are fresh allocations), the interpreter and the module's settings
    key = (q.shape, q.stride(), h_kv, bs, block_table.shape[1], block_table.stride(0), num_splits,
           type(scale), scale, window, type(softcap), softcap, _interpreted_bf16(q), _settings(),
           tensor_key(q, k_cache, v_cache, block_table, seq_lens, sinks))
    return _DECODE_LAUNCHES.get(key, lambda: DecodeLaunch(key, q, h_kv, bs, block_table.shape[1], num_splits,
                                                          block_table.stride(0), scale, window, softcap, sinks))


def launch_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale: float, window: int,
                                  num_splits: int, softcap: float = 0.0, sinks=None, wrap=None) -> torch.Tensor:
    """Decode attention: the split kernel, then (with more than one split) the reduce kernel. ``softcap``
    (0.0: none) and ``sinks`` (None or ``[num_heads]``): see the module's docstring. Eager calls
    (``wrap`` None) run their :class:`DecodeLaunch`; the torch op (``wrap_triton``) launches through it."""
    if wrap is None:
        return decode_launch(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, softcap,
                             sinks)(q, k_cache, v_cache, block_table, seq_lens, sinks)
    n, h, d = q.shape
    h_kv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    if n == 0:
        return out
    # (separate outputs, as the compiler expects)
    splits, chunk, parts, _, split_c, reduce_c = _decode_plan(
        n, h, d, h_kv, bs, block_table.shape[1], num_splits, q.dtype == torch.float32, _interpreted_bf16(q))
    part_o = torch.empty((parts, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty((parts,), dtype=torch.float32, device=q.device)
    part_l = torch.empty((parts,), dtype=torch.float32, device=q.device)
    softcap, sinks_arg, extra_c = _extras(q, softcap, sinks)
    wrap(_decode_split_kernel)[(n, h_kv, splits)](
        q, k_cache, v_cache, block_table, seq_lens, part_o, part_m, part_l, out, sinks_arg,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0), scale, window, chunk, splits,
        softcap, **split_c, **extra_c, **_FUSED,
    )
    if splits == 1:
        return out
    wrap(_decode_reduce_kernel)[(n * h,)](
        part_o, part_m, part_l, out, sinks_arg, out.stride(0), out.stride(1), h, splits, **reduce_c,
        SINKS=extra_c["SINKS"], **_FUSED,
    )
    return out


@torch.library.triton_op("ivg_kernels::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, window: int,
                              num_splits: int, softcap: float = 0.0,
                              sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    from torch.library import wrap_triton

    return launch_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits,
                                         softcap, sinks, wrap=wrap_triton)


def _prefill_consts(q, h_kv, bs, softcap, sinks) -> dict:
    """The prefill kernel's constexprs and options for a call like this one."""
    t, h, d = q.shape
    return dict(H_KV=h_kv, GROUP=h // h_kv, D=d, DP=max(16, next_power_of_2(d)), BS=bs, BLOCK_M=_PREFILL_BLOCK_M,
                BLOCK_N=32 if bs < 32 else min(64, bs), IEEE=q.dtype == torch.float32, F32=_interpreted_bf16(q),
                **_extras(q, softcap, sinks)[2], **_FUSED)


_PREFILL_BLOCK_M = 16  # query rows per program


class PrefillLaunch(KeyedKernels):
    """A prefill launch for one kind of call (shapes, strides, dtypes, alignment, scalars): its grid, scalar
    arguments and constexprs, made once (:func:`prefill_launch`), then called with a call's tensors. Holds no
    tensor."""

    __slots__ = ("grid", "scalars", "empty")

    def __init__(self, key, q, h_kv, bs, b, max_seqlen_q, bt_stride, scale, window, softcap, sinks):
        t, h, _ = q.shape
        out_stride = torch.empty_like(q, device="meta").stride()[:2]  # (every call's output's: q's shape and strides)
        self.empty = t == 0 or b == 0
        self.grid = (b, h, cdiv(max(max_seqlen_q, 1), _PREFILL_BLOCK_M))
        self.scalars = (q.stride(0), q.stride(1), *out_stride, bt_stride, scale, window, softcap)
        super().__init__(key, (_prefill_kernel,), (_prefill_consts(q, h_kv, bs, softcap, sinks),))

    def __call__(self, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, sinks) -> torch.Tensor:
        out = torch.empty_like(q)
        if not self.empty:
            self.launch(direct, ((self.grid, (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out,
                                              q if sinks is None else sinks, *self.scalars)),))
        return out


_PREFILL_LAUNCHES = Plans()  # launch key -> PrefillLaunch


def prefill_launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q: int, scale: float,
                   window: int, softcap: float = 0.0, sinks=None) -> PrefillLaunch:
    """The :class:`PrefillLaunch` of an eager call with these arguments."""
    # What the kernel's specialisation depends on (launch.DirectLaunch.key: calls of any token count share it), and
    # what the grid and the scalar arguments add (one PrefillLaunch each).
    h, d = q.shape[1:]
    spec = (h, d, k_cache.shape[2], k_cache.shape[1], q.stride(), block_table.stride(0), int_class(window),
            type(scale), type(softcap), softcap > 0, tensor_key(q, k_cache, v_cache, block_table, seq_lens,
                                                                 cu_seqlens_q, sinks))
    key = (spec, q.shape[0], block_table.shape[0], max_seqlen_q, scale, window, softcap)
    return _PREFILL_LAUNCHES.get(key, lambda: PrefillLaunch(spec, q, k_cache.shape[2], k_cache.shape[1],
                                                            block_table.shape[0], max_seqlen_q, block_table.stride(0),
                                                            scale, window, softcap, sinks))


def launch_paged_prefill_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q: int,
                                   scale: float, window: int, softcap: float = 0.0, sinks=None,
                                   wrap=None) -> torch.Tensor:
    """Ragged prefill/extend attention: one program per (sequence, head, query tile). ``wrap``: ``wrap_triton``
    inside the torch op (for torch.compile); eager calls run their :class:`PrefillLaunch`."""
    if wrap is None:
        return prefill_launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale, window,
                              softcap, sinks)(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, sinks)
    t, h, _ = q.shape
    out = torch.empty_like(q)
    b = block_table.shape[0]
    if t == 0 or b == 0:
        return out
    wrap(_prefill_kernel)[(b, h, cdiv(max(max_seqlen_q, 1), _PREFILL_BLOCK_M))](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out, q if sinks is None else sinks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0), scale, window, softcap,
        **_prefill_consts(q, k_cache.shape[2], k_cache.shape[1], softcap, sinks),
    )
    return out


@torch.library.triton_op("ivg_kernels::paged_prefill_attention", mutates_args=())
def paged_prefill_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               max_seqlen_q: int, scale: float, window: int, softcap: float = 0.0,
                               sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    from torch.library import wrap_triton

    return launch_paged_prefill_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                                          scale, window, softcap, sinks, wrap=wrap_triton)


def _shared_plan(n, h, d, h_kv, bs, width, groups, max_group_rows, num_splits, ieee, f32, elem):
    """What a shared-prefix launch derives from its shapes: ``(block_m, query tiles, splits, chunk, the two
    kernels' shared constexprs)``."""
    group = h // h_kv
    block_m = min(_PREFIX_TILE_M, max(16, next_power_of_2(max(max_group_rows, 1) * group)))
    max_len = width * bs
    block_n = _tile_keys(bs, ieee, max_len, _LONG_KEYS // 2)  # the prefix: a tile of queries per tile of keys
    m_tiles = cdiv(max(max_group_rows, 1) * group, block_m)
    splits = num_splits if num_splits > 0 else _prefix_splits(groups * m_tiles, h_kv, max_len, block_n, block_m, elem)
    chunk = cdiv(cdiv(max(max_len, 1), splits), block_n) * block_n
    both = dict(H_KV=h_kv, GROUP=group, D=d, DP=max(16, next_power_of_2(d)), BS=bs, BLOCK_N=block_n, IEEE=ieee,
                F32=f32)
    return block_m, m_tiles, splits, chunk, both


class SharedLaunch(KeyedKernels):
    """A shared-prefix decode launch for one kind of call (shapes, groups, strides, dtypes, alignment, scalars),
    made once (:func:`shared_launch`), then called with a call's tensors. Holds no tensor."""

    __slots__ = ("n", "groups", "grid1", "grid2", "offsets", "size", "scalars1", "scalars2", "settings")

    def __init__(self, key, q, h_kv, bs, width, groups, max_group_rows, num_splits, bt_stride, scale, window,
                 softcap, sinks, elem):
        n, h, d = q.shape
        ieee, f32 = q.dtype == torch.float32, _interpreted_bf16(q)
        block_m, m_tiles, splits, chunk, both = _shared_plan(n, h, d, h_kv, bs, width, groups, max_group_rows,
                                                             num_splits, ieee, f32, elem)
        softcap, _, extra_c = _extras(q, softcap, sinks)
        out_stride = torch.empty_like(q, device="meta").stride()[:2]  # (every call's output's: q's shape and strides)
        parts = n * h * splits
        (_, m_at, l_at), size = packed((parts * d * 4, parts * 4, parts * 4))  # float32 part_o, part_m, part_l
        self.n, self.offsets, self.size, self.settings = n, (m_at // 4, l_at // 4), size // 4, _settings()
        self.grid1, self.grid2 = (groups, h_kv * m_tiles, splits), (n, h_kv)
        self.scalars1 = (q.stride(0), q.stride(1), bt_stride, scale, window, chunk, splits, softcap)
        self.scalars2 = (q.stride(0), q.stride(1), *out_stride, bt_stride, scale, window, splits, softcap)
        const1 = dict(both, BLOCK_M=block_m, SOFTCAP=extra_c["SOFTCAP"], num_warps=8 if both["BLOCK_N"] >= 64 else 4,
                      **_FUSED)
        const2 = dict(both, GP=max(16, next_power_of_2(h // h_kv)), GS=max(16, next_power_of_2(groups)), **extra_c,
                      **_FUSED)
        self.groups = groups
        super().__init__(key, (_shared_prefix_kernel, _shared_suffix_kernel), (const1, const2))

    def current(self) -> bool:
        """Whether the module's settings this launch was planned with still hold."""
        return self.settings == _settings()

    def __call__(self, q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, sinks) -> torch.Tensor:
        out = torch.empty_like(q)
        if self.n == 0:
            return out
        buf = torch.empty(self.size, dtype=torch.float32, device=q.device)  # the three partial buffers
        sinks_arg = q if sinks is None else sinks  # (no sinks: never read)
        tables = (q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens)
        ready = self.by_address(direct)
        if ready is not None:  # (the same launches, each tensor by its address: launch.POINTERS_AS_INTS)
            tables, (out_arg, sinks_arg) = tuple(map(DATA_PTR, tables)), map(DATA_PTR, (out, sinks_arg))
        else:
            out_arg = out
        part_o, part_m, part_l = _partials(buf, *self.offsets, ready is not None)
        self.launch(direct, (
            (self.grid1, (*tables, part_o, part_m, part_l, *self.scalars1)),
            (self.grid2, (*tables, self.groups, part_o, part_m, part_l, out_arg, sinks_arg, *self.scalars2))), ready)
        return out


_SHARED_LAUNCHES = Plans()  # key -> SharedLaunch


def shared_launch(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, max_group_rows, scale,
                  window, num_splits, softcap, sinks) -> SharedLaunch:
    """The :class:`SharedLaunch` of an eager call with these arguments."""
    h_kv, bs = k_cache.shape[2], k_cache.shape[1]
    # what the kernels' specialisations and the plan depend on (launch.DirectLaunch.key), as decode_launch's
    key = (q.shape, q.stride(), h_kv, bs, block_table.shape[1], block_table.stride(0), shared_lens.shape[0],
           max_group_rows, num_splits, type(scale), scale, window, type(softcap), softcap, _interpreted_bf16(q),
           _settings(), tensor_key(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, sinks))
    return _SHARED_LAUNCHES.get(key, lambda: SharedLaunch(
        key, q, h_kv, bs, block_table.shape[1], shared_lens.shape[0], max_group_rows, num_splits,
        block_table.stride(0), scale, window, softcap, sinks, k_cache.element_size()))


def launch_shared_prefix_decode_attention(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens,
                                          max_group_rows: int, scale: float, window: int, num_splits: int,
                                          softcap: float = 0.0, sinks=None, wrap=None) -> torch.Tensor:
    """Shared-prefix decode attention: the prefix kernel per (group, KV head x query tile, split), then
    the suffix kernel per (row, KV head), which merges the prefix partials. Eager calls (``wrap`` None) run
    their :class:`SharedLaunch`; the torch op (``wrap_triton``) launches through it."""
    if wrap is None:
        return shared_launch(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, max_group_rows,
                             scale, window, num_splits, softcap, sinks)(
            q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, sinks)
    n, h, d = q.shape
    h_kv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    groups = shared_lens.shape[0]
    if n == 0:
        return out
    block_m, m_tiles, splits, chunk, both = _shared_plan(
        n, h, d, h_kv, bs, block_table.shape[1], groups, max_group_rows, num_splits, q.dtype == torch.float32,
        _interpreted_bf16(q), k_cache.element_size())
    part_o = torch.empty((n * h * splits, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty((n * h * splits,), dtype=torch.float32, device=q.device)
    part_l = torch.empty((n * h * splits,), dtype=torch.float32, device=q.device)
    softcap, sinks_arg, extra_c = _extras(q, softcap, sinks)
    wrap(_shared_prefix_kernel)[(groups, h_kv * m_tiles, splits)](
        q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, part_o, part_m, part_l,
        q.stride(0), q.stride(1), block_table.stride(0), scale, window, chunk, splits, softcap,
        **both, BLOCK_M=block_m, SOFTCAP=extra_c["SOFTCAP"], num_warps=8 if both["BLOCK_N"] >= 64 else 4, **_FUSED,
    )
    wrap(_shared_suffix_kernel)[(n, h_kv)](
        q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, groups, part_o, part_m, part_l, out,
        sinks_arg, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0), scale, window,
        splits, softcap, **both, GP=max(16, next_power_of_2(h // h_kv)), GS=max(16, next_power_of_2(groups)),
        **extra_c, **_FUSED,
    )
    return out


@torch.library.triton_op("ivg_kernels::shared_prefix_decode_attention", mutates_args=())
def shared_prefix_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_table: torch.Tensor, seq_lens: torch.Tensor, group_starts: torch.Tensor,
                                      shared_lens: torch.Tensor, max_group_rows: int, scale: float, window: int,
                                      num_splits: int, softcap: float = 0.0,
                                      sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    from torch.library import wrap_triton

    return launch_shared_prefix_decode_attention(q, k_cache, v_cache, block_table, seq_lens, group_starts,
                                                 shared_lens, max_group_rows, scale, window, num_splits,
                                                 softcap, sinks, wrap=wrap_triton)
