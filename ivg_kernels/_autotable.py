"""Where ``backend="auto"`` runs the CUDA kernel of ``csrc/`` instead of the Triton one.

The rule: per op, a list of shape ranges ``(n_min, n_max, v_min, v_max)`` (inclusive) at which the
CUDA kernel's CUDA-graph-replay median time in ``benchmarks/RESULTS.md`` beat Triton's on every
measured shape in the range. Outside every range (and whenever the CUDA build is unavailable)
``"auto"`` keeps Triton on CUDA tensors. An op with no entry never picks CUDA automatically; pass
``backend="cuda"`` to force it.
"""
from __future__ import annotations

# No range yet: the CUDA kernels have not been measured faster than Triton anywhere (see RESULTS.md).
CUDA_WINS: dict[str, list[tuple[int, int, int, int]]] = {
    "guided_sample": [],
    "copy_blocks": [],
}


def prefers_cuda(op: str, n: int, v: int) -> bool:
    """True when the measured table puts CUDA ahead for ``op`` at ``n`` rows of width ``v``."""
    return any(n0 <= n <= n1 and v0 <= v <= v1 for n0, n1, v0, v1 in CUDA_WINS.get(op, ()))
