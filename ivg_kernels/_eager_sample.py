"""Repeated eager calls of :func:`ivg_kernels.guided_sample` without their checks and set-up (:mod:`._eager`).

A call's signature holds, for each tensor, :func:`._eager.tensor`'s part; for each plain scalar its type and
value, except ``seed`` and ``offset``, which change at every step (their value class only: what the kernels'
specialisation sees); the backend asked for and the environment the choice reads. It is remembered with its
launch (:class:`ivg_kernels._triton.sampling_kernels.SampleLaunch`) and the values the launch takes as constants.
Calls with tensor weights always take the full path. Nothing here holds a tensor.
"""
from __future__ import annotations

import torch

from . import _eager
from ._args import _to_int64

_TENSOR = torch.Tensor
# a tensor row parameter's dtype in the launch (another dtype is converted there: no signature)
_PARAM_DTYPES = (torch.float32, torch.int64, torch.float32, torch.float32, torch.int64, torch.int64)


class _Known(tuple):
    """A remembered call: ``(SampleLaunch, weight values, temperature, top_k, top_p, min_p values)``."""

    __slots__ = ()

    def current(self) -> bool:  # (a launch planned before a module setting changed: re-plan)
        return self[0].current()


CALLS = _eager.Calls()  # signature -> _Known


def _param(x, integer: bool):
    """A row parameter's part of a signature: a tensor's metadata or a plain scalar's type and value; None for
    anything else (an int for a float parameter is plain; a float for an integer one is not)."""
    if type(x) is _TENSOR:
        return _eager.tensor(x)
    return _eager.number(x, int) if integer else _eager.number(x, int, float)


def _key_class(x):
    """``seed``/``offset``'s part: a tensor's metadata, or an int's class as the kernels' specialisation sees it."""
    if type(x) is _TENSOR:
        return _eager.tensor(x)
    if type(x) is not int:
        return None
    x = _to_int64(x)
    return x == 1, x % 16 == 0, -0x80000000 <= x < 0x80000000


def signature(logits, guides, temperature, top_k, top_p, min_p, seed, offset, vocab_size, backend):
    """The call's signature (module docstring), or None for a call that always takes the full path."""
    if (not CALLS.enabled or type(logits) is not _TENSOR or type(guides) not in (list, tuple) or type(backend) is not str
            or _eager.compiling()):
        return None
    parts = [backend, _eager.environment(backend, logits), _eager.tensor(logits),
             vocab_size if vocab_size is None or type(vocab_size) is int else None]
    for pair in guides:
        if type(pair) not in (tuple, list) or len(pair) != 2:
            return None
        g, w = pair
        if type(g) is not _TENSOR or (type(w) is not float and type(w) is not int):
            return None  # (tensor weights: the full path)
        parts += (_eager.tensor(g), type(w), w)
    parts += (_param(temperature, False), _param(top_k, True), _param(top_p, False), _param(min_p, False),
              _key_class(seed), _key_class(offset))
    if None in parts[-6:] or (vocab_size is not None and parts[3] is None):
        return None
    return tuple(parts)


def remember(sig, run, args, row_params) -> None:
    """After a checked call of signature ``sig`` launched ``run(*args)`` (``bind_guided_sample``'s pair): keep it
    for the next calls of that signature, where every tensor row parameter (``row_params``: temperature, top_k,
    top_p, min_p, seed, offset) is what the launch takes as it is (its dtype, contiguous)."""
    for x, dtype in zip(row_params, _PARAM_DTYPES):
        if type(x) is _TENSOR and (x.dtype != dtype or not x.is_contiguous()):
            return  # the launch would take a converted copy: not this call's tensor
    _, w_vals, _, _, t_val, _, k_val, _, p_val, _, m_val, _, _, _, _ = args
    CALLS.put(sig, _Known((run, w_vals, t_val, k_val, p_val, m_val)))


def call(sig, logits, guides, temperature, top_k, top_p, min_p, seed, offset):
    """The six outputs of a call of a remembered signature, or None when ``sig`` is new."""
    known = CALLS.get(sig)
    if known is None:
        return None
    run, w_vals, t_val, k_val, p_val, m_val = known
    inputs = (logits, *[g for g, _ in guides])

    def ptr(x):
        return x if type(x) is _TENSOR else logits  # an absent tensor: never read

    sd, of = type(seed) is _TENSOR, type(offset) is _TENSOR
    return run(inputs, w_vals, logits, ptr(temperature), t_val, ptr(top_k), k_val, ptr(top_p), p_val, ptr(min_p),
               m_val, ptr(seed), 0 if sd else _to_int64(seed), ptr(offset), 0 if of else _to_int64(offset))
