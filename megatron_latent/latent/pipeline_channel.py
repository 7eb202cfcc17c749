"""Send a tensor made on the first pipeline stage to the last one (e.g. latent targets produced
next to the vision tower and consumed by the loss), alongside megatron's own p2p traffic.

Every schedule runs a micro-batch's forward on the first stage before the last stage's, so the
first stage posts a non-blocking send and the last stage receives when it needs the tensor.
Pending sends are completed by `finish_sends()` at the end of the step.

The traffic uses its own process group per pipeline (first and last rank), created and warmed
up by `setup()` at start-up: on NCCL a communicator created lazily by the first send would block
that rank until its peer joins, while the peer waits for activations in the schedule (deadlock),
and sharing the schedule's communicator would interleave the two streams of sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_pending: list = []
_group = None


def setup() -> None:
    """Call on every rank after megatron's parallel state exists (all ranks create all groups)."""
    global _group
    _group = None
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    for ranks in _pipelines():
        pair = [ranks[0], ranks[-1]]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            _group = group
    if _group is not None:
        # NCCL makes a separate communicator for point-to-point traffic on first use; make it
        # now with one send/recv while both ranks are here (an all_reduce would not)
        from megatron_latent.platform.devices import device

        dev = device()
        buf = torch.zeros(1, device=dev)
        first, last = (ps.get_pipeline_model_parallel_first_rank(),
                       ps.get_pipeline_model_parallel_last_rank())
        if dist.get_rank() == first:
            dist.send(buf, dst=last, group=_group)
        else:
            dist.recv(buf, src=first, group=_group)


def _pipelines() -> list[list[int]]:
    """Every pipeline's global ranks, as megatron's parallel state grouped them."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered,
                           dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()))
    return [list(g) for g in sorted({tuple(g) for g in gathered})]


def first_to_last(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                  device) -> torch.Tensor | None:
    """First stage: pass `tensor` (returned as is when it is also the last stage). Last stage
    (not first): receive a tensor of `shape`. Other stages: None."""
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if first and last:
        return tensor
    if first:
        buf = tensor.detach().contiguous()
        _pending.append((dist.isend(buf, dst=ps.get_pipeline_model_parallel_last_rank(),
                                    group=_group), buf))
        return None
    if last:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(buf, src=ps.get_pipeline_model_parallel_first_rank(), group=_group).wait()
        return buf
    return None


def finish_sends() -> None:
    while _pending:
        work, _ = _pending.pop()
        work.wait()
