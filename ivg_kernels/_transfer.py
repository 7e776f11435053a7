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


def to_device_many(tensors, device) -> list:
    """Several host integer tensors on ``device`` in one copy (:func:`to_device` of their concatenation,
    split back into views of their shapes and dtypes); on the CPU they are returned as they are."""
    if torch.device(device).type != "cuda":
        return [t.to(device) for t in tensors]
    moved = to_device(torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]), device)
    out, start = [], 0
    for t in tensors:
        out.append(moved[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out
