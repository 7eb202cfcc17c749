"""bf16 with the torch-native (local) spec: every parameter is bf16 (megatron's local norms are
built fp32; Megatron-LM's Float16Module casts them, we build them so), so the mixed-precision
optimizer's state maps one-to-one onto the model's parameters and a trained step's checkpoint
saves and loads back. Before the fix the save failed: "Optimizer shape ((64,) does not match
model shape ((128,))"."""

from __future__ import annotations

import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import MICRO_BATCH_KEYS, two_sample_batch
from megatron_latent.training import state
from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                            build_scheduler, unwrap)
from megatron_latent.training.step import train_step


def test_bf16_local_spec_step_saves_and_resumes(tiny_ckpts, megatron_single_rank, tmp_path):
    from transformers import AutoProcessor

    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path, params_dtype=torch.bfloat16)
    assert cfg.spec == "local"
    batch = two_sample_batch(AutoProcessor.from_pretrained(path), cfg)
    mb = {k: batch[k] for k in MICRO_BATCH_KEYS}

    def build():
        model = build_model(cfg, path)
        optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
        return model, optimizer, build_scheduler(optimizer, OptimSettings(lr=1e-3), 4, 0)

    model, optimizer, scheduler = build()
    wrong = {n: p.dtype for n, p in unwrap(model[0]).named_parameters()
             if p.dtype != torch.bfloat16}
    assert not wrong, wrong
    train_step(model, optimizer, [mb])
    state.save(tmp_path / "ckpt", 1, model, optimizer, scheduler, {"iteration": 1})
    model2, optimizer2, scheduler2 = build()
    state.load(tmp_path / "ckpt", model2, optimizer2, scheduler2)
    for (n, a), b in zip(unwrap(model[0]).state_dict().items(),
                         unwrap(model2[0]).state_dict().values()):
        if torch.is_tensor(a) and not n.endswith("_extra_state"):
            assert torch.equal(a, b), n
