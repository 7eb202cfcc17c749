"""On a GPU with TE: the LLM's mRoPE through TE's fused kernel (one angle row per token,
models/qwen25vl/cached_attention.py) gives the same loss and gradients as megatron's unfused RoPE, for a
padded batch of two samples (a row of angles per sample) and for the same samples packed in one
THD row (positions restarting per sample). fp32 with TF32 off. TE's kernel takes sin/cos of
angles up to position x inv_freq (hundreds of radians) in fast-math single precision, so the two
differ beyond fp32 rounding: measured on an H200, loss 2.3e-6 relative, weight gradients up to
6.1e-4 relative (identical figures for both layouts); bf16 training rounds at 3.9e-3.
Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.data import LvrSftDataset, collate
from megatron_latent.data.packing import pack, packed_seq_params
from megatron_latent.models.qwen25vl.cached_attention import CachedSelfAttention
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel

pytestmark = pytest.mark.gpu


def _loss_and_grads(model, batch, fused: bool):
    attns = [m for m in model.modules() if isinstance(m, CachedSelfAttention)]
    assert attns and all(a.fused_rope for a in attns)  # on by default with TE
    for a in attns:
        a.fused_rope = fused
    try:
        model.zero_grad(set_to_none=True)
        b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        ce = model(b["input_ids"], position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                   image_grid_thw=b["image_grid_thw"], labels=b["labels"],
                   packed_seq_params=packed_seq_params(b))
        loss = (ce.float() * b["loss_mask"]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None and "language_model" in n}
        return loss.item(), grads
    finally:
        for a in attns:
            a.fused_rope = True


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_mrope_equals_unfused(layout, tiny_ckpts, synthetic_lvr, megatron_single_rank):
    pytest.importorskip("transformer_engine")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = tiny_ckpts["tiny-b"]
    cfg = Qwen25VLConfig.from_hf(path, spec="te", params_dtype=torch.float32)
    assert cfg.fused_rope
    model = Qwen25VLModel(cfg).cuda()
    load_hf_weights(model, path)
    ds = LvrSftDataset.from_hf_dir(synthetic_lvr / "meta.json", path, seq_length=4096,
                                   min_pixels=56 * 56, max_pixels=224 * 224)
    samples = [ds[i] for i in range(2)]
    batch = (collate(samples, pad_to=None, **ds.collate_kwargs) if layout == "padded"
             else pack(samples, pad_to_multiple=64, **ds.collate_kwargs))
    loss_f, g_f = _loss_and_grads(model, batch, fused=True)
    loss_u, g_u = _loss_and_grads(model, batch, fused=False)
    worst = max(((g_f[n] - g_u[n]).abs().max() / g_u[n].abs().max().clamp(min=1e-12)).item()
                for n in g_u)
    print(f"\n[{layout}] loss fused {loss_f:.6f} / unfused {loss_u:.6f}; "
          f"grads max rel diff {worst:.2e}")
    assert g_f.keys() == g_u.keys() and any("linear_qkv" in n for n in g_u)
    assert loss_f == pytest.approx(loss_u, rel=1e-5)
    assert worst < 2e-3
