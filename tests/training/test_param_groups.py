"""Freezing and per-group learning rates: frozen towers get no grads nor optimizer state; the
vision tower and the merger follow their own LR through the megatron-core scheduler."""

from __future__ import annotations

from fnmatch import fnmatch

import pytest

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.training.build import (MERGER, VISION_TOWER, OptimSettings, build_model,
                                            build_optimizer, build_scheduler)


def test_frozen_vision_has_no_optimizer_state(tiny_ckpts, megatron_single_rank):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"])
    model = build_model(cfg, tiny_ckpts["tiny-a"], freeze_vision=True, freeze_merger=True)
    frozen = [n for n, p in model[0].named_parameters() if not p.requires_grad]
    assert frozen and all("vision" in n for n in frozen)
    assert not any("vision" in n for n, p in model[0].named_parameters() if p.requires_grad)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for n, p in model[0].named_parameters() if "vision" in n)
    assert in_opt == {id(p) for p in model[0].parameters() if p.requires_grad}


@pytest.mark.parametrize("warmup", [0, 2])
def test_vision_and_merger_learning_rates(tiny_ckpts, megatron_single_rank, warmup):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"])
    model = build_model(cfg, tiny_ckpts["tiny-a"])
    s = OptimSettings(lr=1e-3, min_lr=1e-4, vision_lr=2e-4, merger_lr=5e-4)
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s, train_iters=10, warmup_iters=warmup,
                                decay_style="linear")
    scheduler.step(increment=warmup + 1)
    names = {id(p): n for n, p in model[0].named_parameters()}
    seen = set()
    for g in optimizer.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            base = (s.vision_lr if any(fnmatch(n, pat) for pat in VISION_TOWER) else
                    s.merger_lr if any(fnmatch(n, pat) for pat in MERGER) else s.lr)
            # linear decay from max to min (scaled alike) over the 10 - warmup decay steps
            frac = 1 / (10 - warmup)
            expected = base - (base - s.min_lr * base / s.lr) * frac
            assert g["lr"] == pytest.approx(expected, rel=1e-6), n
            seen.add(base)
    assert seen == {s.lr, s.vision_lr, s.merger_lr}
