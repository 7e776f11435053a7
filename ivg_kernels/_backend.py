"""Which implementation runs an op: ``"reference"`` (plain torch) or ``"triton"``.

``backend="auto"`` picks Triton for CUDA tensors when triton imports, else the
reference. The environment variable ``IVG_BACKEND`` (``reference`` or ``triton``)
replaces ``"auto"``, so tests and benchmarks can force either path; an explicit
``backend=`` argument always wins.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "IVG_BACKEND"


# Looked up once at import (find_spec imports nothing): a plain bool is also what torch.compile can trace.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor, *, triton_dtypes=None) -> str:
    """The backend that will run, or a ValueError that says why the requested one can't."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {', '.join(BACKENDS)}")
        backend = env
    if backend == "auto":
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
    return backend
