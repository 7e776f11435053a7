"""Alignment vectors (arXiv 2410.19206): ``theta(lambda) = theta_base + sum_j lambda_j * (theta_aligned_j - theta_base_j)``.

One knob per preference dimension or domain: the difference between an aligned model and the model it
was tuned from is a vector in weight space; scaling and adding it to a base model moves the base along
that preference at inference time, with no training.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Mapping, Sequence, Union

import torch

StateLike = Union[torch.nn.Module, Mapping[str, torch.Tensor]]


def _state(x: StateLike, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(x, torch.nn.Module):
        return x.state_dict()
    if isinstance(x, Mapping):
        return x
    raise ValueError(f"{name}: expected a torch.nn.Module or a state dict, got {type(x).__name__}")


def _arch(x) -> str:
    cfg = getattr(x, "config", None)
    return getattr(cfg, "model_type", None) or type(x).__name__


def apply_alignment_vectors(model: torch.nn.Module, vectors: Sequence, *, inplace: bool = False) -> torch.nn.Module:
    """Add ``sum_j lambda_j * (aligned_j - base_j)`` to ``model``'s floating-point weights.

    Parameters
    ----------
    model : the model to steer (``theta_base``)
    vectors : sequence of ``(aligned, base, lambda)``; ``aligned``/``base`` are modules or state dicts of
        the same architecture as ``model``
    inplace : change ``model`` itself; otherwise a deep copy is changed and returned

    Raises
    ------
    ValueError
        when an architecture, a parameter name or a shape differs, naming the first difference.
    """
    if isinstance(vectors, (torch.nn.Module, Mapping)) or not isinstance(vectors, Sequence):
        raise ValueError("vectors: expected a sequence of (aligned, base, lambda) triples")
    target = _state(model, "model")
    deltas = []
    for j, triple in enumerate(vectors):
        if not isinstance(triple, (tuple, list)) or len(triple) != 3:
            raise ValueError(f"vectors[{j}]: expected an (aligned, base, lambda) triple")
        aligned, base, lam = triple
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
            raise ValueError(f"vectors[{j}][2]={lam!r}: expected a finite float lambda")
        for side, other in (("aligned", aligned), ("base", base)):
            if isinstance(other, torch.nn.Module) and _arch(other) != _arch(model):
                raise ValueError(f"vectors[{j}] {side}: architecture {_arch(other)!r} differs from the model's "
                                 f"{_arch(model)!r}")
            st = _state(other, f"vectors[{j}] {side}")
            missing = [k for k in target if target[k].is_floating_point() and k not in st]
            if missing:
                raise ValueError(f"vectors[{j}] {side}: no parameter {missing[0]!r} (architectures differ)")
            for k, v in target.items():
                if v.is_floating_point() and tuple(st[k].shape) != tuple(v.shape):
                    raise ValueError(f"vectors[{j}] {side}: {k} has shape {tuple(st[k].shape)}, the model's "
                                     f"{tuple(v.shape)}")
        deltas.append((_state(aligned, "aligned"), _state(base, "base"), float(lam)))
    out = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        state = out.state_dict()
        seen = set()  # tied weights (GPT-2's lm_head and wte) share storage: update them once
        for k, v in state.items():
            if not v.is_floating_point() or v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            total = torch.zeros_like(v, dtype=torch.float64)
            for aligned, base, lam in deltas:
                if lam != 0.0:
                    total += lam * (aligned[k].to(v.device, torch.float64) - base[k].to(v.device, torch.float64))
            if any(lam != 0.0 for _, _, lam in deltas):
                v.copy_((v.double() + total).to(v.dtype))
    return out
