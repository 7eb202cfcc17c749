"""Activation recompute changes memory and time, never the numbers: selective and full
recompute give the loss, gradient norm and post-step loss of the run without it. Forward-call
counts show the recompute really happens (else equal numbers would prove nothing)."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_micro_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step

MODES = {"none": {}, "selective": dict(recompute_granularity="selective"),
         "full": dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)}


def _two_steps(path, processor, over):
    torch.manual_seed(0)
    cfg = Qwen25VLConfig.from_hf(path, **over)
    mb = two_sample_micro_batch(processor, cfg)
    model = build_model(cfg, path)
    calls = {"core_attention": 0, "mlp": 0}
    for layer in unwrap(model[0]).language_model.decoder.layers:
        for name in calls:
            getattr(layer.self_attention if name == "core_attention" else layer, name) \
                .register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    first = train_step(model, optimizer, [mb])
    numbers = first["loss"], first["grad_norm"], train_step(model, optimizer, [mb])["loss"]
    return numbers, calls


def test_recompute_gives_the_same_numbers(tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor

    path = tiny_ckpts["tiny-b"]
    processor = AutoProcessor.from_pretrained(path)
    runs = {name: _two_steps(path, processor, over) for name, over in MODES.items()}
    for name in ("selective", "full"):
        assert runs[name][0] == pytest.approx(runs["none"][0], rel=1e-6, abs=1e-7), name
    plain = runs["none"][1]
    # selective recomputes core attention in backward; full recomputes whole layers
    assert runs["selective"][1] == {"core_attention": 2 * plain["core_attention"],
                                    "mlp": plain["mlp"]}
    assert runs["full"][1] == {"core_attention": 2 * plain["core_attention"],
                               "mlp": 2 * plain["mlp"]}


def test_full_recompute_needs_method_and_layers(tiny_ckpts):
    with pytest.raises(ValueError, match="needs recompute_method"):
        Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"], recompute_granularity="full")
