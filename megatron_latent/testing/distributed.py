"""Run a function on N gloo processes (CPU) from a test, the way torchrun would launch them."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import socket
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
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        from megatron_latent import parallel

        parallel.destroy()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> None:
    """`fn(*args)` on each rank; it must be importable (module-level). Raises with the first
    failing rank's traceback."""
    ctx = mp.get_context("spawn")
    errq = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errq))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errq.empty():
        rank, tb = errq.get()
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"ranks exited abnormally (rank, exit code): {bad}")
