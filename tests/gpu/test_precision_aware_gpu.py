"""On a GPU with TE: the precision-aware distributed optimizer (TE FusedAdam keeping the fp32
masters itself, `OptimSettings.precision_aware`) trains like
megatron's standard distributed optimizer (fp32 main params held by megatron), and its state
survives a checkpoint round trip: resuming gives the step the uninterrupted run takes.
bf16 params (what the option is for). Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_batch
from megatron_latent.training import state
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step

pytestmark = pytest.mark.gpu
STEPS = 3


def _params(model) -> dict:
    return {n: p.detach().float().clone() for n, p in unwrap(model[0]).named_parameters()
            if p.requires_grad}


def _setup(path, precision_aware: bool):
    cfg = Qwen25VLConfig.from_hf(path, spec="te", params_dtype=torch.bfloat16)
    model = build_model(cfg, path, freeze_vision=True, use_distributed_optimizer=True)
    optimizer = build_optimizer(model, OptimSettings(
        lr=1e-3, use_distributed_optimizer=True, precision_aware=precision_aware))
    return model, optimizer


def _micro_batches(path):
    from transformers import AutoProcessor

    cfg = Qwen25VLConfig.from_hf(path)
    batch = two_sample_batch(AutoProcessor.from_pretrained(path), cfg)
    mb = {k: batch[k] for k in ("input_ids", "labels", "loss_mask", "pixel_values",
                                "image_grid_thw", "position_ids")}
    return lambda: [dict(mb), dict(mb)]


def test_precision_aware_matches_standard(tiny_ckpts, megatron_single_rank):
    pytest.importorskip("transformer_engine")
    path = tiny_ckpts["tiny-a"]
    mbs = _micro_batches(path)
    runs = {}
    for pa in (False, True):
        model, optimizer = _setup(path, pa)
        p0 = _params(model)
        losses = [train_step(model, optimizer, mbs())["loss"] for _ in range(STEPS)]
        runs[pa] = (losses, {n: p - p0[n] for n, p in _params(model).items()})
    (l_std, d_std), (l_pa, d_pa) = runs[False], runs[True]
    print(f"\nlosses standard {l_std}\nlosses precision-aware {l_pa}")
    assert l_pa[0] == l_std[0]  # same weights, same batch: the first forward is identical
    assert l_pa == pytest.approx(l_std, rel=2e-3)
    num = sum((d_pa[n] - d_std[n]).pow(2).sum() for n in d_std).sqrt()
    den = sum(d.pow(2).sum() for d in d_std.values()).sqrt()
    print(f"updates over {STEPS} steps: relative difference {num / den:.2e}")
    assert den > 0 and num / den < 2e-2  # bf16 params: the updates agree up to bf16 rounding


def test_precision_aware_resume(tiny_ckpts, megatron_single_rank, tmp_path):
    pytest.importorskip("transformer_engine")
    path = tiny_ckpts["tiny-a"]
    mbs = _micro_batches(path)
    model, optimizer = _setup(path, True)
    for _ in range(2):
        train_step(model, optimizer, mbs())
    state.save(tmp_path / "ckpt", 2, model, optimizer, None, {"iteration": 2})
    going_on = [train_step(model, optimizer, mbs())["loss"] for _ in range(2)]
    model, optimizer = _setup(path, True)  # fresh weights and state, then the checkpoint's
    state.load(tmp_path / "ckpt", model, optimizer)
    resumed = [train_step(model, optimizer, mbs())["loss"] for _ in range(2)]
    print(f"\nafter step 2: uninterrupted {going_on} / resumed {resumed}")
    assert resumed == going_on  # exact: the fp32 masters and the moments came back
