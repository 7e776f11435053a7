"""Which implementation runs an op: ``"reference"`` (plain torch), ``"triton"`` or ``"cuda"`` (csrc/).

``backend="auto"`` picks, for CUDA tensors, the CUDA kernel where :mod:`ivg_kernels._autotable`
says it was measured faster at that shape, else Triton when triton imports; for CPU tensors the
reference. The environment variable ``IVG_BACKEND`` (``reference``, ``triton`` or ``cuda``)
replaces ``"auto"``, so tests and benchmarks can force either path; an explicit
``backend=`` argument always wins.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
ENV_VAR = "IVG_BACKEND"


# Looked up once at import (find_spec imports nothing): a plain bool is also what torch.compile can trace.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_warned_cuda = False  # set once the CUDA build failed: "auto" stops trying (a failing build takes seconds)


def _cuda_loads() -> bool:
    global _warned_cuda
    from .build import load

    if _warned_cuda:
        return False
    try:
        load()
        return True
    except (RuntimeError, FileNotFoundError) as e:
        if not _warned_cuda:
            import warnings

            warnings.warn(f"ivg_kernels: backend='auto' keeps Triton: the CUDA kernels are unavailable ({e})",
                          stacklevel=3)
            _warned_cuda = True
        return False


def resolve_backend(backend: str, tensor: torch.Tensor, *, triton_dtypes=None, cuda_dtypes=None, op=None,
                    size=None) -> str:
    """The backend that will run, or a ValueError that says why the requested one can't.

    ``cuda_dtypes`` is None for an op with no CUDA kernel; ``op`` and ``size`` (rows, width) look the
    shape up in the measured table for ``"auto"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {', '.join(BACKENDS)}")
        backend = env
    if backend == "auto":
        if (tensor.is_cuda and cuda_dtypes is not None and tensor.dtype in cuda_dtypes and op is not None
                and size is not None):
            from ._autotable import prefers_cuda

            if prefers_cuda(op, *size) and _cuda_loads():
                return "cuda"
        usable = triton_available() and tensor.is_cuda
        if triton_dtypes is not None and tensor.dtype not in triton_dtypes:
            usable = False
        return "triton" if usable else "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton': triton is not installed (pip install triton)")
        if not (tensor.is_cuda or triton_interpreted()):
            raise ValueError(
                f"backend='triton': the inputs are on {tensor.device}; expected CUDA tensors, "
                "or TRITON_INTERPRET=1 to run the kernels in the interpreter on the CPU"
            )
        if triton_dtypes is not None and tensor.dtype not in triton_dtypes:
            raise ValueError(f"backend='triton': dtype {tensor.dtype} is not supported; expected one of {triton_dtypes}")
    if backend == "cuda":
        if cuda_dtypes is None:
            raise ValueError("backend='cuda': this op has no CUDA kernel; expected 'auto', 'reference' or 'triton'")
        if not tensor.is_cuda:
            raise ValueError(f"backend='cuda': the inputs are on {tensor.device}; expected CUDA tensors")
        if tensor.dtype not in cuda_dtypes:
            raise ValueError(f"backend='cuda': dtype {tensor.dtype} is not supported; expected one of {cuda_dtypes}")
    return backend
