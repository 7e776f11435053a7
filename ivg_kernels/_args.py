"""Checking and normalising the arguments of :func:`ivg_kernels.guided_sample`.

Every backend goes through :func:`prepare_sample_args`, so every backend rejects
the same inputs with the same message. Only metadata is inspected: values held
in tensors are never read here (that would synchronise with the GPU); the kernels
flag rows whose tensor parameters are out of range instead (see ``SampleOutput.ok``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

MAX_GUIDES = 6
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

RowParam = Union[float, int, torch.Tensor]


@dataclass
class SampleArgs:
    logits: torch.Tensor  # [N, V_b]
    guides: list  # G tensors [N, V_i]
    weights: list  # G entries, float or float tensor [N]
    temperature: RowParam
    top_k: RowParam
    top_p: RowParam
    min_p: RowParam
    seed: RowParam  # int (normalised to the signed int64 range) or int64 tensor [N]
    offset: RowParam
    vocab_size: int

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    @property
    def any_filter_possible(self) -> bool:
        """False when no row can have top-k, top-p or min-p active (decided without reading tensors)."""
        k, p, m = self.top_k, self.top_p, self.min_p
        k_off = not isinstance(k, torch.Tensor) and (k <= 0 or k >= self.vocab_size)
        p_off = not isinstance(p, torch.Tensor) and p >= 1.0
        m_off = not isinstance(m, torch.Tensor) and m <= 0.0
        return not (k_off and p_off and m_off)


def _fail(name: str, value, expected: str):
    if isinstance(value, torch.Tensor):
        value = f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    raise ValueError(f"{name}={value!r}: expected {expected}")


def _check_matrix(name: str, t, n: Optional[int], device: Optional[torch.device]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if t.dim() != 2:
        _fail(name, t, "a 2-D tensor [N, V]")
    if t.dtype not in FLOAT_DTYPES:
        _fail(name, t, "dtype float32, bfloat16, float16 or float64")
    if n is not None and t.shape[0] != n:
        _fail(name, t, f"{n} rows, like logits")
    if device is not None and t.device != device:
        _fail(name, t, f"a tensor on {device}, like logits")
    if t.shape[1] < 1:
        _fail(name, t, "at least one column")
    if t.stride(1) != 1:
        _fail(name, t, "unit stride along the vocabulary (call .contiguous())")
    return t


def _check_row_tensor(name: str, t: torch.Tensor, n: int, device, integer: bool) -> torch.Tensor:
    if t.dim() != 1 or t.shape[0] != n:
        _fail(name, t, f"a scalar or a 1-D tensor of {n} rows")
    if t.device != device:
        _fail(name, t, f"a tensor on {device}, like logits")
    if integer and (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex()):
        _fail(name, t, "an integer tensor")
    if not integer and not t.dtype.is_floating_point:
        _fail(name, t, "a floating-point tensor")
    return t


def _scalar(name: str, value, integer: bool):
    kind = type(value)
    if kind is int or (kind is float and not integer and math.isfinite(value)):  # the common case, fast
        return value if integer else float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, "an int" if integer else "a float")
    if integer and not isinstance(value, numbers.Integral):
        _fail(name, value, "an int")
    if not integer and not math.isfinite(float(value)):
        _fail(name, value, "a finite number")
    return int(value) if integer else float(value)


def _to_int64(value: int) -> int:
    """Reduce an int modulo 2**64 and read it as a signed int64."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


# Range checks of the scalar row parameters: (test, what is expected).
_CHECKS = {
    "temperature": (lambda t: t >= 0, "a temperature >= 0 (0 is greedy)"),
    "top_k": (lambda k: k >= 0, "top_k >= 0 (0 disables top-k)"),
    "top_p": (lambda p: 0 < p <= 1, "top_p in (0, 1]"),
    "min_p": (lambda m: 0 <= m <= 1, "min_p in [0, 1]"),
}


def check_scalar_param(name: str, value, integer: bool):
    """A scalar row parameter (``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``offset``),
    checked for its type and range; raises ValueError naming it."""
    value = _scalar(name, value, integer)
    check = _CHECKS.get(name)
    if check is not None and not check[0](value):
        _fail(name, value, check[1])
    return value


def _row_param(name, value, integer, n, device):
    """A row parameter: a checked tensor ``[N]``, or a checked scalar."""
    if isinstance(value, torch.Tensor):
        return _check_row_tensor(name, value, n, device, integer)
    return check_scalar_param(name, value, integer)


def prepare_sample_args(logits, guides, temperature, top_k, top_p, min_p, seed, offset, vocab_size) -> SampleArgs:
    logits = _check_matrix("logits", logits, None, None)
    n, device = logits.shape[0], logits.device
    if not isinstance(guides, (list, tuple)) and (isinstance(guides, (torch.Tensor, str))
                                                  or not isinstance(guides, Sequence)):
        _fail("guides", type(guides).__name__, "a sequence of (tensor [N, V_i], weight) pairs")
    if len(guides) > MAX_GUIDES:
        _fail("guides", f"{len(guides)} pairs", f"at most {MAX_GUIDES} (tensor, weight) pairs")
    tensors, weights = [], []
    narrowest = logits.shape[1]
    for i, pair in enumerate(guides):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            _fail(f"guides[{i}]", type(pair).__name__, "a (tensor [N, V_i], weight) pair")
        g, w = pair
        tensors.append(_check_matrix(f"guides[{i}][0]", g, n, device))
        narrowest = min(narrowest, g.shape[1])
        if isinstance(w, torch.Tensor):
            weights.append(_check_row_tensor(f"guides[{i}][1]", w, n, device, integer=False))
        else:
            weights.append(_scalar(f"guides[{i}][1]", w, integer=False))

    if vocab_size is None:
        vocab_size = narrowest
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
            _fail("vocab_size", vocab_size, "a positive int or None")
        if vocab_size > narrowest:
            _fail("vocab_size", vocab_size, f"at most {narrowest}, the narrowest input row")
        vocab_size = int(vocab_size)

    temperature = _row_param("temperature", temperature, False, n, device)
    top_k = _row_param("top_k", top_k, True, n, device)
    top_p = _row_param("top_p", top_p, False, n, device)
    min_p = _row_param("min_p", min_p, False, n, device)
    seed = _row_param("seed", seed, True, n, device)
    offset = _row_param("offset", offset, True, n, device)
    if not isinstance(seed, torch.Tensor):
        seed = _to_int64(seed)
    if not isinstance(offset, torch.Tensor):
        offset = _to_int64(offset)
    return SampleArgs(logits, tensors, weights, temperature, top_k, top_p, min_p, seed, offset, vocab_size)


def row_tensor(value: RowParam, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A row parameter as a tensor ``[n]`` of ``dtype`` (no host sync for tensors)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.full((n,), value, dtype=dtype, device=device)
