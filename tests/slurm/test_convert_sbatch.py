"""slurm/convert.sbatch as slurm jobs: HF -> Megatron on TP=2 tasks spread over the two fake
nodes, then (chained with --dependency=afterok) Megatron -> HF on one task. Skipped until the
converters (tools/convert_*.py) exist."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TO_MEGATRON = REPO / "tools/convert_hf_to_megatron.py"
TO_HF = REPO / "tools/convert_megatron_to_hf.py"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not TO_MEGATRON.is_file(), reason="tools/convert_hf_to_megatron.py does not exist yet")
def test_convert_jobs(slurm_cluster, tiny_hf_dir, tmp_path):
    env = {**slurm_cluster.env, "TASKS_PER_NODE": "1", "LOG_DIR": str(tmp_path)}
    submit = REPO / "slurm/submit.sh"
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    to_mcore = slurm_cluster.submit(submit, "convert", "--parsable", "--", "--hf-dir", tiny_hf_dir,
                                    "--out", mcore, "--tp", "2", env=env, cwd=tmp_path)
    to_hf = None
    if TO_HF.is_file():
        to_hf = slurm_cluster.submit(submit, "convert", "--parsable",
                                     f"--dependency=afterok:{to_mcore}", "--", "--ckpt", mcore,
                                     "--out", hf, env=env, cwd=tmp_path)
    job = slurm_cluster.wait(to_mcore, timeout=120)
    log = job.log()
    assert job.state == "COMPLETED" and job.exit_code == "0:0", f"{job}\n{log[-4000:]}"
    assert "2 node(s) x 1 task(s) = world 2" in log and "hf-to-megatron on 2 task(s) over 2 node(s)" in log, log
    assert mcore.is_dir() and any(mcore.iterdir()), f"no output in {mcore}\n{log[-3000:]}"
    if to_hf is None:
        pytest.skip("tools/convert_megatron_to_hf.py does not exist yet (HF -> Megatron passed)")
    job = slurm_cluster.wait(to_hf, timeout=120)
    log = job.log()
    assert job.state == "COMPLETED" and job.exit_code == "0:0", f"{job}\n{log[-4000:]}"
    assert "megatron-to-hf on 1 task(s) over 1 node(s)" in log, log
    assert hf.is_dir() and (hf / "config.json").is_file(), f"no HF checkpoint in {hf}\n{log[-3000:]}"
