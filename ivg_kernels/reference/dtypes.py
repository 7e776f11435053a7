"""``as_dtype``: a tensor in a dtype, without an op call when it already is one.

The CPU references convert their inputs to the accumulation dtype on every call; ``Tensor.to`` costs about
1.8 us on the CPU even when it returns its input (a dtype check, 0.2 us), and a one-row decode step of a 4-layer
model made two dozen such calls.
"""
from __future__ import annotations

import torch


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``: ``t`` itself when it has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)
