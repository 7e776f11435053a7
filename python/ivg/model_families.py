"""Which transformers models the paged KV cache serves exactly, and the shape of the cache it holds for them.

:func:`check_family` refuses, naming why, a model whose layers or attention code the paged kernels cannot
compute; :func:`kv_shape` and :func:`local_kv_shape` give the cache's ``(layers, KV heads, head dim)``;
:func:`model_from_config` builds a model on the paged attention.
"""
from __future__ import annotations

import copy

import torch

from .models import text_config
from .paged_attention import ATTN_IMPLEMENTATION, register_attention


# Layer types (config.layer_types and the like) whose layers attend as the paged attention does.
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "attention"}


def check_family(model) -> None:
    """Refuse, naming why, a model whose attention the paged cache cannot serve exactly: one that runs its own
    attention code rather than transformers' ``AttentionInterface`` (Falcon, BLOOM, MPT, GPT-Neo, StableLM in
    transformers 5: its forward would take the packed batch for one sequence and write no cache), or one whose
    layers or attention the paged kernels do not compute (recurrent or convolutional layers). The attention
    function refuses what it cannot compute (an additive position bias, a mask), for a family this check does not
    know. Logit soft-capping (Gemma 2), attention sinks (gpt-oss), values narrower than keys (latent attention, as
    transformers expands it), layers of several shapes (Gemma 4) and layers that reuse an earlier layer's keys and
    values (Gemma 3n and 4: each such layer gets them in every forward and holds its own copy) are computed."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model={type(model).__name__}: expected a loaded transformers model (a torch.nn.Module with "
                         "a config)")
    body = getattr(model, "body", model)  # a TokenRewardModel's transformer
    name = type(model).__name__ + ("" if body is model else f" ({type(body).__name__})")
    naive = " (the naive decoder, `--decoder naive` or ivg.NaiveDecoder, runs it on transformers' own cache)"
    if getattr(type(body), "_supports_attention_backend", True) is False:
        raise ValueError(f"model: {name} runs its own attention code, not transformers' AttentionInterface, so "
                         "ivg.PagedModel cannot give it the paged cache (families that use the interface work: "
                         f"GPT-2, Llama, Mistral, Qwen2, Phi-3, Gemma, ...){naive}")
    cfg = text_config(body)
    for key in ("layer_types", "block_types", "layers_block_type"):
        types = getattr(cfg, key, None)
        other = sorted(set(types) - _ATTENTION_LAYERS) if isinstance(types, (list, tuple)) else []
        if other:
            raise ValueError(f"model: {name} has layers of type {', '.join(map(str, other))} ({key}), which "
                             f"ivg's paged attention does not implement{naive}")


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the paged cache for a transformers config (GPT-2 or Llama-style
    names): the keys' heads, which every layer's fit. Multi-head latent attention, as DeepSeek V2/V3 and MiniCPM3
    expand it, has keys of ``qk_nope_head_dim + qk_rope_head_dim`` and values of ``v_head_dim``; a heterogeneous
    config (Gemma 4: ``config.per_layer_config``) has layers of several head sizes and KV head counts, and the
    cache takes the largest of each (:func:`paged_attention_forward` pads and repeats the others to them)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    if getattr(text, "per_layer_attributes", None):  # each layer's own settings
        shapes = [_layer_kv_shape(text.per_layer_config[i]) for i in range(layers)]
        return layers, max(h for h, _ in shapes), max(d for _, d in shapes)
    return (layers, *_layer_kv_shape(text))


def _layer_kv_shape(text) -> tuple[int, int]:
    """(KV heads, key head dim) of one layer's config."""
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    k_dim = getattr(text, "head_dim", None) or hidden // heads
    nope, rope = getattr(text, "qk_nope_head_dim", None), getattr(text, "qk_rope_head_dim", None)
    if nope is not None and rope is not None:  # latent attention (its config's head_dim is the rotary part's)
        k_dim = nope + rope
    return kv_heads, k_dim


def local_kv_shape(model) -> tuple[int, int, int]:
    """:func:`kv_shape` of the KV heads this process holds: under transformers' tensor parallelism
    (``model.tp_size`` ranks) each rank's attention sees ``num_kv_heads / tp_size`` heads. A model whose key
    projections hold more KV heads than its config states for some layers (MiMo-V2's sliding-window layers hold
    twice as many) gets a cache of the most (:func:`paged_attention_forward` repeats the others' heads)."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    tp = getattr(model, "tp_size", None) or 1
    if tp > 1:
        if kv_heads % tp:
            raise ValueError(f"tp_size={tp}: {kv_heads} KV heads do not split evenly over the ranks")
        return layers, kv_heads // tp, head_dim
    return layers, max(kv_heads, _module_kv_heads(model)), head_dim


def _module_kv_heads(model) -> int:
    """The most KV heads a decoder layer's attention module holds (``k_proj.out_features // head_dim``), or 0. The
    modules counted are causal and numbered (``layer_idx``), as those that attend through the paged cache are: not
    a multimodal model's vision tower, whose heads are not the cache's."""
    most = 0
    for m in model.modules():
        k, d = getattr(m, "k_proj", None), getattr(m, "head_dim", None)
        if (isinstance(k, torch.nn.Linear) and isinstance(d, int) and d > 0 and k.out_features % d == 0
                and isinstance(getattr(m, "layer_idx", None), int) and getattr(m, "is_causal", True) is not False):
            most = max(most, k.out_features // d)
    return most


def model_from_config(config, **kwargs):
    """``AutoModelForCausalLM.from_config`` on the paged attention, leaving ``config`` untouched
    (transformers' ``from_config(cfg, attn_implementation=...)`` edits ``cfg`` in place)."""
    from transformers import AutoModelForCausalLM

    register_attention()
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=ATTN_IMPLEMENTATION, **kwargs)
