"""benchmarks/trace_gaps.py on a hand-built trace: the GPU idle gaps are summed by the Python
frames around the launch call that ended each gap (worked by hand below)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _trace() -> dict:
    # GPU: kernel a [0, 10), kernel b [60, 70) (gap 50 us, launched at t=55 from step.py's
    # forward), kernel c [70, 80) (no gap), kernel d [200, 210) (gap 120 us, launched at t=190
    # from vision.py's run); a 10 us gap before e [220, 230) stays under --min-us 20.
    def k(name, ts, corr):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": 10, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": 1,
                "args": {"correlation": corr}}

    def frame(name, ts, dur, tid=1):
        return {"cat": "python_function", "name": name, "ts": ts, "dur": dur, "tid": tid}

    return {"traceEvents": [
        k("a", 0, 1), k("b", 60, 2), k("c", 70, 3), k("d", 200, 4), k("e", 220, 5),
        launch(55, 2), launch(56, 3), launch(190, 4), launch(215, 5),
        frame("megatron_latent/training/step.py(10): forward", 40, 30),
        frame("torch/nn/modules/module.py(1): _call_impl", 50, 10),  # not ours: skipped
        frame("megatron_latent/models/qwen25vl/vision.py(20): run", 180, 20),
        frame("megatron_latent/other.py(1): elsewhere", 180, 20, tid=2),  # other thread
    ]}


def test_gaps_by_code(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/trace_gaps.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "idle in gaps > 20 us: 0.2 ms in 2 gaps" in lines[0], out  # 50 + 120 us
    assert "0.12 ms" in lines[1] and lines[1].endswith("vision.py(20): run"), out
    assert "0.05 ms" in lines[2] and lines[2].endswith("step.py(10): forward"), out
    assert len(lines) == 3, out
