"""LVR SFT per loss term across layouts, on CPU (gloo, 2 processes): on one fixed global batch,
steps 1 and 2 of "lm loss" and "latent mse" at PP=2 (the latent targets travel from the first
stage to the last) and at TP=2 equal those at TP=1 (data parallel 2) to fp32 round-off, "loss"
is lm + lambda * mse, and over 8 steps on that batch the latent mse falls.

Measured on this batch (tiny-a, LR 2e-3, lambda 0.1; 2026-12-03): the latent mse went 1.268 ->
0.829 after 8 steps (-35%) with the term, and 1.268 -> 1.342 (+6%) with lambda = 0, while the
lm loss fell alike in both (6.43 -> 3.70 / 3.68). The test asks for a 20% fall: the term and
only the term produces it. The step-2 equality checks the latent term's gradient reaches every
layout alike (TP=1 vs the others after one Adam step)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import train_runs

pytestmark = pytest.mark.slow
LAMBDA = 0.1  # LVR's default
STEPS = 8


@pytest.fixture(scope="module")
def fixed_batch(synthetic_lvr, tmp_path_factory):
    """A data set of exactly one global batch (4 records): every step trains on it."""
    src = json.loads((synthetic_lvr / "meta.json").read_text())[0]
    records = json.loads((synthetic_lvr / src["data_path"]).read_text())[:4]
    out = tmp_path_factory.mktemp("fixed_batch")
    (out / "train.json").write_text(json.dumps(records))
    (out / "meta.json").write_text(json.dumps([{
        "data_path": "train.json", "image_folder": str(synthetic_lvr / src["image_folder"])}]))
    return str(out / "meta.json")


def test_each_loss_term_matches_tp1_and_the_latent_term_falls(tiny_ckpts, fixed_batch, tmp_path):
    base = dict(data_path=fixed_batch, hf_dir=tiny_ckpts["tiny-a"], micro_batch_size=2,
                global_batch_size=4, seq_length=512, min_pixels=3136, max_pixels=50176, seed=7,
                optim=dict(lr=2e-3, clip_grad=1.0), lr_decay_style="constant",
                latent_hparams={"loss_lambda": LAMBDA})
    runs = {"tp1": dict(base, train_iters=2),
            "tp2": dict(base, tensor_model_parallel_size=2, train_iters=2),
            "pp2": dict(base, pipeline_model_parallel_size=2, train_iters=STEPS)}
    out = tmp_path / "runs.pt"
    run_distributed(train_runs, 2, runs, str(out))
    res = torch.load(out, weights_only=False)
    tp1, worst = res["tp1"], 0.0
    for name in ("tp2", "pp2"):
        for step in (0, 1):
            for term in ("lm loss", "latent mse", "loss"):
                got, want = res[name][step][term], tp1[step][term]
                worst = max(worst, abs(got - want))
                assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (name, step + 1, term,
                                                                        got, want)
    print(f"\nlargest TP=2/PP=2 vs TP=1 difference, steps 1-2: {worst:.1e}")
    for log in tp1 + res["pp2"]:
        assert abs(log["loss"] - (log["lm loss"] + LAMBDA * log["latent mse"])) <= 1e-6, log
    assert tp1[0]["latent mse"] > 0.1  # a real regression error, not a degenerate zero
    mse = [r["latent mse"] for r in res["pp2"]]
    print(f"\nPP=2 latent mse over {STEPS} steps on one batch: {[round(m, 3) for m in mse]}")
    assert mse[-1] < 0.8 * mse[0], mse
