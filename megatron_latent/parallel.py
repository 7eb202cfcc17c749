"""Process-group set-up: torch.distributed + megatron-core model-parallel state + seeds.

NCCL on GPUs, gloo on CPU (with the CPU shim). Launch with torchrun or srun; a single process
without any launcher also works (world size 1, a private TCP store on localhost).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_latent.platform import cpu_shim
from megatron_latent.platform.devices import device  # noqa: F401  (parallel.device)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """`srun` with one task per GPU: derive torchrun-style variables from SLURM_* ones. Only srun
    tasks have SLURM_STEP_ID; the batch shell itself (SLURM_PROCID=0 too) is left alone."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:  # same rule as slurm/common.sh
        first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 12000))


def initialize(parallel: ParallelConfig = ParallelConfig(), seed: int = 1234) -> None:
    """Initialise torch.distributed (if needed), megatron's parallel state and the RNGs."""
    from megatron.core import parallel_state

    on_cpu = cpu_shim.install()
    cpu_shim.patch_torch_norm_for_sequence_parallel()
    _env_from_slurm()
    if not dist.is_initialized():
        backend = "gloo" if on_cpu else "nccl"
        if not on_cpu:
            # % device_count: also right where slurm binds one GPU per task
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:  # a plain `python script.py`: world of one, without touching os.environ
            dist.init_process_group(backend=backend, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
    world = dist.get_world_size()
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    if world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by tensor ({tp}) x pipeline ({pp}) x context "
            f"({cp}) parallel sizes = {tp * pp * cp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _destroy_host_groups()  # a re-initialisation must not leave the old twins alive
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    from megatron_latent.latent import pipeline_channel

    pipeline_channel.setup()
    _HOST_GROUPS["model"] = _gloo_twin(parallel_state.get_model_parallel_group())
    set_seed(seed)


# Gloo twins of process groups, for agreeing on host values (a step's padded length) without a
# GPU round trip: reading a device result back waits for every kernel queued before it, which
# would drain the GPU at every step boundary.
_HOST_GROUPS: dict[str, dist.ProcessGroup | None] = {}


def _gloo_twin(group) -> dist.ProcessGroup:
    """A gloo group over the same ranks as `group` (collective: every rank calls it)."""
    mine = dist.get_process_group_ranks(group)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    twin = None
    for ranks in sorted({tuple(r) for r in everyone}):
        g = dist.new_group(list(ranks), backend="gloo")
        if dist.get_rank() in ranks:
            twin = g
    return twin


def _destroy_host_groups() -> None:
    for group in _HOST_GROUPS.values():
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
    _HOST_GROUPS.clear()


def model_parallel_max(value: int) -> int:
    """The largest `value` over this rank's model-parallel (TP x PP) ranks, agreed on the host
    through gloo: no GPU work, no wait for the GPU."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_world_size(_HOST_GROUPS["model"]) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUPS["model"])
    return int(t)


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch and megatron's per-TP-rank RNG tracker (CPU twin on CPU)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if cpu_shim.cuda_available():
        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        cpu_shim.seed_cpu_rng_tracker(seed, tp_rank)


def destroy() -> None:
    from megatron.core import parallel_state

    from megatron_latent.platform import graph_registry

    graph_registry.drop_all()  # graphs holding NCCL collectives block the teardown
    _HOST_GROUPS.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
