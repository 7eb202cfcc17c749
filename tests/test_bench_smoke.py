"""CPU smoke runs of the benchmarks (tiny shapes, local spec): bench_sft.py runs, prints the
table with both paths, and our LVR loss equals the HF path's at the shared initial weights;
bench_generate.py runs both generators over the same prompts (~10-30 s each on a 2-core CPU:
not marked slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--shape", "tiny",
           "--spec", "local", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def test_bench_sft_smoke():
    proc = _run("bench_sft.py", "--steps", "1", "--warmup", "0", "--seq-length", "512",
                "--image", "112")
    rows = {line.split("|")[1].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| path")}
    assert {"ours", "HF fastest", "HF seeds"} <= rows, proc.stdout
    m = re.search(r"^loss ours (\S+) / HF (\S+) \(fp32", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    ours, hf = float(m.group(1)), float(m.group(2))
    assert abs(ours - hf) <= 1e-4 * abs(hf), (ours, hf)


def test_bench_generate_smoke():
    proc = _run("bench_generate.py", "--batch", "2", "--new-tokens", "6", "--latent-steps", "2",
                "--text-tokens", "4", "--image", "56")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["batch"] for r in rows] == [2], proc.stdout
    # bf16 on both sides: only the latent steps are certain to agree (token equality with the
    # seeds' loop is tested in fp32 by tests/inference)
    assert rows[0]["same_tokens"] >= 2 / 6, rows


def test_bench_grpo_step_smoke(tmp_path):
    """The GRPO-step benchmark end to end (SFT, mismatch, both rollout precisions): in fp32 the
    rollout's log-probs are the training forward's; FP8 rollouts are not."""
    out = tmp_path / "grpo.json"
    _run("bench_grpo_step.py", "--sft-steps", "3", "--sft-timed", "1", "--steps", "1",
         "--prompts", "2", "--group", "2", "--micro-batch", "2", "--new-tokens", "16",
         "--image", "112", "--latent-steps", "4", "--text-tokens", "8", "--sft-seq-length", "64",
         "--language-vocab", "256", "--json-out", str(out))
    res = json.loads(out.read_text())
    for label in ("mismatch_random_init", "mismatch_trained"):
        assert res[label]["params"]["gap_max"] <= 1e-5, res[label]
        assert res[label]["fp8"]["gap"] > 1e-4, res[label]
    assert set(res["grpo"]) == {"params", "fp8"}
    assert abs(res["grpo"]["params"]["ratio"] - 1.0) <= 1e-5 and len(res["checks"]) == 3
