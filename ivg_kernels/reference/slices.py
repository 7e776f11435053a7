"""How many rows a CPU reference takes per call, so that its temporaries stay in the cores' L2 caches.

The decode attention (``attention.CPU_GATHER_BYTES``), the sampler and the speculative verification
(``sampling.CPU_SAMPLE_BYTES``) work on their rows in slices of at most their budget per intra-op thread; off the
CPU every row goes in one call.
"""
from __future__ import annotations

import torch


def rows_per_slice(device: torch.device, rows: int, row_bytes: int, budget: int) -> int:
    """Rows of ``row_bytes`` each per slice within ``budget`` bytes per intra-op thread (at least one); ``rows``
    (one call) off the CPU."""
    if device.type != "cpu":
        return rows
    return max(1, budget * torch.get_num_threads() // max(1, row_bytes))
