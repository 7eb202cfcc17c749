"""This rank's compute device (a leaf module: the parallel setup and the pipeline channel both
read it)."""

from __future__ import annotations

import torch


def device() -> torch.device:
    """This rank's compute device: its GPU, or the CPU (the CPU shim's world)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
