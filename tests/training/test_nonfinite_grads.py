"""A NaN in the gradients stops training with a clear error, although the step no longer waits
for the GPU: with clipping on, the step checks the gradient norm that the clip computes (DDP's
own per-bucket check is then off, build.build_optimizer); with clipping off, DDP's check stays.
The NaN enters one weight's gradient through a hook, so the loss itself stays finite."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_micro_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import launch_step, train_step


def _setup(path, clip_grad):
    from transformers import AutoProcessor

    torch.manual_seed(0)
    cfg = Qwen25VLConfig.from_hf(path)
    mb = two_sample_micro_batch(AutoProcessor.from_pretrained(path), cfg)
    model = build_model(cfg, path)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3, clip_grad=clip_grad))
    return model, optimizer, mb


def _poison(model):
    weight = unwrap(model[0]).language_model.decoder.layers[0].mlp.linear_fc2.weight
    return weight.register_hook(lambda g: g * math.nan)


def test_nan_gradient_raises_with_clipping_on(tiny_ckpts, megatron_single_rank):
    model, optimizer, mb = _setup(tiny_ckpts["tiny-b"], clip_grad=1.0)
    clean = train_step(model, optimizer, [dict(mb)])
    assert math.isfinite(clean["grad_norm"]) and clean["grad_norm"] > 0
    hook = _poison(model)
    pending = launch_step(model, optimizer, [dict(mb)])  # queued: nothing is read yet
    with pytest.raises(FloatingPointError, match="gradient norm is nan") as err:
        pending.result()
    assert math.isfinite(float(str(err.value).split("'loss': ")[1].split("}")[0]))
    hook.remove()


def test_nan_gradient_raises_with_clipping_off(tiny_ckpts, megatron_single_rank):
    model, optimizer, mb = _setup(tiny_ckpts["tiny-b"], clip_grad=0.0)
    assert model[0].ddp_config.check_for_nan_in_grad  # no norm to check: DDP's check stays
    _poison(model)
    with pytest.raises(RuntimeError, match="NaN in local grad norm"):
        train_step(model, optimizer, [dict(mb)])
