"""The word embedding's weight gradient scattered straight into DDP's fp32 main_grad
(training/wgrad_fusion.py) equals the stock path (a dense gradient that DDP's hook adds), over
two micro-batches so that accumulation is exercised; a tied embedding on the output layer's
stage is left alone (its two gradients arrive summed in one AccumulateGrad). fp32 on the CPU:
the two paths differ only in the order of fp32 additions."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_micro_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step
from megatron_latent.training.wgrad_fusion import fuse_wgrad_accumulation


def _step(path: str, fused: bool):
    from transformers import AutoProcessor

    cfg = Qwen25VLConfig.from_hf(path)
    mb = two_sample_micro_batch(AutoProcessor.from_pretrained(path), cfg)
    model = build_model(cfg, path, freeze_vision=True)
    switched = fuse_wgrad_accumulation(unwrap(model[0]), linears=False) if fused else []
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    out = train_step(model, optimizer, [dict(mb), dict(mb)])
    weight = unwrap(model[0]).language_model.embedding.word_embeddings.weight
    return out, weight.main_grad.clone(), weight.detach().clone(), switched


def test_embedding_wgrad_into_main_grad(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-b"]  # untied output layer
    fused, g_fused, w_fused, switched = _step(path, True)
    plain, g_plain, w_plain, _ = _step(path, False)
    assert [a for _, a in switched] == ["embedding_grad_route"]
    rows = g_plain.abs().sum(1) > 0
    assert 0 < int(rows.sum()) < g_plain.shape[0]  # only the batch's token rows have gradients
    assert fused["loss"] == plain["loss"]
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-9)
    assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    torch.testing.assert_close(w_fused, w_plain, rtol=0, atol=1e-7)


def test_tied_embedding_on_output_stage_stays_unfused(tiny_ckpts, megatron_single_rank):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"])
    assert cfg.tie_word_embeddings
    model = build_model(cfg, tiny_ckpts["tiny-a"], freeze_vision=True)
    assert fuse_wgrad_accumulation(unwrap(model[0]), linears=False) == []
