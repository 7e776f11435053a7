"""Repeated eager calls without their checks: what the public functions that remember calls share.

A decode loop calls an op with the same kinds of arguments at every step (the same shapes, dtypes, strides,
device and settings; new values). The first call of a kind runs the full path: every argument checked, the
backend resolved, the launch planned. When it launches Triton kernels, its *signature* is remembered with
the planned launch; a later call with an equal signature launches at once, since the checks and the choices
depend only on what the signature holds and would pass and choose alike. A signature is built from the parts
below; an argument of any other kind (a tensor subclass, a numpy scalar, a bool where a number is expected)
gives no signature, and the call takes the full path, as do calls inside a ``torch.compile`` trace. Nothing
remembered holds a tensor.
"""
from __future__ import annotations

import os

import torch

_TENSOR = torch.Tensor
compiling = torch.compiler.is_compiling


def tensor(x):
    """A tensor's part of a signature: dtype, device, shape, strides and whether it starts on 16 bytes (what
    the checks read and the kernels' specialisation sees); None for anything but a plain tensor."""
    if type(x) is _TENSOR:
        return x.dtype, x.device, x.shape, x.stride(), x.data_ptr() & 15 == 0
    return None


def optional_tensor(x):
    """:func:`tensor`'s part, with ``False`` for an absent (None) argument."""
    return False if x is None else tensor(x)


def number(x, *kinds):
    """A plain scalar's part: its type and value, when its type is exactly one of ``kinds``; None otherwise."""
    kind = type(x)
    return (kind, x) if kind in kinds else None


def environment(backend: str, x: torch.Tensor) -> tuple:
    """What the backend's choice reads from the environment for tensors like ``x``: ``IVG_BACKEND`` when
    ``backend`` is ``"auto"``, and off CUDA ``TRITON_INTERPRET`` (the interpreter runs such tensors on the Triton
    path)."""
    get = os.environ.get
    return get("IVG_BACKEND") if backend == "auto" else None, None if x.is_cuda else get("TRITON_INTERPRET")


class Calls:
    """Signature -> what its first checked call launched (a callable), bounded: a process that calls at ever new
    shapes starts over. ``enabled`` False: every call takes the full path (benchmarks compare the two)."""

    __slots__ = ("table", "limit", "enabled")

    def __init__(self, limit: int = 1024):
        self.table, self.limit, self.enabled = {}, limit, True

    def get(self, sig):
        """The remembered launch of ``sig`` if it still holds (``current()``), else None."""
        known = self.table.get(sig) if sig is not None else None
        return known if known is not None and known.current() else None

    def put(self, sig, launch) -> None:
        if len(self.table) >= self.limit:
            self.table.clear()
        self.table[sig] = launch
