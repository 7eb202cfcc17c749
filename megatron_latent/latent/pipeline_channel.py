"""Send a tensor made on the first pipeline stage to the last one (e.g. latent targets produced
next to the vision tower and consumed by the loss), alongside megatron's own p2p traffic.

Every schedule runs a micro-batch's forward on the first stage before the last stage's, so the
first stage posts a non-blocking send and the last stage receives when it needs the tensor.
Pending sends are completed by `finish_sends()` at the end of the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_pending: list = []


def first_to_last(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                  device) -> torch.Tensor | None:
    """First stage: pass `tensor` (returned as is when it is also the last stage). Last stage
    (not first): receive a tensor of `shape`. Other stages: None."""
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if first and last:
        return tensor
    if first:
        buf = tensor.detach().contiguous()
        _pending.append((dist.isend(buf, dst=ps.get_pipeline_model_parallel_last_rank()), buf))
        return None
    if last:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(buf, src=ps.get_pipeline_model_parallel_first_rank()).wait()
        return buf
    return None


def finish_sends() -> None:
    while _pending:
        work, _ = _pending.pop()
        work.wait()
