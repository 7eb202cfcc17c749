"""Run a function on N gloo processes (CPU) from a test, the way torchrun would launch them."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, errq):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    hang_s = float(os.environ.get("MEGATRON_LATENT_HANG_DUMP_S", 0))
    if hang_s > 0:  # a deadlocked collective: every rank prints where it waits, then exits
        faulthandler.dump_traceback_later(hang_s, exit=True)
    try:
        fn(*args)
    except BaseException:
        tb = traceback.format_exc()
        # printed at once: the parent kills every rank as soon as one fails (its peers would
        # wait forever in their next collective, and so would this rank's teardown)
        print(f"[rank {rank}] failed:\n{tb}", file=sys.stderr, flush=True)
        errq.put((rank, tb))
        raise
    from megatron_latent import parallel

    parallel.destroy()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> None:
    """`fn(*args)` on each rank; it must be importable (module-level). Raises with the first
    failing rank's traceback as soon as any rank fails (the others are killed), or when the
    ranks are still running after `timeout` seconds."""
    ctx = mp.get_context("spawn")
    errq = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errq))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
    try:
        rank, tb = errq.get(timeout=1.0)
    except queue.Empty:
        rank = None
    if rank is not None:
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if i not in hung and p.exitcode != 0]
    if bad:
        raise RuntimeError(f"ranks exited abnormally (rank, exit code): {bad}")
    if hung:
        raise RuntimeError(f"ranks {hung} still running after {timeout:.0f} s (killed): a hang?")
