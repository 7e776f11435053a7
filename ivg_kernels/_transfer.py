"""Host-to-device copies that never make the host wait for the device."""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` on ``device`` without stalling the host: a host tensor bound for a GPU is staged in pinned
    memory and copied asynchronously (a copy from pageable memory may wait for the stream to drain;
    torch's pinned-memory cache keeps the staging buffer until the copy has run, so ``x`` may be dropped
    at once); a tensor already there is returned as it is. The decoder's per-step host-to-device copies
    go through here, so a step only queues work on the device."""
    x = torch.as_tensor(x)
    if torch.device(device).type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
