"""LVR stage-1 loss: ours (Megatron model, LVR latent step) equals an independent computation of
CE + lambda * MSE with HF transformers on the same weights and batch (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.data.collate import collate
from megatron_latent.data.lvr_dataset import LvrSftDataset
from megatron_latent.latent.lvr import LVR
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.method_kits import hf_lvr_terms

LAMBDA = 0.1


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])
def test_lvr_loss_matches_hf_formula(preset, tiny_ckpts, synthetic_lvr, megatron_single_rank):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = tiny_ckpts[preset]
    ds = LvrSftDataset.from_hf_dir(synthetic_lvr / "meta.json", path, seq_length=2048,
                                   min_pixels=3136, max_pixels=50176)
    mb = collate([ds[0], ds[1], ds[2]], **ds.collate_kwargs)
    assert int(mb["latent_mask"].sum()) >= 3
    cfg = Qwen25VLConfig.from_hf(path)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    mb = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in mb.items()}
    model = Qwen25VLModel(cfg).to(dev).eval()
    load_hf_weights(model, path)
    method = LVR(lvr_id=ds.ids.lvr, start_id=ds.ids.lvr_start, end_id=ds.ids.lvr_end,
                 hidden_size=cfg.hidden_size, loss_lambda=LAMBDA)
    # what attach_step_totals gives a one-micro-batch, one-rank step: 0-d tensors on the device
    mb["step_totals"] = {k: torch.tensor(float(v), device=dev) for k, v in method.count(mb).items()}
    step = method.sft_step(mb)
    with torch.no_grad():
        out = model(mb["input_ids"], position_ids=mb["position_ids"],
                    pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"],
                    labels=mb["labels"], latent=step)
        total, n_tokens, logs = step.loss(out)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        hf = hf.to(dev).eval()
        terms = hf_lvr_terms(hf, mb, method)
        ce, mse = terms["lm loss"], terms["latent mse"]
    ours = (total / n_tokens).item()
    ours_ce = (logs["lm loss"][0] / logs["lm loss"][1]).item()
    ours_mse = (logs["latent mse"][0] / logs["latent mse"][1]).item()
    assert mse.item() > 1e-3, "the regression term should be non-trivial"
    assert abs(ours_ce - ce.item()) <= 1e-5
    assert abs(ours_mse - mse.item()) <= 1e-5
    assert abs(ours - (ce + LAMBDA * mse).item()) <= 1e-5


def test_latent_token_at_sample_start_is_refused():
    """A latent token with nothing before it in its sample has no predictor row: refused by the
    step's count (for a padded row and for a packed row's second sample)."""
    method = LVR(lvr_id=9, start_id=8, end_id=10, hidden_size=4)
    lat = torch.zeros(2, 6, dtype=torch.bool)
    lat[1, 2:4] = True
    ok = {"loss_mask": torch.ones(2, 6), "latent_mask": lat}
    assert method.count(ok) == {"ce": 12.0, "latent": 8.0}
    lat0 = lat.clone()
    lat0[0, 0] = True
    with pytest.raises(ValueError, match="starts a sample"):
        method.count({**ok, "latent_mask": lat0})
    packed = torch.zeros(1, 10, dtype=torch.bool)
    packed[0, 4] = True  # the first token of the second sample (cu_seqlens 0, 4, 10)
    with pytest.raises(ValueError, match="starts a sample"):
        method.count({"loss_mask": torch.ones(1, 10), "latent_mask": packed,
                      "cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32)})
