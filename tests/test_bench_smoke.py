"""CPU smoke run of benchmarks/bench_sft.py (tiny shape, fp32): it runs, prints the table with
both paths, and our LVR loss equals the HF path's at the shared initial weights
(~10-30 s on a 2-core CPU: not marked slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_sft_smoke():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "benchmarks/bench_sft.py"), "--shape", "tiny",
           "--spec", "local", "--steps", "1", "--warmup", "0", "--seq-length", "512",
           "--image", "112"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    rows = {line.split("|")[1].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| path")}
    assert {"ours", "HF fastest", "HF seeds"} <= rows, proc.stdout
    m = re.search(r"^loss ours (\S+) / HF (\S+) \(fp32", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    ours, hf = float(m.group(1)), float(m.group(2))
    assert abs(ours - hf) <= 1e-4 * abs(hf), (ours, hf)
