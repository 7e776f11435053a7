"""Forwards of the supported model families on the paged cache, without transformers' model stack.

``PagedModel`` runs a forward either through the transformers model (its attention swapped for the
paged one) or, for the families below, through a lean forward written here that calls the same
submodules and functions in the same order (embeddings, norms, projections, rotary embedding, MLP,
head), so the logits are bitwise those of the transformers forward (tested), without its per-call
work: argument handling, masks, cache objects, output classes and a dozen module calls per layer. On
small models and few rows that work is most of a forward (a one-row ``PagedModel`` decode step of the
demo's 2-layer guide on one CPU thread: 1.05 ms through transformers, 0.71 ms here; its 4-layer base:
1.95 and 1.32 ms). With hundreds of rows the arithmetic dominates and the two take the same time.

Supported: GPT-2 (``GPT2LMHeadModel``; default attention settings) and the Llama family
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``), as causal LMs or as the body of
a ``TokenRewardModel``. Anything else runs through transformers (``lean_forward`` returns None).
"""
from __future__ import annotations

import importlib

import torch.nn.functional as F

_GPT2_BODIES = ("GPT2Model",)
_LLAMA_BODIES = ("LlamaModel", "MistralModel", "Qwen2Model")
# The sliding window each family's attention passes to the attention function (Llama: none).
_WINDOW = {
    "MistralModel": lambda attn: getattr(attn.config, "sliding_window", None),
    "Qwen2Model": lambda attn: getattr(attn, "sliding_window", None),  # per layer (layer_types)
}


def _body_and_head(model):
    """``(body, head)``: the transformer and the module that maps its hidden states to logits."""
    if hasattr(model, "score_head") and hasattr(model, "body"):  # ivg.models.TokenRewardModel
        return model.body, model.score_head
    body = getattr(model, "transformer", None)
    if body is None:
        body = getattr(model, "model", None)
    return body, getattr(model, "lm_head", None)


def lean_forward(model, attend):
    """A lean forward for ``model``, or None when its family or settings are not supported. It is called
    as ``forward(ids, positions, keep, batch)``.

    ``attend(batch, layer_idx, q, k, v, scale, sliding_window)`` writes a layer's new keys and values and
    returns its attention output ``[T, H, D]`` (``q`` ``[T, H, D]``, ``k``/``v`` ``[T, H_kv, D]``)."""
    if (getattr(model, "tp_size", None) or 1) > 1:  # sharded by transformers' tensor parallelism: not covered
        return None
    body, head = _body_and_head(model)
    if body is None or head is None:
        return None
    name = type(body).__name__
    if name in _GPT2_BODIES and _gpt2_supported(body):
        return _GPT2(body, head, attend)
    if name in _LLAMA_BODIES and _llama_supported(body):
        return _Llama(body, head, attend)
    return None


def _has(obj, *names) -> bool:
    return all(hasattr(obj, n) for n in names)


# Every attribute a lean forward reads is checked here, so a transformers version that names things
# otherwise falls back to its own forward instead of failing mid-decode.
def _gpt2_supported(body) -> bool:
    cfg = body.config
    if (getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False)
            or getattr(cfg, "add_cross_attention", False)):
        return False
    if not (_has(body, "wte", "wpe", "h", "ln_f") and len(body.h)):
        return False
    blk = body.h[0]
    return (_has(blk, "ln_1", "ln_2", "attn", "mlp") and _has(blk.attn, "c_attn", "c_proj", "split_size", "head_dim",
                                                                "scaling")
            and _has(blk.mlp, "c_fc", "act", "c_proj"))


def _llama_supported(body) -> bool:
    if not (_has(body, "rotary_emb", "embed_tokens", "layers", "norm") and len(body.layers)):
        return False
    if not hasattr(importlib.import_module(type(body).__module__), "apply_rotary_pos_emb"):
        return False
    layer = body.layers[0]
    if not _has(layer, "self_attn", "input_layernorm", "post_attention_layernorm", "mlp"):
        return False
    attn = layer.self_attn
    # The projections this file knows; extra modules (q_norm, k_norm, ...) mean another variant.
    known = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return (set(name for name, _ in attn.named_children()) == known and _has(attn, "head_dim", "scaling")
            and (type(body).__name__ != "MistralModel" or _has(attn, "config"))
            and (type(body).__name__ != "Qwen2Model" or _has(attn, "sliding_window")))


class _GPT2:
    def __init__(self, body, head, attend):
        self.body, self.head, self.attend = body, head, attend

    def __call__(self, ids, positions, keep, batch):
        """Logits ``[len(keep), V]`` at rows ``keep`` of the flat batch (``keep=None``: every row)."""
        b = self.body
        x = b.wte(ids) + b.wpe(positions)
        for i, blk in enumerate(b.h):
            attn = blk.attn
            h = F.layer_norm(x, blk.ln_1.normalized_shape, blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            q, k, v = attn.c_attn(h).split(attn.split_size, dim=-1)
            t = q.shape[0]
            out = self.attend(batch, i, q.view(t, -1, attn.head_dim), k.view(t, -1, attn.head_dim),
                              v.view(t, -1, attn.head_dim), attn.scaling, None)
            x = attn.c_proj(out.reshape(t, -1)) + x
            h = F.layer_norm(x, blk.ln_2.normalized_shape, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            x = x + blk.mlp.c_proj(blk.mlp.act(blk.mlp.c_fc(h)))
        x = x if keep is None else x.index_select(0, keep)
        x = F.layer_norm(x, b.ln_f.normalized_shape, b.ln_f.weight, b.ln_f.bias, b.ln_f.eps)
        return self.head(x)


class _Llama:
    def __init__(self, body, head, attend):
        self.body, self.head, self.attend = body, head, attend
        family = importlib.import_module(type(body).__module__)
        self.apply_rotary = family.apply_rotary_pos_emb  # the family's own rotary embedding
        self.window = _WINDOW.get(type(body).__name__, lambda attn: None)

    def __call__(self, ids, positions, keep, batch):
        b = self.body
        x = b.embed_tokens(ids)
        cos, sin = b.rotary_emb(x.unsqueeze(0), positions.unsqueeze(0))  # [1, T, D]
        t = x.shape[0]
        for i, layer in enumerate(b.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (1, t, -1, attn.head_dim)  # transformers' layout: [1, H, T, D]
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            out = self.attend(batch, i, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                              attn.scaling, self.window(attn))
            x = x + attn.o_proj(out.reshape(t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x if keep is None else x.index_select(0, keep)
        return self.head(b.norm(x))
