"""TP=2, TP=2 with sequence parallel, and PP=2 (two gloo processes) equal the data-parallel TP=1
run: logits, loss, and loss after one Adam step through megatron-core's DDP, optimizer and
pipeline schedules."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import layout_run

pytestmark = pytest.mark.slow

LAYOUTS = {
    # tiny-a: 2 LLM layers, tied embeddings (PP must sync the tied output layer)
    "tiny-a": [dict(name="tp1", dist_opt=True), dict(name="tp2", tp=2), dict(name="pp2", pp=2),
               dict(name="tp2sp", tp=2, sp=True)],
    # tiny-b: 3 LLM layers, untied; PP=2 with an uneven first stage (vision + 1 layer | 2 layers)
    "tiny-b": [dict(name="tp1"), dict(name="tp2", tp=2, dist_opt=True),
               dict(name="pp2", pp=2, first=1)],
}


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])
def test_tp2_pp2_equal_tp1(preset, tiny_ckpts, tmp_path):
    out = tmp_path / "results.pt"
    run_distributed(layout_run, 2, tiny_ckpts[preset], str(out), LAYOUTS[preset])
    res = torch.load(out, weights_only=False)
    base = res["tp1"]
    real = base["attention_mask"].bool()
    assert base["loss_after"] < base["loss"], "the optimizer step should lower the loss"
    for name in [n for n in res if n != "tp1"]:
        r = res[name]
        diff = (r["logits"][real] - base["logits"][real]).abs().max().item()
        assert diff <= 1e-5, f"{name}: logits differ by {diff:.2e}"
        assert abs(r["loss"] - base["loss"]) <= 1e-5, name
        assert abs(r["loss_after"] - base["loss_after"]) <= 1e-5, name
