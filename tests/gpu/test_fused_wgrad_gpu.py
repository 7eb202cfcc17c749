"""On a GPU with TE: TE linears and the output layer accumulating weight gradients straight into
DDP's fp32 main_grad (`training/wgrad_fusion.py`; the output layer through the torch-native
stand-in for Apex's GEMM) give the same gradients and the same update as the unfused path (bf16
wgrad + DDP's add), over two micro-batches (so accumulation is exercised).
fp32 params and TF32 off: the two differ only by fp32 rounding. Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import two_sample_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step

pytestmark = pytest.mark.gpu


def _step(path, fused: bool, mbs, tied: bool, dtype=torch.float32):
    cfg = Qwen25VLConfig.from_hf(path, spec="te", params_dtype=dtype)
    model = build_model(cfg, path, freeze_vision=True)
    switched = [(m, a) for m in model[0].modules()
                for a in ("fuse_wgrad_accumulation", "gradient_accumulation_fusion")
                if getattr(m, a, False) is True]
    kinds = {type(m).__name__ for m, _ in switched}
    # the untied output layer is switched too; a tied one has no weight of its own
    assert ("ColumnParallelLinear" in kinds) != tied and kinds - {"ColumnParallelLinear"}, kinds
    if not fused:
        for m, a in switched:
            setattr(m, a, False)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    out = train_step(model, optimizer, mbs)
    params = {n: p.detach().clone() for n, p in unwrap(model[0]).named_parameters()}
    return out, params


def _both(path, name, dtype):
    """(fused, unfused) runs of one step of two identical micro-batches."""
    pytest.importorskip("transformer_engine")
    from transformers import AutoProcessor

    cfg = Qwen25VLConfig.from_hf(path, spec="te", params_dtype=dtype)
    batch = two_sample_batch(AutoProcessor.from_pretrained(path), cfg)
    mb = {k: batch[k] for k in ("input_ids", "labels", "loss_mask", "pixel_values",
                                "image_grid_thw", "position_ids")}
    tied = name == "tiny-a"
    return [_step(path, fused, [dict(mb), dict(mb)], tied, dtype) for fused in (True, False)]


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])  # tied / untied output layer
def test_fused_wgrad_equals_unfused(tiny_ckpts, megatron_single_rank, name):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    (fused, p_fused), (plain, p_plain) = _both(tiny_ckpts[name], name, torch.float32)
    print(f"\ngrad norm fused {fused['grad_norm']:.8f} / unfused {plain['grad_norm']:.8f}")
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)  # catches doubling
    worst = max((p_fused[n] - p_plain[n]).abs().max().item() for n in p_fused)
    print(f"parameters after one Adam step: max diff {worst:.2e}")
    assert worst < 1e-5  # Adam's first step moves every weight with a gradient by ~lr (1e-3)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_fused_wgrad_bf16(tiny_ckpts, megatron_single_rank, name):
    """bf16 params: the path training takes (for the output layer, the bf16 x bf16 -> fp32
    accumulating addmm). Fused accumulates in fp32 where unfused first rounds each
    micro-batch's weight gradient to bf16, so the grad norms agree to bf16 rounding."""
    (fused, _), (plain, _) = _both(tiny_ckpts[name], name, torch.bfloat16)
    print(f"\n[bf16 {name}] grad norm fused {fused['grad_norm']:.6f} / unfused "
          f"{plain['grad_norm']:.6f}")
    assert fused["loss"] == plain["loss"]  # the same forward
    assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-2)
