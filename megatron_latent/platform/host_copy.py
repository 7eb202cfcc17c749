"""Moving small values between host and GPU without waiting for the GPU.

A plain `.item()` / `.tolist()` / `.to(cuda)` from pageable memory waits for every kernel queued
before it; at a training step's boundary that drains the GPU while the host catches up. These
go through page-locked memory instead: an upload is queued like a kernel, and a download waits
for its own copy (an event), not for the work queued after it. On the CPU both are plain copies.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (host) on `device`, queued without waiting."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Download:
    """`t`'s values copied to the host behind the queued work; `values()` waits for that copy
    only."""

    def __init__(self, t: torch.Tensor):
        cuda = t.is_cuda
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        self.host.copy_(t, non_blocking=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        if self.ready is not None:
            self.ready.record()

    def values(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host
