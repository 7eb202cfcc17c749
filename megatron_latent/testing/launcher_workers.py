"""Worker bodies for the launcher's own tests and parallel.py's host groups (module-level so
spawned processes import them)."""

from __future__ import annotations

import os
import time

import torch.distributed as dist


def fail_on_rank(bad_rank: int) -> None:
    """`bad_rank` raises; every other rank blocks for an hour (gloo would notice the lost peer
    in a barrier and fail by itself, which would hide a launcher that waits)."""
    if int(os.environ["RANK"]) == bad_rank:
        raise ValueError("bad record 7")
    time.sleep(3600)


def sleep_forever() -> None:
    time.sleep(3600)


def collective_graph_teardown() -> None:
    """Capture a TP all-reduce in a decode-style graph, replay it, then tear down: the teardown
    must return (a live graph holding an NCCL collective used to block it for ever)."""
    import torch

    from megatron_latent import parallel
    from megatron_latent.inference.cuda_graph import GraphedIteration

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    from megatron.core import parallel_state as ps

    x = torch.ones(4096, device="cuda")
    y = torch.empty_like(x)

    def step():
        y.copy_(x)
        dist.all_reduce(y, group=ps.get_tensor_model_parallel_group())

    graphed = GraphedIteration(step, [y])
    graphed()
    graphed()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 2.0)), y[:4]
    parallel.destroy()  # returns, with `graphed` still referenced here


def host_max_across_reinit() -> None:
    """TP=2: the host agreement gives the larger rank's value on both ranks; after re-initialising
    as TP=1 (two DP replicas) each rank keeps its own, and the TP=2 gloo twin is gone."""
    from megatron_latent import parallel

    rank = int(os.environ["RANK"])
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    old = parallel._HOST_GROUPS["model"]
    assert parallel.model_parallel_max(3 + 4 * rank) == 7
    parallel.initialize(parallel.ParallelConfig())
    assert parallel.model_parallel_max(3 + 4 * rank) == 3 + 4 * rank
    try:
        dist.get_process_group_ranks(old)
    except (KeyError, ValueError, RuntimeError):
        pass  # destroyed
    else:
        raise AssertionError("the TP=2 host group outlived the re-initialisation")
    parallel.destroy()
