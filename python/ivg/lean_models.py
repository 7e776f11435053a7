"""Forwards of the supported model families on the paged cache, without transformers' model stack.

``PagedModel`` runs a forward either through the transformers model (its attention swapped for the
paged one) or, for the families below, through a lean forward written here that calls the same
submodules and functions in the same order (embeddings, norms, projections, rotary embedding, MLP,
head), so the logits are bitwise those of the transformers forward (tested), without its per-call
work: argument handling, masks, cache objects, output classes and a dozen module calls per layer. On
small models and few rows that work is most of a forward (a one-row ``PagedModel`` decode step of the
demo's 2-layer guide on one CPU thread: 1.05 ms through transformers, 0.71 ms here; its 4-layer base:
1.95 and 1.32 ms). With hundreds of rows the arithmetic dominates and the two take the same time.

The projections (GPT-2's ``Conv1D``, the Llama family's ``nn.Linear``) are applied as their forwards
apply them (``torch.addmm(bias, x, weight)``, ``F.linear(x, weight, bias)``) without the module call,
which on a tiny model costs as much as the product. So a model with hooks on its modules (accelerate's
offloading, for example, loads weights in a pre-forward hook) or with other projection classes
(quantized or adapter-wrapped layers) runs through transformers instead; transformers' own
output-capturing hooks change no forward and do not count.

Supported: GPT-2 (``GPT2LMHeadModel``; default attention settings) and the Llama family
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``), as causal LMs or as the body of
a ``TokenRewardModel``. Anything else runs through transformers (``lean_forward`` returns None).
"""
from __future__ import annotations

import importlib

import torch
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
    if body is None or head is None or _hooked(model):
        return None
    name = type(body).__name__
    if name in _GPT2_BODIES and _gpt2_supported(body):
        return _GPT2(body, head, attend)
    if name in _LLAMA_BODIES and _llama_supported(body):
        return _Llama(body, head, attend)
    return None


# transformers' own hooks, installed on a model's blocks the first time it is asked for hidden states or
# attentions: they only record outputs while a capture is open, so they change no forward.
_INERT_HOOK_MODULES = ("transformers.utils.output_capturing",)


def _foreign(hooks) -> bool:
    return any(getattr(h, "__module__", None) not in _INERT_HOOK_MODULES for h in hooks.values())


def _hooked(model) -> bool:
    """Any module of ``model`` with forward hooks other than transformers' output capturing (or with
    accelerate's ``_hf_hook``), or global module hooks."""
    from torch.nn.modules import module as torch_module

    if any(_foreign(getattr(torch_module, name, {})) for name in ("_global_forward_hooks",
                                                                   "_global_forward_pre_hooks")):
        return True
    return any(_foreign(m._forward_hooks) or _foreign(m._forward_pre_hooks) or hasattr(m, "_hf_hook")
               for m in model.modules())


def _exactly(module, cls_name: str, module_name: str) -> bool:
    """``module`` is an instance of exactly the class ``module_name.cls_name`` (not a subclass or a wrapper,
    whose forward may differ)."""
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    return cls is not None and type(module) is cls


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
    if not (_has(blk, "ln_1", "ln_2", "attn", "mlp") and _has(blk.attn, "c_attn", "c_proj", "split_size", "head_dim",
                                                               "scaling") and _has(blk.mlp, "c_fc", "act", "c_proj")):
        return False
    return all(_exactly(m, "Conv1D", "transformers.pytorch_utils")
               for b in body.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))


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
    if not (set(name for name, _ in attn.named_children()) == known and _has(attn, "head_dim", "scaling")
            and (type(body).__name__ != "MistralModel" or _has(attn, "config"))
            and (type(body).__name__ != "Qwen2Model" or _has(attn, "sliding_window"))):
        return False
    # The MLP as the family writes it (down(act(gate(x)) * up(x))), and plain nn.Linear projections.
    mlp_class = type(body).__name__.replace("Model", "MLP")
    return all(_exactly(lay.mlp, mlp_class, type(body).__module__) and _has(lay.mlp, "act_fn")
               and all(_exactly(m, "Linear", "torch.nn") for m in (
                   lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj, lay.self_attn.o_proj,
                   lay.mlp.gate_proj, lay.mlp.up_proj, lay.mlp.down_proj)) for lay in body.layers)


def _conv1d(m, x):
    """transformers' ``Conv1D`` forward on a 2-D ``x``: ``x @ weight + bias`` in one addmm."""
    return torch.addmm(m.bias, x, m.weight)


def _linear(m, x):
    """``nn.Linear``'s forward."""
    return F.linear(x, m.weight, m.bias)


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
            q, k, v = _conv1d(attn.c_attn, h).split(attn.split_size, dim=-1)
            t = q.shape[0]
            out = self.attend(batch, i, q.view(t, -1, attn.head_dim), k.view(t, -1, attn.head_dim),
                              v.view(t, -1, attn.head_dim), attn.scaling, None)
            x = _conv1d(attn.c_proj, out.reshape(t, -1)) + x
            h = F.layer_norm(x, blk.ln_2.normalized_shape, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            mlp = blk.mlp
            x = x + _conv1d(mlp.c_proj, mlp.act(_conv1d(mlp.c_fc, h)))
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
            q = _linear(attn.q_proj, h).view(shape).transpose(1, 2)
            k = _linear(attn.k_proj, h).view(shape).transpose(1, 2)
            v = _linear(attn.v_proj, h).view(shape).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            out = self.attend(batch, i, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                              attn.scaling, self.window(attn))
            x = x + _linear(attn.o_proj, out.reshape(t, -1))
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
        x = x if keep is None else x.index_select(0, keep)
        return self.head(b.norm(x))
