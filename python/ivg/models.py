"""The models of an IVG run: a base, guide pairs with their betas, an optional token reward model.

A token reward model as published is a causal LM body with a ``score_head`` ``Linear(hidden, vocab)``:
``Q(s_{t-1}, v)`` is the head's output at position t-1 for token v (:class:`TokenRewardModel`). Any
causal LM whose logits serve as ``Q`` works too.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

SCORE_HEAD_FILE = "score_head.safetensors"


def text_config(model):
    """``model``'s config, or its text model's where it has several."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def model_positions(model) -> Optional[int]:
    """The positions a model takes (None: no limit it states)."""
    cfg = text_config(model)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def batch_dependent_rope(model) -> Optional[int]:
    """The length past which ``model``'s rotary frequencies change for a whole forward, where transformers
    picks them by the longest sequence it holds: RoPE type ``longrope`` (short factors up to
    ``original_max_position_embeddings`` tokens, long ones past it) when that is below the model's positions.
    None for every other type (``dynamic`` grows only past ``max_position_embeddings``, which no sequence of
    a :class:`~ivg.PagedModel` passes). A :class:`~ivg.PagedModel` then chooses them per sequence
    (:mod:`ivg.row_rope`)."""
    cfg = text_config(model)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    settings = [rope] if "rope_type" in rope or "type" in rope else [r for r in rope.values() if isinstance(r, dict)]
    limits = [r.get("original_max_position_embeddings") for r in settings
              if (r.get("rope_type") or r.get("type")) == "longrope"]
    limits = [int(n) for n in limits if n]
    positions = model_positions(model)
    return min(limits) if limits and (positions is None or min(limits) < positions) else None


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes ``cache`` (a ``DynamicCache``) to ``model``'s forward: ``cache=``
    where the forward takes it (newer transformers 5 releases, which deprecate ``past_key_values``), else
    ``past_key_values=``. A :class:`TokenRewardModel` answers for its body."""
    return {_cache_keyword(type(getattr(model, "body", model))): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class _Logits:
    def __init__(self, logits):
        self.logits = logits


class TokenRewardModel(torch.nn.Module):
    """A transformer body plus ``score_head = Linear(hidden, vocab)``; ``forward(...).logits`` is ``Q``."""

    def __init__(self, body, score_head: torch.nn.Linear):
        super().__init__()
        self.body = body
        self.score_head = score_head
        self.config = body.config

    @classmethod
    def from_body_config(cls, config, **kwargs):
        from transformers import AutoModel

        body = AutoModel.from_config(config, **kwargs)
        return cls(body, torch.nn.Linear(config.get_text_config().hidden_size, config.get_text_config().vocab_size))

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A body saved with ``save_pretrained`` plus ``score_head.safetensors`` beside it."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        body = AutoModel.from_pretrained(path, **kwargs)
        state = load_file(os.path.join(path, SCORE_HEAD_FILE))
        weight = state.get("score_head.weight")
        hidden = body.config.get_text_config().hidden_size
        if weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
            found = "no score_head.weight" if weight is None else f"score_head.weight {list(weight.shape)}"
            raise ValueError(f"{os.path.join(path, SCORE_HEAD_FILE)}: {found}; expected [vocab, {hidden}] for the "
                             f"body's hidden size {hidden}")
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="score_head.bias" in state)
        head.load_state_dict({k.removeprefix("score_head."): v for k, v in state.items()})
        return cls(body, head.to(dtype=body.dtype, device=body.device))

    def save_pretrained(self, path):
        from safetensors.torch import save_file

        self.body.save_pretrained(path)
        save_file({f"score_head.{k}": v.contiguous() for k, v in self.score_head.state_dict().items()},
                  os.path.join(path, SCORE_HEAD_FILE))

    def set_attn_implementation(self, name):
        self.body.set_attn_implementation(name)

    @property
    def generation_config(self):
        return getattr(self.body, "generation_config", None)

    def get_output_embeddings(self):
        return self.score_head

    def forward(self, input_ids=None, position_ids=None, logits_to_keep=0, **kwargs):
        hidden = self.body(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        return _Logits(self.score_head(hidden))


def is_token_rm_dir(path) -> bool:
    return os.path.isdir(str(path)) and os.path.exists(os.path.join(str(path), SCORE_HEAD_FILE))


def model_path_problem(path) -> Optional[str]:
    """Why ``path`` cannot name a model (a local folder, ``~`` for the home folder, or a hub id ``name`` /
    ``org/name``), or None."""
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        return None
    if os.path.exists(p):
        return "is a file; expected a model folder (with config.json) or a hub id"
    if p.startswith(("/", "./", "../", "~")) or p.count("/") > 1 or (os.sep != "/" and os.sep in p):
        return "no such directory; expected a local model folder or a hub id"
    return None


def check_model_paths(named) -> None:
    """Raise ``ValueError("LABEL: why")`` for the first ``(label, path)`` that cannot name a model
    (loaded modules pass): a typo fails at once, before anything loads."""
    for label, path in named:
        if isinstance(path, torch.nn.Module):
            continue
        if not isinstance(path, (str, os.PathLike)):  # (an int would be read as a file descriptor)
            raise ValueError(f"{label}: expected a model folder, a hub id or a loaded model, got {type(path).__name__}")
        problem = model_path_problem(path)
        if problem:
            raise ValueError(f"{label}: {problem}")


# The oldest transformers whose tensor parallelism this decoder is tested with: up to 5.20 it refuses a vocabulary
# that the ranks do not divide, and up to 5.22 it shards GPT-2 although GPT-2 has no plan (under 5.20 its
# attention kept every head, which the paged cache refused).
TENSOR_PARALLEL_TRANSFORMERS = "5.23"


def tensor_parallel_supported(version: str) -> bool:
    """Whether transformers ``version`` is at least :data:`TENSOR_PARALLEL_TRANSFORMERS` (major and minor)."""
    import re

    def release(v):
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    return release(version) >= release(TENSOR_PARALLEL_TRANSFORMERS)


def check_tensor_parallel_transformers(version: str | None = None) -> None:
    """``ValueError`` where the installed transformers (or ``version``) is older than
    :data:`TENSOR_PARALLEL_TRANSFORMERS`."""
    if version is None:
        import transformers

        version = transformers.__version__
    if not tensor_parallel_supported(version):
        need = TENSOR_PARALLEL_TRANSFORMERS
        raise ValueError(f"tp_plan: tensor parallelism needs transformers >= {need} (installed: {version}); "
                         f"pip install 'transformers>={need},<6', or shard the prompts instead of the base model")


def load_causal_lm(path, *, dtype=None, device="cpu", tp_plan=None):
    """A causal LM (or a token reward model directory) by local path or hub id.

    ``tp_plan="auto"`` shards it over the ranks of the initialised process group with transformers'
    tensor parallelism (the model's own plan; needs ``accelerate``); it stays where transformers puts it.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if tp_plan is not None:
        if is_token_rm_dir(path):
            raise ValueError("tp_plan: token reward models are not sharded (they stay on one device)")
        check_tensor_parallel_transformers()
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan=tp_plan, **kwargs)
        if getattr(model, "tp_size", 1) in (None, 1) and tp_plan is not None:
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError(f"tp_plan={tp_plan!r}: {type(model).__name__} was not sharded (no tensor-parallel "
                                 "plan for this architecture)")
        return model.eval()
    if is_token_rm_dir(path):
        model = TokenRewardModel.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def _finite(name: str, value) -> float:
    """``value`` as a float (a Python or numpy number, or a one-element tensor), or ``ValueError`` naming it."""
    try:
        x = None if isinstance(value, (bool, str)) else float(value)
    except (TypeError, ValueError, RuntimeError):
        x = None
    if x is None or not math.isfinite(x):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return x


def guide_triples(guides) -> list:
    """``guides`` given as ``(tuned, ref, beta)`` triples (a list or tuple of them), checked: ``[(tuned, ref, beta)]``
    with each beta a finite float (the logits processor's and the custom generation method's argument)."""
    if not isinstance(guides, (list, tuple)):
        raise ValueError(f"guides={type(guides).__name__}: expected a list of (tuned, ref, beta) triples")
    out = []
    for i, g in enumerate(guides):
        if not isinstance(g, (tuple, list)) or len(g) != 3:
            raise ValueError(f"guides[{i}]: expected a (tuned, ref, beta) triple")
        out.append((g[0], g[1], _finite(f"guides[{i}] beta", g[2])))
    return out


TEMPLATE_ROLES = ("base", "guide", "token_rm")


def check_templates(templates) -> dict:
    """``{role: format}`` with roles from TEMPLATE_ROLES, each format holding ``{prompt}`` once."""
    if templates is not None and not isinstance(templates, Mapping):
        raise ValueError(f"templates={templates!r}: expected a mapping of roles ({', '.join(TEMPLATE_ROLES)}) to "
                         "format strings, or None")
    out = dict(templates or {})
    for role, fmt in out.items():
        if role not in TEMPLATE_ROLES:
            raise ValueError(f"templates[{role!r}]: expected a role among {', '.join(TEMPLATE_ROLES)}")
        try:
            ok = isinstance(fmt, str) and fmt.format(prompt="") is not None and "{prompt}" in fmt
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"templates[{role!r}]={fmt!r}: expected a format string with {{prompt}} and no other "
                             "fields (write literal braces as {{ and }})")
    return out


@dataclass
class GuidePair:
    tuned: torch.nn.Module
    ref: torch.nn.Module
    beta: float = 1.0


@dataclass
class IVGModels:
    """Base, guide pairs, token reward model, and the shared tokenizer.

    ``templates`` maps ``"base"``, ``"guide"`` and ``"token_rm"`` to a format string with ``{prompt}``:
    models may see different prompt templates (the paged cache keeps per-model lengths).
    ``chat_template``: the templated prompt becomes a user message in each model's own chat template
    (its tokenizer's; the base tokenizer where a model has none of its own), generation prompt added.
    """

    base: torch.nn.Module
    guides: list = field(default_factory=list)  # GuidePair
    token_rm: Optional[torch.nn.Module] = None
    token_rm_weight: float = 1.0
    tokenizer: object = None
    templates: dict = field(default_factory=dict)
    other_tokenizers: dict = field(default_factory=dict)  # name ("tune0", "rm", ...) -> its own tokenizer
    chat_template: bool = False

    def __post_init__(self):
        """The arguments checked as they are given (a ValueError naming the first wrong one, not an error
        deep in the first step); a ``(tuned, ref, beta)`` triple is taken for a :class:`GuidePair`."""
        if not isinstance(self.base, torch.nn.Module):
            raise ValueError(f"base: expected a torch.nn.Module (a causal LM), got {type(self.base).__name__}")
        if isinstance(self.guides, GuidePair) or not isinstance(self.guides, (list, tuple)):
            raise ValueError(f"guides: expected a list of GuidePair (or (tuned, ref, beta) triples), got "
                             f"{type(self.guides).__name__}")
        pairs = []
        for i, g in enumerate(self.guides):
            if isinstance(g, (tuple, list)) and len(g) == 3:
                g = GuidePair(*g)
            if not isinstance(g, GuidePair):
                raise ValueError(f"guides[{i}]: expected a GuidePair or a (tuned, ref, beta) triple")
            for part in ("tuned", "ref"):
                if not isinstance(getattr(g, part), torch.nn.Module):
                    raise ValueError(f"guides[{i}].{part}: expected a torch.nn.Module, got "
                                     f"{type(getattr(g, part)).__name__}")
            pairs.append(GuidePair(g.tuned, g.ref, _finite(f"guides[{i}].beta", g.beta)))
        self.guides = pairs
        if self.token_rm is not None and not isinstance(self.token_rm, torch.nn.Module):
            raise ValueError(f"token_rm: expected a torch.nn.Module or None, got {type(self.token_rm).__name__}")
        self.token_rm_weight = _finite("token_rm_weight", self.token_rm_weight)
        self.templates = check_templates(self.templates)

    def check(self) -> None:
        """Every model's tokenizer maps the shared id range like the base's (see check_tokenizers), and has
        a chat template where ``chat_template`` asks for them."""
        if self.tokenizer is None:
            return
        for name, tok in self.other_tokenizers.items():
            if tok is not None:
                check_tokenizers(self.tokenizer, tok, name)
        if self.chat_template:
            for name, _, _ in self.roles():
                if not getattr(self._tokenizer_of(name), "chat_template", None):
                    raise ValueError(f"chat_template: the tokenizer of {name} has no chat template")

    def _tokenizer_of(self, name: str):
        """Model ``name``'s own tokenizer, else the shared one."""
        return self.other_tokenizers.get(name) or self.tokenizer

    def roles(self):
        """(name, model, template role) of every model, base first."""
        out = [("base", self.base, "base")]
        for i, g in enumerate(self.guides):
            out += [(f"tune{i}", g.tuned, "guide"), (f"ref{i}", g.ref, "guide")]
        if self.token_rm is not None:
            out.append(("rm", self.token_rm, "token_rm"))
        return out

    def prompt_ids(self, prompt, role: str, name: str = "base") -> list[int]:
        """Token ids of a prompt for model ``name`` in a template role (token-id prompts pass through)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise ValueError("prompts: text prompts need a tokenizer, and the base model came without one (save one "
                             "in its folder, give the prompts as token id lists, or pass tokenizer= to ivg.generate)")
        text = self.templates.get(role, "{prompt}").format(prompt=prompt)
        tok = self.tokenizer
        if self.chat_template:
            tok = self._tokenizer_of(name)
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"chat_template: the tokenizer of {name} has no chat template")
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]


def require_models(models) -> IVGModels:
    """A decoder's ``models`` argument, which must be an :class:`IVGModels` (anything else is named here, not by an
    AttributeError at its first use)."""
    if not isinstance(models, IVGModels):
        raise ValueError(f"models={type(models).__name__}: expected an ivg.IVGModels (ivg.api.load_models makes one)")
    return models


def check_tokenizers(base_tok, other_tok, name: str) -> None:
    """Same token-to-id map over the shared id range (sizes may differ: padded vocabularies are fine).

    Checking only the vocabulary size is a known bug: Llama-2 and Mistral both have 32000 tokens.
    """
    a = {i: t for t, i in base_tok.get_vocab().items()}
    b = {i: t for t, i in other_tok.get_vocab().items()}
    shared = min(len(base_tok), len(other_tok))
    diffs = [(i, a.get(i), b.get(i)) for i in range(shared) if a.get(i) != b.get(i)]
    if diffs:
        shown = ", ".join(f"id {i}: {x!r} vs {y!r}" for i, x, y in diffs[:3])
        raise ValueError(
            f"tokenizer of {name}: differs from the base tokenizer at {len(diffs)} of {shared} shared ids "
            f"(first: {shown}); token-level guidance needs the same token-to-id map"
        )
