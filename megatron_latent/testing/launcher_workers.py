"""Worker bodies for the launcher's own tests (module-level so spawned processes import them)."""

from __future__ import annotations

import time

import torch.distributed as dist


def fail_on_rank(bad_rank: int) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == bad_rank:
        raise ValueError("bad record 7")
    dist.barrier()  # never completes: the failing rank is gone


def sleep_forever() -> None:
    time.sleep(3600)
