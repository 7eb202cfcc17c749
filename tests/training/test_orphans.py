"""Issue 19, item 11: a training process killed with SIGKILL leaves no checkpoint-writer manager
or multiprocessing resource tracker behind (they used to live on under PID 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

WORKER = """
import sys, time
if __name__ == "__main__":
    import psutil
    from megatron_latent.training.run import start_checkpoint_writer
    start_checkpoint_writer()
    print(" ".join(str(c.pid) for c in psutil.Process().children(recursive=True)), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_leaves_no_helper_processes(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "worker.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    helpers = [int(p) for p in proc.stdout.readline().split()]
    try:
        assert len(helpers) == 2, helpers  # the manager and the resource tracker
        manager = [p for p in helpers if "resource_tracker" not in " ".join(
            psutil.Process(p).cmdline())]
        os.kill(manager[0], signal.SIGTERM)  # slurm's signal must not take the manager down
        time.sleep(1)
        assert _alive(manager[0])
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(map(_alive, helpers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in helpers if _alive(p)], "helpers outlived a SIGKILLed trainer"
    finally:
        proc.kill()
        for p in helpers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)  # our own test's children, by pid
