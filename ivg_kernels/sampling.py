"""Fused guided sampling: combine the base logits with weighted guide logits, warp, draw.

The public function dispatches to the plain-torch reference
(:mod:`ivg_kernels.reference.sampling`, which defines the maths) or to the fused
Triton kernel (:mod:`ivg_kernels._triton.sampling_kernels`, registered as the torch
op ``torch.ops.ivg_kernels.guided_sample``).
"""
from __future__ import annotations

import functools

import torch

from . import _eager_sample
from ._args import SampleArgs, prepare_sample_args
from ._backend import resolve_backend
from ._types import SampleOutput
from .reference.sampling import _guided_sample_ref

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def guided_sample(
    logits,
    guides=(),
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed,
    offset,
    vocab_size=None,
    backend="auto",
) -> SampleOutput:
    """Draw one token per row from ``z = logits + sum_i w_i * guide_i``, warped.

    Parameters
    ----------
    logits : float tensor ``[N, V_b]`` (float32, bfloat16, float16; float64 on the reference)
        Base model logits at the last position.
    guides : sequence of ``(tensor [N, V_i], weight)``, at most 6
        Guide logits and their weights; a weight is a float or a float tensor ``[N]``.
        An EFT guide pair with strength ``beta`` is ``[(tuned, beta), (ref, -beta)]``.
    temperature : float or float tensor ``[N]``
        ``0`` is greedy (ties to the lowest id).
    top_k : int or int tensor ``[N]``
        Keep the ``top_k`` highest scores (ties kept); ``0`` disables.
    top_p : float or float tensor ``[N]``
        Nucleus mass in ``(0, 1]``; ``1`` disables. Always exact.
    min_p : float or float tensor ``[N]``
        Keep tokens with probability ``>= min_p * max probability``; ``0`` disables.
    seed, offset : int or int64 tensor ``[N]``
        Key of the counter-based random stream; the same key draws the same token on
        every backend. Advance ``offset`` every step.
    vocab_size : int, optional
        Columns to use (``V``); default the narrowest input. Padded columns are ignored.
    backend : ``"auto"``, ``"reference"`` or ``"triton"``
        ``"auto"`` honours the ``IVG_BACKEND`` environment variable, then runs Triton on CUDA
        tensors and the reference elsewhere. (There is no CUDA C++ sampler: the one this project
        had was slower than Triton at every measured shape, and was dropped.)

    Returns
    -------
    SampleOutput
        ``tokens``, ``logprob``, ``logsumexp``, ``input_logprobs``, ``input_logits``, ``ok``.
        Rows with NaN/``+inf`` or no finite candidate are flagged ``ok=False`` with token
        ``-1`` (never raised here: that would synchronise); ``SampleOutput.check()`` raises.

    Raises
    ------
    ValueError
        On a wrong shape, dtype, device or out-of-range scalar, naming the argument.
    """
    sig = _eager_sample.signature(logits, guides, temperature, top_k, top_p, min_p, seed, offset, vocab_size, backend)
    if sig is not None:  # a call of a kind already checked and launched: launch at once (ivg_kernels/_eager_sample.py)
        out = _eager_sample.call(sig, logits, guides, temperature, top_k, top_p, min_p, seed, offset)
        if out is not None:
            return SampleOutput(*out)
    a = prepare_sample_args(logits, guides, temperature, top_k, top_p, min_p, seed, offset, vocab_size)
    which = resolve_backend(backend, a.logits, triton_dtypes=TRITON_DTYPES, op="guided_sample")
    if which == "reference":
        return _guided_sample_ref(a)
    if sig is None:
        return _guided_sample_triton(a)
    run, args = _sampling_kernels().bind_guided_sample(*_launcher_args(a))
    _eager_sample.remember(sig, run, args, (temperature, top_k, top_p, min_p, seed, offset))
    return SampleOutput(*run(*args))


@functools.cache
def _sampling_kernels():
    """The Triton kernels' module, imported on first use (an import statement per call costs microseconds)."""
    from ._triton import sampling_kernels  # also registers the op

    return sampling_kernels


def _kernel_args(a: SampleArgs):
    """What the Triton launcher (and its op) takes: ``weight_rows`` (float32 ``[N, G]`` when any weight is a
    tensor, else None), ``weight_scalars``, and each per-row parameter as a ``(tensor or None, scalar)`` pair."""
    n = a.num_rows
    if any(isinstance(w, torch.Tensor) for w in a.weights):
        weight_rows = torch.stack(
            [w.float() if isinstance(w, torch.Tensor) else torch.full((n,), w, device=a.logits.device) for w in a.weights],
            dim=1,
        )  # [N, G]
        weight_scalars = []
    else:
        weight_rows, weight_scalars = None, [float(w) for w in a.weights]
    params = []
    for v in (a.temperature, a.top_k, a.top_p, a.min_p, a.seed, a.offset):
        params += (v, 0) if isinstance(v, torch.Tensor) else (None, v)
    return weight_rows, weight_scalars, params


def _launcher_args(a: SampleArgs, block: int = 0) -> tuple:
    """The Triton launcher's (and its op's) arguments for checked arguments ``a``."""
    weight_rows, weight_scalars, params = _kernel_args(a)
    return (a.logits, a.guides, weight_scalars, weight_rows, *params, a.vocab_size, a.any_filter_possible, block)


def _guided_sample_triton(a: SampleArgs, block: int = 0) -> SampleOutput:
    """Eager calls launch the kernels directly (two launches, no op dispatch); under torch.compile
    the call goes through the registered op, which the compiler keeps as one opaque node."""
    if torch.compiler.is_compiling():
        from ._triton import sampling_kernels  # noqa: F401 - registers the op

        launch = torch.ops.ivg_kernels.guided_sample
    else:
        launch = _sampling_kernels().launch_guided_sample
    return SampleOutput(*launch(*_launcher_args(a, block)))
