"""The Python API behind ``ivg generate``: load models by path (or take loaded ones) and decode."""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

from .decoder import IVGDecoder
from .models import GuidePair, IVGModels, load_causal_lm
from .naive import NaiveDecoder
from .options import DecodeOptions

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def load_models(base, *, tuned: Sequence = (), ref: Sequence = (), beta: Sequence[float] = (), token_rm=None,
                token_rm_weight: float = 1.0, tokenizer=None, device="cpu", dtype=None, templates=None,
                base_tp_plan=None) -> IVGModels:
    """Models by local path or hub id (or already loaded), checked for a shared token-to-id map.

    ``base_tp_plan="auto"`` shards the base model over the process group's ranks (tensor parallel);
    the guides and the token reward model stay whole on ``device``."""
    if len(tuned) != len(ref):
        raise ValueError(f"tuned/ref: expected pairs, got {len(tuned)} tuned and {len(ref)} ref models")
    betas = list(beta) if beta else [1.0] * len(tuned)
    if len(betas) == 1 and len(tuned) > 1:
        betas = betas * len(tuned)
    if len(betas) != len(tuned):
        raise ValueError(f"beta: expected one beta per guide pair ({len(tuned)}), got {len(betas)}")
    dt = _dtype(dtype)
    tokenizers = {}

    def load(x, name, tp_plan=None):
        if isinstance(x, torch.nn.Module):
            if tp_plan is not None:
                raise ValueError("base_tp_plan: pass the base model by path to shard it")
            return x.to(device=device, dtype=dt) if dt is not None else x.to(device)
        tokenizers[name] = _tokenizer(x)
        return load_causal_lm(x, dtype=dt, device=device, tp_plan=tp_plan)

    base_model = load(base, "base", base_tp_plan)
    guides = [GuidePair(load(t, f"tune{i}"), load(r, f"ref{i}"), float(b))
              for i, (t, r, b) in enumerate(zip(tuned, ref, betas))]
    rm = load(token_rm, "rm") if token_rm is not None else None
    tok = tokenizer if tokenizer is not None else tokenizers.pop("base", None)
    tokenizers.pop("base", None)
    return IVGModels(base_model, guides, rm, float(token_rm_weight), tok, dict(templates or {}),
                     {k: v for k, v in tokenizers.items() if v is not None})


def import_scorer(spec: str):
    """``MODULE:FUNCTION`` -> the callable ``(prompts, responses) -> scores``."""
    if ":" not in spec:
        raise ValueError(f"scorer={spec!r}: expected 'explicit', 'implicit' or MODULE:FUNCTION")
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"scorer={spec!r}: {module} has no callable {name}")
    return fn


def make_decoder(*, base, tuned=(), ref=(), beta=(), token_rm=None, token_rm_weight=1.0, tokenizer=None,
                 device="cpu", dtype=None, backend="auto", block_size=16, decoder="paged", templates=None,
                 cuda_graphs=None, base_tp_plan=None, **options):
    """Load the models once and build ``(decoder, DecodeOptions)``; the arguments are :func:`generate`'s."""
    models = load_models(base, tuned=tuned, ref=ref, beta=beta, token_rm=token_rm, token_rm_weight=token_rm_weight,
                         tokenizer=tokenizer, device=device, dtype=dtype, templates=templates,
                         base_tp_plan=base_tp_plan)
    scorer = options.get("scorer")
    if isinstance(scorer, str) and scorer not in ("explicit", "implicit"):
        options["scorer"] = import_scorer(scorer)
    opts = DecodeOptions(**options)
    if decoder == "paged":
        dec = IVGDecoder(models, block_size=block_size, backend=backend, cuda_graphs=cuda_graphs)
    elif decoder == "naive":
        dec = NaiveDecoder(models, backend="reference" if backend == "auto" else backend)
    else:
        raise ValueError(f"decoder={decoder!r}: expected 'paged' or 'naive'")
    return dec, opts


def generate(prompts, *, progress=False, **kwargs):
    """Decode ``prompts`` (strings or token id lists). ``kwargs``: the models (``base``, ``tuned``, ``ref``,
    ``beta``, ``token_rm``, ``token_rm_weight``, ``tokenizer``, ``templates``), where they run (``device``,
    ``dtype``, ``backend``, ``block_size``, ``decoder``, ``cuda_graphs``) and :class:`DecodeOptions` fields.

    Returns one :class:`ivg.decoder.GenerationResult` per prompt, best beam first. Under ``torchrun``, see
    :func:`ivg.distributed.generate_sharded`.
    """
    dec, opts = make_decoder(**kwargs)
    results = dec.generate(prompts, opts, progress=progress)
    generate.last_stats = dec.last_stats
    return results


generate.last_stats = None
