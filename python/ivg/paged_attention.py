"""The attention that the paged KV cache gives transformers' models.

``"ivg_paged"`` is registered with transformers' ``AttentionInterface`` (:func:`register_attention`). Each layer
it runs writes its new keys and values into the pages of ``module.layer_idx`` and attends through
``ivg_kernels.paged_decode_attention`` (one new token per sequence), ``shared_prefix_decode_attention`` (beam
groups) or ``paged_prefill_attention`` (prompts and multi-token chunks), with what one forward's layers share
in a :class:`PagedBatch` that :class:`~ivg.paged_model.PagedModel` builds. The lean forwards of
:mod:`ivg.lean_models` call :func:`attend` directly; :func:`paged_attention_forward` is the function transformers
calls, and refuses what it cannot compute exactly (a mask, a position bias, non-causal attention).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ivg_kernels.attention import run_decode, run_prefill, run_shared_decode, run_write_kv
from ivg_kernels.kv_pool import KVCache
from ivg_kernels.reference.attention import decode_plan, prefill_plan, shared_decode_plan

ATTN_IMPLEMENTATION = "ivg_paged"


@dataclass
class PagedBatch:
    """What every attention layer needs for one forward (built once per step, shared by all layers)."""

    cache: KVCache
    slot_mapping: torch.Tensor  # int64 [T]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B], lengths after this step
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    max_seqlen_q: int
    is_decode: bool  # one new token per sequence
    backend: str  # the attention ops' backend, resolved: "reference" or "triton" (attention_backend)
    groups: tuple | None = None  # decode over beam groups: (group_starts, shared_lens, max_group_rows)
    plans: dict = field(default_factory=dict)  # sliding window -> the reference's plan of this batch (_reference_plan)
    # twins (PagedModel.forward): for each slot of slot_mapping, the new token whose keys and values go there
    # (int64 [T + twins]); None: the T tokens' own
    write_rows: torch.Tensor | None = None
    attended: int = 0  # layers that attended through paged_attention_forward in this forward (check_attended)


def attend(b: PagedBatch, layer_idx: int, q, k, v, scale: float, sliding_window, softcap: float = 0.0,
           sinks=None) -> torch.Tensor:
    """One layer's paged attention for the batch ``b``: write the new keys/values ``[T, H_kv, D]`` into
    their slots, then attend ``q`` ``[T, H, D]`` (decode, shared-prefix decode, or ragged prefill), with the
    layer's logit soft-capping (``softcap``, 0.0 for none) and attention sinks (``[H]`` or None).

    The ops run without the public functions' argument checks (``ivg_kernels.attention.run_*``): the
    batch is built by ``PagedModel`` for its own cache, and checking it on every layer cost about a
    tenth of a one-row forward on the CPU."""
    k_cache, v_cache = b.cache.pool.layer(layer_idx)
    if b.write_rows is not None:  # twins get the keys and values of the token they share
        k, v = k.index_select(0, b.write_rows), v.index_select(0, b.write_rows)
    run_write_kv(b.backend, k_cache, v_cache, k, v, b.slot_mapping)
    plan = None
    if b.backend == "reference":
        plan = _reference_plan(b, sliding_window, k_cache.shape[1])
        if plan is None:  # a decode step with no key to attend (or no row)
            return torch.zeros_like(q)
    if b.is_decode and b.groups is not None:
        starts, shared, most = b.groups
        return run_shared_decode(b.backend, q, k_cache, v_cache, b.block_table, b.seq_lens, starts, shared, most,
                                 scale, sliding_window, plan=plan, softcap=softcap, sinks=sinks)
    if b.is_decode:
        return run_decode(b.backend, q, k_cache, v_cache, b.block_table, b.seq_lens, scale, sliding_window, plan=plan,
                          softcap=softcap, sinks=sinks)
    return run_prefill(b.backend, q, k_cache, v_cache, b.block_table, b.seq_lens, b.cu_seqlens_q, b.max_seqlen_q,
                       scale, sliding_window, plan, softcap=softcap, sinks=sinks)


def _reference_plan(b: PagedBatch, sliding_window, block_size: int):
    """The plain-torch attention's plan of the batch ``b`` for ``sliding_window`` (its masks, gather indices and
    beam groups: what every layer shares), made by its first layer: a shared-prefix, decode or prefill plan."""
    if sliding_window not in b.plans:
        if b.is_decode and b.groups is not None:
            starts, shared, _ = b.groups
            plan = shared_decode_plan(b.block_table, b.seq_lens, starts, shared, block_size, sliding_window)
        elif b.is_decode:
            plan = decode_plan(b.block_table, b.seq_lens, block_size, sliding_window)
        else:
            plan = prefill_plan(b.block_table, b.seq_lens, b.cu_seqlens_q, block_size, sliding_window)
        b.plans[sliding_window] = plan
    return b.plans[sliding_window]


# Arguments some families pass to their attention function that change its result, and what they are: the
# paged attention computes causal softmax attention (scaled, optionally windowed, soft-capped and with sinks),
# so it refuses them.
_UNSUPPORTED = {"position_bias": "an additive position bias"}


def _sinks(module, query, kwargs):
    """The attention sinks a layer passes (``s_aux=``, as gpt-oss, or ``sinks=``): None, or one logit per query
    head (a ``[H]`` tensor); any other form is refused."""
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (query.shape[1],):
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"{type(module).__name__} passes attention sinks of shape {shape}; ivg's paged attention "
                         f"takes one sink logit per query head ({query.shape[1]})")
    return sinks


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, ivg_batch: PagedBatch | None = None, **kwargs):
    """transformers attention function: query ``[1, H, T, D]``, key/value ``[1, H_kv, T, D]`` -> ``[1, T, H, D]``."""
    if ivg_batch is None:
        raise ValueError(
            "ivg_batch=None: a model loaded with attn_implementation='ivg_paged' runs through ivg.PagedModel "
            f"(and {type(module).__name__} must pass its forward's keyword arguments on to its attention)"
        )
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} passes {name}= ({what}) to its attention, which ivg's paged "
                             "attention does not implement: this model cannot run on the paged cache")
    if attention_mask is not None:
        raise ValueError(f"{type(module).__name__} passes an attention mask ({type(attention_mask).__name__}), which "
                         "ivg's paged attention does not read (it masks causally, and by sliding window, from the cache)")
    if kwargs.get("is_causal") is False:
        raise ValueError(f"{type(module).__name__} asks for non-causal attention (is_causal=False); ivg's paged "
                         "attention is causal")
    if query.shape[0] != 1:
        raise ValueError(f"query batch {query.shape[0]}: expected 1 (ragged batches are packed into one row)")
    sinks = _sinks(module, query, kwargs)
    softcap = kwargs.get("softcap")
    if softcap is not None and not 0 < softcap < float("inf"):
        raise ValueError(f"{type(module).__name__} soft-caps its attention logits at {softcap!r}: expected a positive "
                         "finite float")
    kv_heads, head_dim = ivg_batch.cache.pool.kv.shape[4:]
    heads, k_heads, k_dim, v_dim = query.shape[1], key.shape[1], key.shape[-1], value.shape[-1]
    if (value.shape[1] != k_heads or kv_heads % k_heads or heads % kv_heads or max(k_dim, v_dim) > head_dim
            or query.shape[-1] != k_dim):
        raise ValueError(f"{type(module).__name__} attends with {heads} query heads of {query.shape[-1]}, keys of "
                         f"{k_heads} heads of {k_dim} and values of {value.shape[1]} heads of {v_dim}; the paged "
                         f"cache holds {kv_heads} heads of {head_dim} (a layer's KV heads must divide it and it the "
                         "query heads; its keys and values may be narrower), as its config states")
    ivg_batch.attended += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    # A layer narrower than the cache (latent attention's values; Gemma 4's sliding layers, or its full ones with
    # fewer KV heads) is held padded to it, exactly: zero columns add nothing to q.k and give output columns that
    # are cut off; each KV head repeated r times is read by the same query heads as before (h // (H / H_kv)).
    if k_dim < head_dim:
        q, k = (torch.nn.functional.pad(x, (0, head_dim - k_dim)) for x in (q, k))
    if v_dim < head_dim:
        v = torch.nn.functional.pad(v, (0, head_dim - v_dim))
    if k_heads < kv_heads:
        k, v = (x.repeat_interleave(kv_heads // k_heads, dim=1) for x in (k, v))
    out = attend(ivg_batch, module.layer_idx, q, k, v, scale, sliding_window, float(softcap or 0.0), sinks)
    return (out if v_dim == head_dim else out[..., :v_dim]).unsqueeze(0), None  # (1, T, H, D_v)


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def check_attended(pm, batch: PagedBatch) -> None:
    """After a transformers forward of ``pm`` over ``batch``: every layer attended through the paged cache. A
    layer that did not (recurrent, convolution or linear-attention layers of a hybrid model; attention code of
    its own) kept no state per sequence and took the packed batch for one sequence."""
    layers = pm.cache.pool.kv.shape[0]
    if batch.attended > layers:
        raise ValueError(f"model: {type(pm.model).__name__}'s {layers} layers attended {batch.attended} times through "
                         "the paged cache in one forward; a layer that attends more than once (differential "
                         "attention, for one) would write its keys over its own, so it cannot run paged")
    if batch.attended != layers:
        raise ValueError(f"model: {batch.attended} of {type(pm.model).__name__}'s {layers} layers attended through "
                         "the paged cache; the others (recurrent, convolution or linear-attention layers, or "
                         "attention code of their own) keep no per-sequence state there, so it cannot run paged")
