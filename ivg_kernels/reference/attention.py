"""Paged KV writes and attention in plain torch: the specification, CPU path and test oracle.

Cache layout, per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``.
Token position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size``. A query at position ``q`` attends to keys at positions ``k <= q`` with
``q - k < sliding_window`` when a window is set (Mistral's rule). Query head ``h`` reads KV head
``h // (num_heads // num_kv_heads)`` (grouped-query attention).

Two options change the softmax, as Gemma 2 and gpt-oss use them (transformers' eager attention is the
definition): ``softcap`` caps every scaled score ``s`` to ``softcap * tanh(s / softcap)`` before the mask
and the softmax; ``sinks`` (``[num_heads]``) adds one logit per query head to the softmax's denominator,
a key that every query sees and whose value is zero: ``out = sum_j e^(s_j) v_j / (e^(sink) + sum_j e^(s_j))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dtypes import as_dtype
from .slices import rows_per_slice


def write_kv_ref(k_cache, v_cache, key, value, slot_mapping) -> None:
    """Store ``key``/``value`` ``[T, H_kv, D]`` at ``slot_mapping`` ``[T]`` (slots < 0 are skipped)."""
    slots = slot_mapping.long()
    # Skip negative slots; on the CPU only when there are any (the check is cheap there).
    if slots.device.type != "cpu" or (slots.numel() and int(slots.min()) < 0):
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    h, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, h, d).index_copy_(0, slots, as_dtype(key, k_cache.dtype))
    v_cache.view(-1, h, d).index_copy_(0, slots, as_dtype(value, v_cache.dtype))


def _slots(block_table, start: int, stop: int, block_size: int) -> torch.Tensor:
    """int64 ``[N * (stop - start)]``: the slots of positions ``start:stop`` of every row, row after row."""
    first, last = start // block_size, -(-stop // block_size)
    cut = slice(start - first * block_size, stop - first * block_size)
    if block_table.device.type == "cpu":  # numpy: a third of torch's per-operation cost for the few rows of a step
        t = block_table.numpy()[:, first:last].astype(np.int64) * block_size
        return torch.from_numpy((t[:, :, None] + np.arange(block_size)).reshape(len(t), -1)[:, cut].reshape(-1))
    t = block_table[:, first:last].long() * block_size
    return (t.unsqueeze(2) + torch.arange(block_size, device=t.device)).view(len(t), -1)[:, cut].reshape(-1)


def _gather_slots(cache, slots, rows: int, length: int):
    """[rows, length, H_kv, D]: the cache's ``slots`` (int64 [rows * length], row after row). Slots, not
    whole blocks cut to the keys read: in the batched IVG run of ``bench_published.py`` (256 rows, one CPU
    thread) the gathers and attention took 16% less op time so (no unread tail of each row's last block
    copied, and a contiguous result for the attention)."""
    return cache.flatten(0, 1).index_select(0, slots).view(rows, length, cache.shape[2], cache.shape[3])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the attention computes in for inputs of ``dtype``: float32 for float32, float64 for the rest.

    16-bit inputs take float64 so that a row's result, once rounded back to 16 bits, does not depend on the other
    rows of its call. A call pads its rows to the longest one's keys (masked), and torch's CPU attention sums a
    row's keys in an order that depends on that padded length: in float32 a row attended in a batch of mixed
    lengths rounded differently from the row alone in 2,837 of 3,200 rows, and still in 23 of 3,200 once rounded
    to bfloat16, enough for a bfloat16 model's tokens to depend on the batch (6 of 64 IVG prompts decoded
    together differed from each decoded alone, ``benchmarks/batch_invariance.py`` on random-weight models). In
    float64 the two results round to the same 16-bit value unless they lie within about 2**-45 of a rounding
    boundary: none of those rows and prompts differed, at a cost of 0-17% of a bfloat16 decode on the CPU.
    float32 inputs stay in float32 (float32 products and attention round a row's last place by the batch too,
    which has not changed a token in those runs: results_notes.md)."""
    return torch.float32 if dtype == torch.float32 else torch.float64


def _attend(q, k, v, allowed, scale, clear=True, softcap=None, sinks=None):
    """q [N, M, H, D], k/v [N, L, Hkv, D], allowed [N, M, L] (None: every key) -> [N, M, H, D] in
    :func:`accumulation_dtype`. ``clear=False``: the caller knows every query allows a key (no 0/0 to set to 0).
    ``softcap``/``sinks``: see the module's docstring (then the scores are formed here, not by SDPA)."""
    if softcap is not None or sinks is not None:
        if allowed is None:
            allowed = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
        out, lse = _attend_lse(q, k, v, allowed, scale, softcap)
        return _sink(out, lse, sinks)
    acc = accumulation_dtype(q.dtype)
    # softmax(q k^T * scale, over allowed keys) v, query head h reading KV head h // (H / H_kv)
    out = torch.nn.functional.scaled_dot_product_attention(
        *(as_dtype(t, acc).transpose(1, 2) for t in (q, k, v)),  # (N, H, M|L, D)
        attn_mask=None if allowed is None else allowed.unsqueeze(1), scale=scale, enable_gqa=True,
    ).transpose(1, 2)
    return out if allowed is None or not clear else out.nan_to_num(0.0)  # (N, M, H, D); no allowed key: 0


def _length_range(seq_lens):
    """The rows' shortest and longest lengths if they are known on the host without waiting for a device
    (CPU tensors), else None."""
    if seq_lens.device.type != "cpu":
        return None
    lo, hi = torch.aminmax(seq_lens)
    return int(lo), int(hi)


@dataclass
class DecodePlan:
    """What :func:`paged_decode_attention_ref` computes from the tables alone, for every layer at once: the
    slots of the keys each row reads, and the mask of mixed lengths."""

    slots: torch.Tensor  # int64 [N * L]: the slots of each row's key positions start .. start + L - 1
    length: int  # L
    allowed: torch.Tensor | None  # bool [N, 1, L] for rows of mixed lengths; None: every key (one length)


def decode_plan(block_table, seq_lens, block_size, sliding_window=None) -> DecodePlan | None:
    """The gather indices and mask of :func:`paged_decode_attention_ref` (the layer-independent part of its
    work), or None when there is no key to attend (no row, or a common length of 0)."""
    n, width = block_table.shape[0], block_table.shape[1] * block_size
    if n == 0 or width == 0:
        return None
    known = _length_range(seq_lens)
    same = known[0] if known is not None and known[0] == known[1] else None
    if same is not None:  # rows that all hold ``same`` tokens: the keys they allow, unmasked
        if same == 0:
            return None
        lo = max(0, same - sliding_window) if sliding_window is not None else 0
        return DecodePlan(_slots(block_table, lo, same, block_size), same - lo, None)
    # Mixed lengths: up to the longest row (known on the host for CPU tensors; else the table's width,
    # which a device's lengths give without a wait), each row's own keys allowed.
    if known is not None:
        width = max(known[1], 1)
    pos = torch.arange(width, device=block_table.device)
    lens = seq_lens.long().unsqueeze(1)
    allowed = pos < lens  # [N, L]
    if sliding_window is not None:
        allowed &= pos >= lens - sliding_window
    return DecodePlan(_slots(block_table, 0, width, block_size), width, allowed.unsqueeze(1))


def paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, *, scale, sliding_window=None,
                               plan=None, softcap=None, sinks=None):
    """One query per row at position ``seq_lens - 1``; q ``[N, H, D]`` -> ``[N, H, D]``.

    On the CPU, rows that all have one length (the beams of one prompt) are attended without a mask.
    (Attending each run of equal lengths on its own measured no faster in the decoder than one masked
    call over all rows, so mixed lengths take the mask.) The rows go in slices of at most
    ``CPU_GATHER_BYTES`` of gathered keys and values there. ``plan``: :func:`decode_plan` of these
    arguments, made once and reused by every layer of a forward (the same tables give the same plan)."""
    if plan is None:
        plan = decode_plan(block_table, seq_lens, k_cache.shape[1], sliding_window)
        if plan is None:
            return torch.zeros_like(q)
    n, length = q.shape[0], plan.length
    row_bytes = 2 * length * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()  # its keys and values
    step = rows_per_slice(q.device, n, row_bytes, CPU_GATHER_BYTES)
    if step >= n:
        return _decode_rows(q, k_cache, v_cache, plan.slots, plan.allowed, scale, softcap, sinks)
    out = torch.empty_like(q)
    for i in range(0, n, step):
        j = min(n, i + step)
        out[i:j] = _decode_rows(q[i:j], k_cache, v_cache, plan.slots[i * length:j * length],
                                None if plan.allowed is None else plan.allowed[i:j], scale, softcap, sinks)
    return out


# The CPU decode attention gathers the keys and values of at most this many bytes per intra-op thread at a time (a
# row's are 2 * L * H_kv * D * itemsize), so that they are still in the cores' L2 caches when the attention reads
# them. In the batched IVG run of ``bench_published.py`` (256 rows of up to 45 keys, 4 KV heads of 32, float32: up
# to 11.8 MB per layer at once, 22 rows per 1 MiB) the gathers and the attention took 2.2x less time in slices than
# in one call on one thread (SDPA 316 -> 110 ms, gathers 157 -> 105 ms under the profiler); on two threads the run
# took 0.89 s with 2 MiB a call, 0.95 s with 1 MiB, 0.98 s in one call. On one intra-op thread each row's output is
# the same bit for bit in slices or not; with several, torch's CPU attention shares a call's work between the
# threads by the call's size, so a row may round differently in the last place, as between batches of other sizes.
CPU_GATHER_BYTES = 1 << 20


def _decode_rows(q, k_cache, v_cache, slots, allowed, scale, softcap, sinks):
    """Rows ``q`` ``[n, H, D]`` attending the keys at ``slots`` (``n * L``, row after row) where ``allowed``."""
    n = q.shape[0]
    length = slots.shape[0] // n
    k = _gather_slots(k_cache, slots, n, length)
    v = _gather_slots(v_cache, slots, n, length)
    return as_dtype(_attend(q.unsqueeze(1), k, v, allowed, scale, softcap=softcap, sinks=sinks).squeeze(1), q.dtype)


PREFILL_BATCH_ELEMENTS = 1 << 22  # padded query x key positions attended per batched call


def paged_prefill_attention_ref(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale,
                                sliding_window=None, plan=None, softcap=None, sinks=None):
    """Ragged queries: sequence b owns q rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, the last tokens of
    its ``seq_lens[b]`` (already written to the cache). q ``[T, H, D]`` -> ``[T, H, D]``.

    Consecutive sequences are attended together, padded to the longest of them, in groups of at most
    ``PREFILL_BATCH_ELEMENTS`` padded (query, key) pairs; padding is masked out, so the grouping
    changes nothing but the number of calls. ``plan``: :func:`prefill_plan` of these arguments, made
    once and reused by every layer of a forward (the same tables give the same plan)."""
    if plan is None:
        plan = prefill_plan(block_table, seq_lens, cu_seqlens_q, k_cache.shape[1], sliding_window)
    groups = plan.groups
    if len(groups) == 1 and groups[0].rows is None and groups[0].first == 0 and groups[0].last == q.shape[0]:
        return _prefill_group(q, k_cache, v_cache, groups[0], scale, softcap, sinks)  # every query, in order
    out = torch.zeros_like(q)
    for g in groups:
        if g.rows is None:
            out[g.first:g.last] = _prefill_group(q, k_cache, v_cache, g, scale, softcap, sinks)
        else:
            out.index_copy_(0, g.rows, _prefill_group(q, k_cache, v_cache, g, scale, softcap, sinks))
    return out


@dataclass
class PrefillGroup:
    """Consecutive sequences attended as one padded batch ``[n, m_max]`` of queries over ``l_max`` keys."""

    slots: torch.Tensor  # int64 [n * l_max]: the slots of their first l_max positions, row after row
    l_max: int
    allowed: torch.Tensor  # bool [n, m_max, l_max]: the keys each (padded) query attends
    rows: torch.Tensor | None  # the q rows of the valid queries, or None when q[first:last] fills the batch
    valid: torch.Tensor | None  # bool [n, m_max], or None when no query is padding
    first: int  # the group's q rows (without padding: first:last in order, m_max per sequence)
    last: int
    clear: bool = True  # some query may allow no key (padding, or a window under 1): its 0/0 is set to 0


@dataclass
class PrefillPlan:
    """What :func:`paged_prefill_attention_ref` computes from the tables alone, for every layer at once."""

    groups: list


def prefill_plan(block_table, seq_lens, cu_seqlens_q, block_size, sliding_window=None) -> PrefillPlan:
    """The groups of consecutive sequences :func:`paged_prefill_attention_ref` attends together, with
    their masks and gather indices (the layer-independent part of its work)."""
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    todo = [b for b in range(len(lens)) if cu[b + 1] > cu[b]]
    groups, start = [], 0
    while start < len(todo):
        end, m_max, l_max = start, 0, 0
        while end < len(todo):  # grow the group while its padded size stays within the budget
            b = todo[end]
            m2, l2 = max(m_max, cu[b + 1] - cu[b]), max(l_max, lens[b])
            if end > start and (end + 1 - start) * m2 * l2 > PREFILL_BATCH_ELEMENTS:
                break
            m_max, l_max, end = m2, l2, end + 1
        groups.append(_plan_group(block_table, todo[start:end], cu, lens, m_max, l_max, block_size, sliding_window))
        start = end
    return PrefillPlan(groups)


def _plan_group(block_table, seqs, cu, lens, m_max, l_max, block_size, sliding_window) -> PrefillGroup:
    dev = block_table.device
    table = block_table if seqs == list(range(block_table.shape[0])) else block_table.index_select(
        0, torch.tensor(seqs, device=dev))
    slots = _slots(table, 0, l_max, block_size)
    counts = [cu[b + 1] - cu[b] for b in seqs]
    m = torch.tensor(counts, device=dev)  # queries per sequence
    j = torch.arange(m_max, device=dev)
    dense = all(c == m_max for c in counts) and all(cu[b] == cu[seqs[0]] + i * m_max for i, b in enumerate(seqs))
    valid = None if dense else j.unsqueeze(0) < m.unsqueeze(1)  # [n, m_max]
    rows = None if dense else (torch.tensor([cu[b] for b in seqs], device=dev).unsqueeze(1) + j).masked_select(valid)
    q_pos = (torch.tensor([lens[b] for b in seqs], device=dev) - m).unsqueeze(1) + j  # [n, m_max]
    k_pos = torch.arange(l_max, device=dev)
    allowed = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(2)  # [n, m_max, l_max]
    if valid is not None:
        allowed &= valid.unsqueeze(2)
    if sliding_window is not None:
        allowed &= q_pos.unsqueeze(2) - k_pos.view(1, 1, -1) < sliding_window
    clear = valid is not None or (sliding_window is not None and sliding_window < 1)  # else each query allows itself
    return PrefillGroup(slots, l_max, allowed, rows, valid, cu[seqs[0]], cu[seqs[0]] + len(seqs) * m_max, clear)


def _prefill_group(q, k_cache, v_cache, g: PrefillGroup, scale, softcap=None, sinks=None):
    """One group's queries (padded to ``[n, m_max]``) attended over their ``l_max`` keys: the output of its
    valid queries, ``[last - first, H, D]`` in order, or in the order of ``g.rows``."""
    n, m_max = g.allowed.shape[:2]
    k = _gather_slots(k_cache, g.slots, n, g.l_max)  # [n, l_max, Hkv, D]
    v = _gather_slots(v_cache, g.slots, n, g.l_max)
    if g.rows is None:  # no padding: the group's rows of q, in order
        qp = q[g.first:g.last].reshape(n, m_max, q.shape[1], q.shape[2])
        out = _attend(qp, k, v, g.allowed, scale, g.clear, softcap, sinks)
        return as_dtype(out.reshape(-1, q.shape[1], q.shape[2]), q.dtype)
    qp = q.new_zeros(n, m_max, q.shape[1], q.shape[2])
    qp[g.valid] = q.index_select(0, g.rows)
    return as_dtype(_attend(qp, k, v, g.allowed, scale, softcap=softcap, sinks=sinks)[g.valid], q.dtype)


def _attend_lse(q, k, v, allowed, scale, softcap=None):
    """q [N, M, H, D], k/v [N, L, Hkv, D], allowed [N, M, L] -> (out [N, M, H, D], lse [N, M, H]) in
    :func:`accumulation_dtype`: the normalised attention and the log-sum-exp of the scaled (and, with ``softcap``,
    capped) scores over the allowed keys (out 0 and lse -inf where none is allowed)."""
    acc = accumulation_dtype(q.dtype)
    n, m, h, d = q.shape
    hkv = k.shape[2]
    qg = q.to(acc).reshape(n, m, hkv, h // hkv, d)
    s = torch.einsum("nmkgd,nlkd->nmkgl", qg, k.to(acc)) * scale  # [N, M, Hkv, G, L]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed[:, :, None, None, :], -torch.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with lse = -inf give 0
    out = torch.einsum("nmkgl,nlkd->nmkgd", p, v.to(acc))
    return out.reshape(n, m, h, d), lse.reshape(n, m, h)


def _sink(out, lse, sinks):
    """``out`` [..., H, D] with log-sum-exp ``lse`` [..., H] renormalised for the attention ``sinks`` [H] (None:
    ``out``): each head's softmax gains one more term, ``e^(sink)``, in its denominator, and no value."""
    if sinks is None:
        return out
    keep = torch.exp(lse - torch.logaddexp(lse, sinks.to(lse.dtype)))  # sum e^s / (sum e^s + e^sink); 0 for no key
    return out * keep.unsqueeze(-1)


def check_shared_prefix(block_table, seq_lens, group_starts, shared_lens, block_size) -> None:
    """Raise ``ValueError`` unless ``group_starts`` splits the rows into consecutive groups (empty ones
    allowed: padding of fixed-size buffers) and every row of group g holds its first ``shared_lens[g]`` tokens in the same blocks as the group's
    first row (and has at least that many)."""
    n = block_table.shape[0]
    starts = group_starts.long()
    if (starts.numel() < 2 or int(starts[0]) != 0 or int(starts[-1]) != n
            or bool((starts[1:] < starts[:-1]).any())):
        raise ValueError(f"group_starts={starts.tolist()[:9]}: expected non-decreasing offsets from 0 to the {n} rows")
    counts = starts[1:] - starts[:-1]
    shared = shared_lens.long()
    shortest = torch.segment_reduce(seq_lens.double(), "min", lengths=counts).clamp(max=2 ** 62).long()  # empty: big
    bad = (shared < 0) | (shared > shortest)
    if bool(bad.any()):
        g = int(bad.nonzero()[0])
        raise ValueError(f"shared_lens[{g}]={int(shared[g])}: expected 0 to {int(shortest[g])}, the shortest row "
                         f"of group {g}")
    first = starts[:-1].repeat_interleave(counts)  # each row's group's first row
    blocks = (-(-shared // block_size)).repeat_interleave(counts)
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    differ = ((block_table != block_table[first]) & (cols < blocks.unsqueeze(1))).any(dim=1)  # [N]
    if bool(differ.any()):
        r = int(differ.nonzero()[0])
        g = int(torch.searchsorted(starts, torch.tensor(r, device=starts.device), right=True)) - 1
        raise ValueError(f"shared_lens[{g}]={int(shared[g])}: rows {int(starts[g])}..{int(starts[g + 1]) - 1} do "
                         f"not hold their first {int(shared[g])} tokens in the same blocks")


@dataclass
class SharedDecodePlan:
    """What :func:`shared_prefix_decode_attention_ref` computes from the tables alone, for every layer at once:
    the group slots' rows, the slots of each group's shared keys and of each row's own keys, and their masks."""

    rows: torch.Tensor  # int64 [G, R]: each group slot's row (padding repeats the last row)
    valid: torch.Tensor  # bool [G, R]: the slots that hold a row of the group
    valid_rows: torch.Tensor  # rows[valid]: the rows given a shared-part output, in that order
    prefix_slots: torch.Tensor | None  # int64 [G * S]: each group's first S keys, read from its first row's blocks
    prefix_len: int  # S (0: no group shares a key)
    prefix_allowed: torch.Tensor | None  # bool [G, R, S]
    suffix_slots: torch.Tensor | None  # int64 [N * L]: each row's own keys, from its shared length on
    suffix_len: int  # L (0: no row has a key of its own)
    suffix_allowed: torch.Tensor | None  # bool [N, 1, L]


def shared_decode_plan(block_table, seq_lens, group_starts, shared_lens, block_size,
                       sliding_window=None) -> SharedDecodePlan | None:
    """The gather indices and masks of :func:`shared_prefix_decode_attention_ref` (its layer-independent work,
    the group structure checked by :func:`check_shared_prefix` once), or None for no row."""
    n = block_table.shape[0]
    if n == 0:
        return None
    check_shared_prefix(block_table, seq_lens, group_starts, shared_lens, block_size)
    dev = block_table.device
    starts = group_starts.long()
    counts = starts[1:] - starts[:-1]
    shared = torch.where(counts > 0, shared_lens.long(), 0)  # an empty group's claim is ignored
    lens = seq_lens.long()
    lo = lens - sliding_window if sliding_window is not None else torch.zeros_like(lens)  # first key allowed
    # The shared part: each group's queries [G, R] against its prefix, read once from its first row's blocks.
    r_max, s_max = int(counts.max()), int(shared.max())
    j = torch.arange(r_max, device=dev)
    valid = j < counts.unsqueeze(1)  # [G, R]
    rows = (starts[:-1].unsqueeze(1) + j).clamp(max=n - 1)  # [G, R], padding repeats the last row
    prefix_slots = prefix_allowed = None
    if s_max > 0:
        table = block_table.index_select(0, starts[:-1].clamp(max=n - 1))
        prefix_slots = _slots(table, 0, s_max, block_size)
        k_pos = torch.arange(s_max, device=dev)
        prefix_allowed = (k_pos < shared.view(-1, 1, 1)) & valid.unsqueeze(2) & (k_pos >= lo[rows].unsqueeze(2))
    # Each row's own part: positions shared .. len - 1 of its own blocks.
    row_shared = shared.repeat_interleave(counts)
    l_max = int((lens - row_shared).max())
    suffix_slots = suffix_allowed = None
    if l_max > 0:
        pos = row_shared.unsqueeze(1) + torch.arange(l_max, device=dev)  # [N, L]
        col = (pos // block_size).clamp(max=block_table.shape[1] - 1)
        suffix_slots = (block_table.long().gather(1, col) * block_size + pos % block_size).flatten()
        suffix_allowed = ((pos < lens.unsqueeze(1)) & (pos >= lo.unsqueeze(1))).unsqueeze(1)
    return SharedDecodePlan(rows, valid, rows[valid], prefix_slots, s_max, prefix_allowed, suffix_slots, l_max,
                            suffix_allowed)


def shared_prefix_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, *,
                                       scale, sliding_window=None, plan=None, softcap=None, sinks=None):
    """:func:`paged_decode_attention_ref` for rows in groups that share the blocks of a prefix: the first
    ``shared_lens[g]`` tokens of every row of group ``g`` (rows ``group_starts[g]:group_starts[g+1]``)
    are read once for the whole group, each row's own tokens after them per row, and the two parts are
    merged exactly by their log-sum-exp. q ``[N, H, D]`` -> ``[N, H, D]``. ``plan``: :func:`shared_decode_plan`
    of these arguments, made once and reused by every layer of a forward (the same tables give the same plan)."""
    n = q.shape[0]
    if plan is None:
        plan = shared_decode_plan(block_table, seq_lens, group_starts, shared_lens, k_cache.shape[1], sliding_window)
        if plan is None:
            return torch.zeros_like(q)
    acc = accumulation_dtype(q.dtype)
    o_p = torch.zeros(n, q.shape[1], q.shape[2], dtype=acc, device=q.device)
    lse_p = torch.full(q.shape[:2], -torch.inf, dtype=acc, device=q.device)
    if plan.prefix_len > 0:
        g = plan.rows.shape[0]
        kp = _gather_slots(k_cache, plan.prefix_slots, g, plan.prefix_len)  # [G, S, Hkv, D]
        vp = _gather_slots(v_cache, plan.prefix_slots, g, plan.prefix_len)
        o, lse = _attend_lse(q[plan.rows], kp, vp, plan.prefix_allowed, scale, softcap)  # [G, R, H, D], [G, R, H]
        o_p[plan.valid_rows], lse_p[plan.valid_rows] = o[plan.valid], lse[plan.valid]
    if plan.suffix_len == 0:
        return _sink(o_p, lse_p, sinks).to(q.dtype)
    ks = _gather_slots(k_cache, plan.suffix_slots, n, plan.suffix_len)
    vs = _gather_slots(v_cache, plan.suffix_slots, n, plan.suffix_len)
    o_s, lse_s = _attend_lse(q.unsqueeze(1), ks, vs, plan.suffix_allowed, scale, softcap)
    o_s, lse_s = o_s.squeeze(1), lse_s.squeeze(1)
    lse = torch.logaddexp(lse_p, lse_s)
    w_p = torch.exp(lse_p - lse).nan_to_num(0.0).unsqueeze(2)  # both -inf: no key at all, the output is 0
    w_s = torch.exp(lse_s - lse).nan_to_num(0.0).unsqueeze(2)
    return _sink(w_p * o_p + w_s * o_s, lse, sinks).to(q.dtype)
