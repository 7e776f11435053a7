"""Forwards of the supported model families on the paged cache, without transformers' model stack.

``PagedModel`` runs a forward either through the transformers model (its attention swapped for the
paged one) or, for the families below, through a lean forward written here that calls the same
submodules and functions in the same order (embeddings, norms, projections, rotary embedding, MLP,
head), so the logits are bitwise those of the transformers forward (tested), without its per-call
work: argument handling, masks, cache objects, output classes and a dozen module calls per layer. On
small models and few rows that work is most of a forward (a one-row ``PagedModel`` decode step of the
demo's 2-layer guide on one CPU thread: 1.05 ms through transformers, 0.71 ms here at first, 0.49 ms
with the lookups below and unchecked attention calls, 0.44 ms with the attention's gather planned once
per forward; its 4-layer base: 1.95, 1.32, 0.88 and 0.78 ms). With
hundreds of rows the arithmetic dominates and the two take the same time.

The projections (GPT-2's ``Conv1D``, the Llama family's ``nn.Linear``) are applied as their forwards
apply them (``torch.addmm(bias, x, weight)``, ``F.linear(x, weight, bias)``) without the module call,
which on a tiny model costs as much as the product. So a model with hooks on its modules (accelerate's
offloading, for example, loads weights in a pre-forward hook) or with other projection classes
(quantized or adapter-wrapped layers) runs through transformers instead; transformers' own
output-capturing hooks change no forward and do not count.

A lean forward looks up each layer's parameters (and the forwards of its norms, activation and head)
once, when it is made: weights changed in place (``load_state_dict``, an optimiser step) are seen, but a
parameter or submodule replaced by another object afterwards is not; make a new ``PagedModel`` then.
On a one-row step of the demo's models this lookup was about a tenth of the forward.

Supported: GPT-2 (``GPT2LMHeadModel``; default attention settings) and the Llama family
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``), as causal LMs or as the body of
a ``TokenRewardModel``. Anything else runs through transformers (``lean_forward`` returns None).
"""
from __future__ import annotations

import importlib
import math

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
    as ``forward(ids, positions, keep, batch)``; its ``kv_shapes`` are the ``(KV heads, head dim)`` of the
    layers' keys and values, as the model's modules hold them.

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
    if not all(_exactly(e, "Embedding", "torch.nn") and e.max_norm is None for e in (body.wte, body.wpe)):
        return False  # the lean forward looks embeddings up as F.embedding(ids, weight): no renormalising
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


def _head_call(head):
    """The head's forward as a plain call: ``F.linear`` for an ``nn.Linear`` (no module call), else the module."""
    if type(head) is torch.nn.Linear:
        weight, bias = head.weight, head.bias
        return lambda x: F.linear(x, weight, bias)
    return head


def _norm(m):
    """A ``LayerNorm``'s arguments to ``torch.layer_norm`` after the input: those ``F.layer_norm`` passes it, whose
    last (cuDNN's switch) aten's layer norm takes but ignores. Called directly, without ``F.layer_norm``'s Python
    wrapper, a one-row norm takes about a third less time."""
    return m.normalized_shape, m.weight, m.bias, m.eps, True


# transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``) computes
# ``0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))`` in seven operations, each into a new tensor.
# ``_new_gelu`` runs the same operations on the same values, in place where a temporary would be dropped: each
# elementwise operation rounds alike either way (a product or sum of two values is commutative), so the result is
# the same bit for bit (tested); on a one-row step it takes about 25 us instead of 35.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _new_gelu(x):
    t = torch.pow(x, 3.0)
    t.mul_(0.044715).add_(x).mul_(_SQRT_2_OVER_PI).tanh_().add_(1.0)
    return t.mul_(0.5 * x)


def _activation(act):
    """The forward to call for the activation module ``act``: ``_new_gelu`` for transformers' own
    ``NewGELUActivation`` (its forward not replaced, as a hub kernel would), else the module's forward."""
    fwd = act.forward
    own = getattr(fwd, "__func__", None)  # (None where the instance's forward was replaced)
    if (_exactly(act, "NewGELUActivation", "transformers.activations")
            and getattr(own, "__qualname__", None) == "NewGELUActivation.forward"
            and getattr(own, "__module__", None) == "transformers.activations"):
        return _new_gelu
    return fwd


class _GPT2:
    """GPT-2's forward. The parameters each layer reads are looked up once, here (a module attribute
    lookup costs about as much as a small product on a one-row step). The norms are ``torch.layer_norm`` with the
    arguments ``nn.LayerNorm`` passes it, the activation its module's forward or, for ``gelu_new``, the same
    operations in place (``_new_gelu``): the module calls' bits."""

    def __init__(self, body, head, attend):
        self.attend, self.head = attend, _head_call(head)
        self.wte, self.wpe, self.ln_f = body.wte.weight, body.wpe.weight, _norm(body.ln_f)
        self.layers = [(_norm(b.ln_1), b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.split_size, b.attn.head_dim,
                        b.attn.scaling, b.attn.c_proj.weight, b.attn.c_proj.bias, _norm(b.ln_2),
                        b.mlp.c_fc.weight, b.mlp.c_fc.bias, _activation(b.mlp.act), b.mlp.c_proj.weight, b.mlp.c_proj.bias)
                       for b in body.h]
        self.kv_shapes = {(b.attn.split_size // b.attn.head_dim, b.attn.head_dim) for b in body.h}  # (heads, dim)

    def __call__(self, ids, positions, keep, batch):
        """Logits ``[len(keep), V]`` at rows ``keep`` of the flat batch (``keep=None``: every row)."""
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        for i, (ln_1, w_qkv, b_qkv, split, head_dim, scaling, w_o, b_o, ln_2, w_fc, b_fc, act, w_p, b_p) in enumerate(
                self.layers):
            h = torch.layer_norm(x, *ln_1)
            # transformers' Conv1D: x @ W + b; split as ``Tensor.split(split, dim=-1)`` (without its Python wrapper)
            q, k, v = torch.addmm(b_qkv, h, w_qkv).split_with_sizes((split, split, split), dim=-1)
            t = q.shape[0]
            out = self.attend(batch, i, q.view(t, -1, head_dim), k.view(t, -1, head_dim), v.view(t, -1, head_dim),
                              scaling, None)
            x = torch.addmm(b_o, out.reshape(t, -1), w_o) + x
            h = torch.layer_norm(x, *ln_2)
            x = x + torch.addmm(b_p, act(torch.addmm(b_fc, h, w_fc)), w_p)
        x = x if keep is None else x.index_select(0, keep)
        return self.head(torch.layer_norm(x, *self.ln_f))


class _Llama:
    """The Llama family's forward, with each layer's parameters and submodule forwards looked up once."""

    def __init__(self, body, head, attend):
        self.attend, self.head = attend, _head_call(head)
        family = importlib.import_module(type(body).__module__)
        self.apply_rotary = family.apply_rotary_pos_emb  # the family's own rotary embedding
        window = _WINDOW.get(type(body).__name__, lambda attn: None)
        self.embed, self.rotary, self.norm = body.embed_tokens.forward, body.rotary_emb.forward, body.norm.forward
        self.layers = []
        for layer in body.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.forward, a.head_dim, a.scaling, window(a),
                                *(_linear_args(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)),
                                layer.post_attention_layernorm.forward, getattr(mlp.act_fn, "forward", mlp.act_fn),
                                *(_linear_args(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))))
        self.kv_shapes = {(layer.self_attn.k_proj.out_features // layer.self_attn.head_dim, layer.self_attn.head_dim)
                          for layer in body.layers}  # (KV heads, head dim) of the layers' keys

    def __call__(self, ids, positions, keep, batch):
        x = self.embed(ids)
        cos, sin = self.rotary(x.unsqueeze(0), positions.unsqueeze(0))  # [1, T, D]
        t = x.shape[0]
        for i, (norm_in, head_dim, scaling, window, q_p, k_p, v_p, o_p, norm_post, act, gate, up, down) in enumerate(
                self.layers):
            h = norm_in(x)
            shape = (1, t, -1, head_dim)  # transformers' layout: [1, H, T, D]
            q = F.linear(h, *q_p).view(shape).transpose(1, 2)
            k = F.linear(h, *k_p).view(shape).transpose(1, 2)
            v = F.linear(h, *v_p).view(shape).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            out = self.attend(batch, i, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), scaling,
                              window)
            x = x + F.linear(out.reshape(t, -1), *o_p)
            h = norm_post(x)
            x = x + F.linear(act(F.linear(h, *gate)) * F.linear(h, *up), *down)
        x = x if keep is None else x.index_select(0, keep)
        return self.head(self.norm(x))


def _linear_args(m):
    """``nn.Linear``'s weight and bias, as its forward passes them to ``F.linear``."""
    return m.weight, m.bias
