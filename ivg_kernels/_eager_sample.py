"""Repeated eager calls of :func:`ivg_kernels.guided_sample` without their checks and set-up.

A decode loop calls the sampler with the same kinds of arguments at every step: the same shapes, dtypes,
strides, device, weights and filters, a new seed or offset. The first call of a kind runs the full path
(every argument checked, the backend resolved, the launch planned). When it launches the Triton kernels, its
*signature* is remembered with its launch (:class:`ivg_kernels._triton.sampling_kernels.SampleLaunch`) and the
values the launch takes as constants. A later call with an equal signature launches at once: the checks and the
backend's choice depend only on what the signature holds, so they would pass and choose alike.

A signature holds, for each tensor, its dtype, device, shape, strides and whether it starts on 16 bytes;
for each plain scalar, its type and value, except ``seed`` and ``offset``, which change at every step (their
value class only: what the kernels' specialisation sees); the backend asked for and the environment variables
the choice reads. Calls with other kinds of arguments (tensor weights, numpy scalars, tensor subclasses, a
``torch.compile`` trace) always take the full path. Nothing here holds a tensor.
"""
from __future__ import annotations

import os

import torch

from ._args import _to_int64

_CALLS: dict = {}  # signature -> (SampleLaunch, weight values, temperature, top_k, top_p, min_p values)
MAX_SIGNATURES = 1024  # (a bound: a process that samples at ever new shapes starts over)
_TENSOR = torch.Tensor
_compiling = torch.compiler.is_compiling
# a tensor row parameter's dtype in the launch (another dtype is converted there: no signature)
_PARAM_DTYPES = (torch.float32, torch.int64, torch.float32, torch.float32, torch.int64, torch.int64)


ENABLED = True  # False: every call takes the full path (benchmarks compare the two)


def _param(x, integer: bool):
    """A row parameter's part of a signature: a tensor's metadata or a plain scalar's type and value; None for
    anything else (an int for a float parameter is plain; a float for an integer one is not)."""
    kind = type(x)
    if kind is _TENSOR:
        return x.dtype, x.device, x.shape, x.stride(), x.data_ptr() & 15 == 0
    if kind is int or (kind is float and not integer):
        return kind, x
    return None


def _key_class(x):
    """``seed``/``offset``'s part: a tensor's metadata, or an int's class as the kernels' specialisation sees it."""
    kind = type(x)
    if kind is _TENSOR:
        return x.dtype, x.device, x.shape, x.stride(), x.data_ptr() & 15 == 0
    if kind is not int:
        return None
    x = _to_int64(x)
    return x == 1, x % 16 == 0, -0x80000000 <= x < 0x80000000


def signature(logits, guides, temperature, top_k, top_p, min_p, seed, offset, vocab_size, backend):
    """The call's signature (module docstring), or None for a call that always takes the full path."""
    if not ENABLED or type(logits) is not _TENSOR or type(guides) not in (list, tuple) or _compiling():
        return None
    parts = [backend, logits.dtype, logits.device, logits.shape, logits.stride(), logits.data_ptr() & 15 == 0,
             vocab_size if vocab_size is None or type(vocab_size) is int else None]
    for pair in guides:
        if type(pair) not in (tuple, list) or len(pair) != 2:
            return None
        g, w = pair
        if type(g) is not _TENSOR or (type(w) is not float and type(w) is not int):
            return None  # (tensor weights: the full path)
        parts += (g.dtype, g.device, g.shape, g.stride(), g.data_ptr() & 15 == 0, type(w), w)
    parts += (_param(temperature, False), _param(top_k, True), _param(top_p, False), _param(min_p, False),
              _key_class(seed), _key_class(offset))
    if None in parts[-6:] or (vocab_size is not None and parts[6] is None):
        return None
    if backend == "auto":
        parts.append(os.environ.get("IVG_BACKEND"))
    if not logits.is_cuda:  # (the interpreter runs CPU tensors on the Triton path)
        parts.append(os.environ.get("TRITON_INTERPRET"))
    return tuple(parts)


def remember(sig, run, args, row_params) -> None:
    """After a checked call of signature ``sig`` launched ``run(*args)`` (``bind_guided_sample``'s pair): keep it
    for the next calls of that signature, where every tensor row parameter (``row_params``: temperature, top_k,
    top_p, min_p, seed, offset) is what the launch takes as it is (its dtype, contiguous)."""
    for x, dtype in zip(row_params, _PARAM_DTYPES):
        if type(x) is _TENSOR and (x.dtype != dtype or not x.is_contiguous()):
            return  # the launch would take a converted copy: not this call's tensor
    if len(_CALLS) >= MAX_SIGNATURES:
        _CALLS.clear()
    _, w_vals, _, _, t_val, _, k_val, _, p_val, _, m_val, _, _, _, _ = args
    _CALLS[sig] = (run, w_vals, t_val, k_val, p_val, m_val)


def call(sig, logits, guides, temperature, top_k, top_p, min_p, seed, offset):
    """The six outputs of a call of a remembered signature, or None when ``sig`` is new."""
    known = _CALLS.get(sig)
    if known is None or not known[0].current():  # (a launch planned before a module setting changed: re-plan)
        return None
    run, w_vals, t_val, k_val, p_val, m_val = known
    inputs = (logits, *[g for g, _ in guides])

    def ptr(x):
        return x if type(x) is _TENSOR else logits  # an absent tensor: never read

    sd, of = type(seed) is _TENSOR, type(offset) is _TENSOR
    return run(inputs, w_vals, logits, ptr(temperature), t_val, ptr(top_k), k_val, ptr(top_p), p_val, ptr(min_p),
               m_val, ptr(seed), 0 if sd else _to_int64(seed), ptr(offset), 0 if of else _to_int64(offset))
