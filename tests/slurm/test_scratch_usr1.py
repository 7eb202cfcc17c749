# SCRATCH (to be deleted): does the pre-timeout USR1 path save on the signal?
import time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[2]
LVR = REPO / "pretrain_scripts/pretrain_lvr.py"
FIX = """\
import signal, runpy, sys
if FIXED:
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)}
    filesystem_async.get_write_results_queue()
    for s, h in old.items():
        signal.signal(s, h)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("how", ["usr1", "scancel"])
def test_signal_save(slurm_cluster, tiny_hf_dir, synthetic_lvr, tmp_path, fixed, how):
    w = tmp_path / "w.py"
    w.write_text(f"FIXED = {fixed}\n" + FIX)
    common = ["--hf-dir", tiny_hf_dir, "--data-path", str(synthetic_lvr / "meta.json"),
              "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--seq-length", "512", "--min-pixels", "3136",
              "--max-pixels", "50176", "--lr", "1e-3", "--lr-decay-style", "constant",
              "--seed", "7", "--wandb-mode", "disabled", "--save-interval", "3", "--train-iters", "1000"]
    ckpt = tmp_path / "ckpt"
    env = {**slurm_cluster.env, "NODES": "2", "TASKS_PER_NODE": "1", "LOG_DIR": str(tmp_path), "CKPT_DIR": str(ckpt)}
    jid = slurm_cluster.submit(REPO / "slurm/submit.sh", "train", "--parsable", "--", w, LVR, *common, cwd=tmp_path, env=env)
    latest = ckpt / "latest_checkpointed_iteration.txt"
    t0 = time.time()
    while not latest.is_file() and time.time() - t0 < 120:
        time.sleep(0.05)
    if how == "usr1":
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", jid)
        slurm_cluster.wait_for_log(jid, r"requeueing job|not requeueing", tmp_path / f"ml-train-{jid}.out", timeout=60)
        time.sleep(1)
        slurm_cluster.run("scancel", jid)
    else:
        slurm_cluster.run("scancel", jid)
    slurm_cluster.wait(jid, timeout=60)
    time.sleep(6)
    log = (tmp_path / f"ml-train-{jid}.out").read_text()
    print(f"\n=== how={how} fixed={fixed}: latest={latest.read_text()} dirs={sorted(p.name for p in ckpt.iterdir())}")
    print("\n".join(l[:160] for l in log.splitlines() if l.startswith(("step", "[megatron_latent", "srun", "slurmstepd")) or "Error" in l))
