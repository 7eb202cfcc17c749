"""Run a check module under Triton's CPU interpreter. TRITON_INTERPRET=1 must be set before
triton is imported, hence a separate process; fp32 only (the interpreter does not model bf16)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(module: str, *args: str, timeout: float = 600) -> str:
    """`python -m module args...` with the interpreter on and no GPU; its stdout. Raises with
    the process's stderr tail when it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout
