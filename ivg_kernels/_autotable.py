"""Where ``backend="auto"`` runs the CUDA kernel of ``csrc/`` instead of the Triton one.

The rule: per op, a list of shape ranges ``(n_min, n_max, v_min, v_max)`` (inclusive) at which the
CUDA kernel's CUDA-graph-replay median time in ``benchmarks/RESULTS.md`` beat Triton's on every
measured shape in the range. Outside every range (and whenever the CUDA build is unavailable)
``"auto"`` keeps Triton on CUDA tensors. An op with no entry never picks CUDA automatically; pass
``backend="cuda"`` to force it.
"""
from __future__ import annotations

# The sampler has no CUDA kernel any more: on the H100 run of 2026-11-22 (commit 8569e04, CUDA-graph
# medians) the CUDA sampler was slower than the Triton one at every measured shape (N 1..256, V 32000 and
# 151936, with and without top-k), from 1.5x (N=256, V=32000, no filter: 171 vs 67 us) to 45x (N=1,
# V=151936, top-k 50: 1628 vs 37 us), so it was dropped rather than kept beside the Triton one.
CUDA_WINS: dict[str, list[tuple[int, int, int, int]]] = {
    "copy_blocks": [],
}


def prefers_cuda(op: str, n: int, v: int) -> bool:
    """True when the measured table puts CUDA ahead for ``op`` at ``n`` rows of width ``v``."""
    return any(n0 <= n <= n1 and v0 <= v <= v1 for n0, n1, v0, v1 in CUDA_WINS.get(op, ()))
