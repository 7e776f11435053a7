"""Paged KV writes and attention in plain torch: the specification, CPU path and test oracle.

Cache layout, per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``.
Token position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size``. A query at position ``q`` attends to keys at positions ``k <= q`` with
``q - k < sliding_window`` when a window is set (Mistral's rule). Query head ``h`` reads KV head
``h // (num_heads // num_kv_heads)`` (grouped-query attention).
"""
from __future__ import annotations

import torch


def write_kv_ref(k_cache, v_cache, key, value, slot_mapping) -> None:
    """Store ``key``/``value`` ``[T, H_kv, D]`` at ``slot_mapping`` ``[T]`` (slots < 0 are skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    h, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, h, d).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, h, d).index_copy_(0, slots, value[keep].to(v_cache.dtype))


def _gather(cache, block_table, length):
    """[N, length, H_kv, D] positions 0..length-1 of every row (garbage past a row's own length)."""
    bs = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs  # [N, length]
    flat = cache.view(-1, cache.shape[2], cache.shape[3])
    return flat.index_select(0, slots.flatten()).view(*slots.shape, cache.shape[2], cache.shape[3])


def _attend(q, k, v, allowed, scale):
    """q [N, M, H, D], k/v [N, L, Hkv, D], allowed [N, M, L] -> [N, M, H, D] in float32 (float64 for float64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # softmax(q k^T * scale, over allowed keys) v, query head h reading KV head h // (H / H_kv)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(acc).transpose(1, 2), k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2),  # (N, H, M|L, D)
        attn_mask=allowed.unsqueeze(1), scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2).nan_to_num(0.0)  # (N, M, H, D); a row with no allowed key gives 0


def paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, *, scale, sliding_window=None):
    """One query per row at position ``seq_lens - 1``; q ``[N, H, D]`` -> ``[N, H, D]``."""
    n = q.shape[0]
    length = block_table.shape[1] * k_cache.shape[1]
    if n == 0 or length == 0:
        return torch.zeros_like(q)
    k, v = _gather(k_cache, block_table, length), _gather(v_cache, block_table, length)
    pos = torch.arange(length, device=q.device)
    lens = seq_lens.long().unsqueeze(1)
    allowed = pos < lens  # [N, L]
    if sliding_window is not None:
        allowed &= pos >= lens - sliding_window
    return _attend(q.unsqueeze(1), k, v, allowed.unsqueeze(1), scale).squeeze(1).to(q.dtype)


def paged_prefill_attention_ref(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale,
                                sliding_window=None):
    """Ragged queries: sequence b owns q rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, the last tokens of
    its ``seq_lens[b]`` (already written to the cache). q ``[T, H, D]`` -> ``[T, H, D]``."""
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        m = cu[b + 1] - cu[b]
        if m == 0:
            continue
        length = lens[b]
        k = _gather(k_cache, block_table[b:b + 1], length)
        v = _gather(v_cache, block_table[b:b + 1], length)
        q_pos = torch.arange(length - m, length, device=q.device).unsqueeze(1)  # [M, 1]
        k_pos = torch.arange(length, device=q.device).unsqueeze(0)  # [1, L]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= q_pos - k_pos < sliding_window
        out[cu[b]:cu[b + 1]] = _attend(q[cu[b]:cu[b + 1]].unsqueeze(0), k, v, allowed.unsqueeze(0), scale)[0].to(q.dtype)
    return out
