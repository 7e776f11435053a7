"""The Python API behind ``ivg generate``: load models by path (or take loaded ones) and decode."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import numbers
import os
from typing import Sequence

import torch

from .decoder import IVGDecoder
from .draw import decoder_backend
from .models import GuidePair, IVGModels, _finite, check_model_paths, check_templates, load_causal_lm
from .naive import NaiveDecoder
from .options import DecodeOptions

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_list(name: str, models) -> list:
    """``tuned`` or ``ref`` as a list: one path, hub id or loaded model is a list of one (a string was read as its
    characters, one model each)."""
    if isinstance(models, (str, os.PathLike, torch.nn.Module)):
        return [models]
    if not isinstance(models, (list, tuple)):
        raise ValueError(f"{name}={models!r}: expected a list of model paths, hub ids or loaded models")
    return list(models)


def _dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _tokenizer(path):
    """The tokenizer saved with the model at ``path``, or None where there is none (transformers then builds
    one with no ordinary token from the model's config alone, which tokenized every prompt to nothing)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
    special = set(tok.all_special_tokens)
    return tok if any(t not in special for t in tok.get_vocab()) else None


def check_device(device, arg: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, or ``ValueError`` naming ``arg`` (a keyword, or a flag such as
    ``--device``) when it is not a device name or names a CUDA device this machine lacks (instead of an
    assertion deep inside the first model load)."""
    named = f"{arg} {device}" if arg.startswith("--") else f"{arg}={device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{named}: not a device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{named}: no CUDA device here (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); expected cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{named}: expected an index below {count}, the number of CUDA devices here")
    return dev


def load_models(base, *, tuned: Sequence = (), ref: Sequence = (), beta: Sequence[float] = (), token_rm=None,
                token_rm_weight: float = 1.0, tokenizer=None, device="cpu", dtype=None, templates=None,
                base_tp_plan=None, chat_template: bool = False) -> IVGModels:
    """Models by local path or hub id (or already loaded), checked for a shared token-to-id map. ``tuned`` and ``ref``:
    lists of one model per guide pair, or one model each for one pair. ``beta``: one per guide pair (a sequence or
    array), or one number for all (default 1). ``tokenizer`` (default: the base
    model's) is a path, a hub id or a loaded tokenizer.

    ``base_tp_plan="auto"`` shards the base model over the process group's ranks (tensor parallel);
    the guides and the token reward model stay whole on ``device``. ``templates`` and ``chat_template``:
    see :class:`ivg.models.IVGModels`."""
    tuned, ref = _model_list("tuned", tuned), _model_list("ref", ref)
    if len(tuned) != len(ref):
        raise ValueError(f"tuned/ref: expected pairs, got {len(tuned)} tuned and {len(ref)} ref models")
    if hasattr(beta, "tolist"):  # a NumPy or torch array (or number): their truth value is ambiguous
        beta = beta.tolist()
    try:
        betas = [beta] if isinstance(beta, numbers.Real) else list(beta) if beta is not None else []
    except TypeError:
        raise ValueError(f"beta={beta!r}: expected a number or one per guide pair") from None
    betas = betas or [1.0] * len(tuned)
    if len(betas) == 1 and len(tuned) > 1:
        betas = betas * len(tuned)
    if len(betas) != len(tuned):
        raise ValueError(f"beta: expected one beta per guide pair ({len(tuned)}), got {len(betas)}")
    for i, b in enumerate(betas):
        _finite(f"beta[{i}]", b)
    _finite("token_rm_weight", token_rm_weight)
    check_device(device)
    dt = _dtype(dtype)
    templates = check_templates(templates)
    home = lambda x: os.path.expanduser(x) if isinstance(x, str) else x  # noqa: E731  ("~/models/base")
    base, tuned, ref, token_rm = home(base), [home(t) for t in tuned], [home(r) for r in ref], home(token_rm)
    args = [("base", base)] + [(f"tuned[{i}]", t) for i, t in enumerate(tuned)]
    args += [(f"ref[{i}]", r) for i, r in enumerate(ref)] + ([("token_rm", token_rm)] if token_rm is not None else [])
    check_model_paths([(f"{arg}={str(x) if isinstance(x, os.PathLike) else x!r}", x) for arg, x in args])
    if isinstance(tokenizer, (str, os.PathLike)):  # a path or hub id, as the models take (before they load)
        path = home(os.fspath(tokenizer))
        tokenizer = _tokenizer(path)
        if tokenizer is None:
            raise ValueError(f"tokenizer={path!r}: no tokenizer there; expected a folder or hub id holding one, or a "
                             "loaded tokenizer")
    elif tokenizer is not None and not (callable(tokenizer) and hasattr(tokenizer, "decode")):
        raise ValueError(f"tokenizer: expected a path, a hub id or a loaded tokenizer, got {type(tokenizer).__name__}")
    tokenizers = {}

    def load(x, name, arg, tp_plan=None):
        if isinstance(x, torch.nn.Module):
            if tp_plan is not None:
                raise ValueError("base_tp_plan: pass the base model by path to shard it")
            return x.to(device=device, dtype=dt) if dt is not None else x.to(device)
        tokenizers[name] = _tokenizer(x)
        try:
            return load_causal_lm(x, dtype=dt, device=device, tp_plan=tp_plan)
        except OSError as e:  # not found on the hub, no network, no weights in the folder, ...
            raise ValueError(f"{arg}={str(x)!r}: could not be loaded: {str(e).splitlines()[0]}") from e

    base_model = load(base, "base", "base", base_tp_plan)
    guides = [GuidePair(load(t, f"tune{i}", f"tuned[{i}]"), load(r, f"ref{i}", f"ref[{i}]"), float(b))
              for i, (t, r, b) in enumerate(zip(tuned, ref, betas))]
    rm = load(token_rm, "rm", "token_rm") if token_rm is not None else None
    tok = tokenizer if tokenizer is not None else tokenizers.pop("base", None)
    tokenizers.pop("base", None)
    return IVGModels(base_model, guides, rm, float(token_rm_weight), tok, templates,
                     {k: v for k, v in tokenizers.items() if v is not None}, chat_template=bool(chat_template))


def import_scorer(spec: str):
    """``MODULE:FUNCTION`` -> the callable ``(prompts, responses) -> scores``."""
    if ":" not in spec:
        raise ValueError(f"scorer={spec!r}: expected 'explicit', 'implicit' or MODULE:FUNCTION")
    module, _, name = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"scorer={spec!r}: cannot import {module} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"scorer={spec!r}: {module} has no callable {name}")
    return fn


def make_decoder(*, base, tuned=(), ref=(), beta=(), token_rm=None, token_rm_weight=1.0, tokenizer=None,
                 device="cpu", dtype=None, backend="auto", block_size=None, decoder="paged", templates=None,
                 chat_template=False, cuda_graphs=None, base_tp_plan=None, max_batch_prompts=64, read_every=None,
                 step_graphs=None, merge_twins=True, **options):
    """Load the models once and build ``(decoder, DecodeOptions)``; the arguments are :func:`generate`'s.
    Everything that can be checked without the models is checked before they load."""
    known = {f.name for f in dataclasses.fields(DecodeOptions)}
    for name in options:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known) + list(_LOAD_ARGS), n=1)
            raise ValueError(f"{name}: not an argument of generate()" + (f"; did you mean {near[0]}?" if near else ""))
    if decoder not in ("paged", "naive"):
        raise ValueError(f"decoder={decoder!r}: expected 'paged' or 'naive'")
    decoder_backend(backend)
    scorer = options.get("scorer")
    if isinstance(scorer, str) and scorer not in ("explicit", "implicit"):
        options["scorer"] = import_scorer(scorer)
    opts = DecodeOptions(**options)
    opts.resolved(have_guides=bool(tuned), have_token_rm=token_rm is not None)  # (fails now, not after the loads)
    models = load_models(base, tuned=tuned, ref=ref, beta=beta, token_rm=token_rm, token_rm_weight=token_rm_weight,
                         tokenizer=tokenizer, device=device, dtype=dtype, templates=templates,
                         base_tp_plan=base_tp_plan, chat_template=chat_template)
    if decoder == "paged":
        dec = IVGDecoder(models, block_size=block_size, backend=backend, cuda_graphs=cuda_graphs,
                         max_batch_prompts=max_batch_prompts, read_every=read_every, step_graphs=step_graphs,
                         merge_twins=merge_twins)
    else:
        dec = NaiveDecoder(models, backend="reference" if backend == "auto" else backend)
    return dec, opts


# make_decoder's own arguments besides the DecodeOptions fields (for the suggestion after a typo)
_LOAD_ARGS = ("base", "tuned", "ref", "beta", "token_rm", "token_rm_weight", "tokenizer", "device", "dtype", "backend",
              "block_size", "decoder", "templates", "chat_template", "cuda_graphs", "base_tp_plan", "max_batch_prompts",
              "read_every", "step_graphs", "merge_twins")


def generate(prompts, *, progress=False, **kwargs):
    """Decode ``prompts`` (strings or token id lists). ``kwargs``: the models (``base``, ``tuned``, ``ref``,
    ``beta``, ``token_rm``, ``token_rm_weight``, ``tokenizer``, ``templates``, ``chat_template``), where they
    run (``device``, ``dtype``, ``backend``, ``block_size``, ``decoder``, ``cuda_graphs``, ``step_graphs``,
    ``max_batch_prompts``, ``read_every``, ``merge_twins``) and :class:`DecodeOptions` fields (``eos_token_ids=()`` never stops at EOS).

    Returns one :class:`ivg.decoder.GenerationResult` per prompt, best beam first. Under ``torchrun``, see
    :func:`ivg.distributed.generate_sharded`.
    """
    dec, opts = make_decoder(**kwargs)
    results = dec.generate(prompts, opts, progress=progress)
    generate.last_stats = dec.last_stats
    return results


generate.last_stats = None
