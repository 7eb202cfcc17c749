"""On a GPU: a step that does not wait for the GPU (training/step.launch_step, logs read later
through page-locked memory and an event) gives the logs of the step that waits (train_step), also
when the GPU is far behind the host (a queued sleep) and when step n's logs are read after step
n+1 is launched, as the training loop does. fp32, TF32 off. Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_micro_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer
from megatron_latent.training.step import launch_step, train_step

pytestmark = pytest.mark.gpu
STEPS = 4
BEHIND = 200_000_000  # GPU cycles of torch.cuda._sleep: ~0.1 s queued ahead of the step


def _run(path, mbs, lagged: bool) -> list[dict]:
    torch.manual_seed(0)
    cfg = Qwen25VLConfig.from_hf(path, spec="local", params_dtype=torch.float32)
    model = build_model(cfg, path, freeze_vision=True)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    if not lagged:
        return [train_step(model, optimizer, [dict(mb) for mb in mbs]) for _ in range(STEPS)]
    logs, pending = [], None
    for i in range(STEPS):
        torch.cuda._sleep(BEHIND)  # the host gets far ahead of the GPU
        launched = launch_step(model, optimizer, [dict(mb) for mb in mbs])
        if i == 0:  # read at once: only the event makes the values ready
            logs.append(launched.result())
            continue
        if pending is not None:
            logs.append(pending.result())
        pending = launched
    logs.append(pending.result())
    return logs


def test_lagged_steps_equal_waited_steps(tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = tiny_ckpts["tiny-b"]
    cfg = Qwen25VLConfig.from_hf(path)
    mb = two_sample_micro_batch(AutoProcessor.from_pretrained(path), cfg)
    waited = _run(path, [mb, mb], lagged=False)
    lagged = _run(path, [mb, mb], lagged=True)
    for i, (w, g) in enumerate(zip(waited, lagged)):
        print(f"step {i}: loss {w['loss']:.8f} / {g['loss']:.8f}, "
              f"grad norm {w['grad_norm']:.8f} / {g['grad_norm']:.8f}")
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), i
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), i
    assert waited[-1]["loss"] < waited[0]["loss"]  # the steps really train
