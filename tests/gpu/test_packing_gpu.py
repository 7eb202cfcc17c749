"""On a GPU with TE: a THD-packed micro-batch gives the same per-sample CE sums and the same
LVR latent squared error as the padded batch of the same samples (bf16; TE THD vs padded causal
attention are different kernels; measured 0 difference on an H200, tolerance 1e-3 relative).
Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.data import LvrSftDataset, collate
from megatron_latent.data.packing import pack, packed_seq_params, segment_sums
from megatron_latent.latent.lvr import LVR
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel

pytestmark = pytest.mark.gpu


def _run(model, method, batch):
    b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        return model(b["input_ids"], position_ids=b["position_ids"],
                     pixel_values=b["pixel_values"].bfloat16(), image_grid_thw=b["image_grid_thw"],
                     labels=b["labels"], latent=method.sft_step(b),
                     packed_seq_params=packed_seq_params(b))


def test_packed_equals_padded(tiny_ckpts, synthetic_lvr, megatron_single_rank):
    pytest.importorskip("transformer_engine")
    path = tiny_ckpts["tiny-b"]
    cfg = Qwen25VLConfig.from_hf(path, spec="te", params_dtype=torch.bfloat16)
    model = Qwen25VLModel(cfg).cuda().eval()
    load_hf_weights(model, path)
    ds = LvrSftDataset.from_hf_dir(synthetic_lvr / "meta.json", path, seq_length=4096,
                                   min_pixels=56 * 56, max_pixels=224 * 224)
    ids = ds.ids
    method = LVR(lvr_id=ids.lvr, start_id=ids.lvr_start, end_id=ids.lvr_end,
                 hidden_size=cfg.hidden_size)
    samples = [ds[i] for i in range(4)]
    padded = collate(samples, pad_to=None, **ds.collate_kwargs)
    packed = pack(samples, pad_to_multiple=64, **ds.collate_kwargs)
    out_pad, out_pack = _run(model, method, padded), _run(model, method, packed)
    per_pad = (out_pad["ce"].float() * padded["loss_mask"].cuda()).sum(1)
    per_pack = segment_sums(out_pack["ce"], packed["loss_mask"].cuda(),
                            packed["cu_seqlens"])[: len(samples)]
    rel = ((per_pack - per_pad).abs() / per_pad.abs()).max().item()
    sq_rel = abs(out_pack["latent_sq"].item() - out_pad["latent_sq"].item()) / \
        out_pad["latent_sq"].item()
    print(f"\n[packed vs padded, TE bf16] per-sample CE sums max rel diff {rel:.2e}; "
          f"latent squared error rel diff {sq_rel:.2e}")
    assert rel <= 1e-3 and sq_rel <= 1e-3
