"""Activation recompute changes memory and time, never the numbers: selective and full
recompute give the loss, gradient norm and post-step loss of the run without it."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer
from megatron_latent.training.step import train_step

MODES = {"none": {}, "selective": dict(recompute_granularity="selective"),
         "full": dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)}


def _two_steps(path, processor, over):
    torch.manual_seed(0)
    cfg = Qwen25VLConfig.from_hf(path, **over)
    batch = two_sample_batch(processor, cfg)
    mb = {k: batch[k] for k in ("input_ids", "labels", "loss_mask", "pixel_values",
                                "image_grid_thw", "position_ids")}
    model = build_model(cfg, path)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    first = train_step(model, optimizer, [mb])
    return first["loss"], first["grad_norm"], train_step(model, optimizer, [mb])["loss"]


def test_recompute_gives_the_same_numbers(tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor

    path = tiny_ckpts["tiny-b"]
    processor = AutoProcessor.from_pretrained(path)
    runs = {name: _two_steps(path, processor, over) for name, over in MODES.items()}
    for name in ("selective", "full"):
        assert runs[name] == pytest.approx(runs["none"], rel=1e-6, abs=1e-7), name


def test_full_recompute_needs_method_and_layers(tiny_ckpts):
    with pytest.raises(ValueError, match="needs recompute_method"):
        Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"], recompute_granularity="full")
