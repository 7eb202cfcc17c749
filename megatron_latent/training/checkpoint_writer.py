"""megatron-core's checkpoint-writer manager process, tied to the life of the training process.

megatron-core spawns a multiprocessing Manager for its write results, and multiprocessing a
resource tracker beside it. A training process killed with SIGKILL (OOM killer, `scancel -s
KILL`, a crashed node agent) cannot shut them down: they were re-parented to PID 1 and lived on
(~35 MB each) until the node was rebooted. The manager here asks the kernel to kill it when its
parent dies (Linux PR_SET_PDEATHSIG); the tracker then sees its last pipe close and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_manager = None  # kept for the life of the process (its queue proxy refers to it too)


def _die_with_parent(parent: int) -> None:
    """In the manager process, first thing: SIGKILL when the parent goes; slurm's SIGTERM and
    SIGUSR1 ignored (the save they trigger needs the manager)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)


def start() -> None:
    """Start the manager once (call from the main thread: the kernel's parent-death signal
    follows the thread that spawned the child) and hand its queue to megatron-core."""
    global _manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
