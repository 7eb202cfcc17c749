"""Our Megatron Qwen2.5-VL equals transformers' Qwen2_5_VLForConditionalGeneration on the same
weights (fp32, CPU): logits, loss and gradients, with two images of different sizes in one sample
and a batch of two samples."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.conversion.hf_mapping import NameTable
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.samples import two_sample_batch

# megatron names whose gradients are compared (through the conversion table)
GRAD_PARAMS = [
    "language_model.embedding.word_embeddings.weight",
    "language_model.decoder.layers.1.self_attention.linear_qkv.weight",
    "language_model.decoder.layers.0.mlp.linear_fc1.weight",
    "language_model.decoder.final_layernorm.weight",
    "vision.patch_embed.weight",
    "vision.decoder.layers.0.self_attention.linear_qkv.bias",
    "vision.decoder.layers.1.mlp.linear_fc2.weight",
    "vision.merger.linear_fc1.weight",
]


@pytest.fixture(scope="module", params=["tiny-a", "tiny-b"])
def pair(request, tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = tiny_ckpts[request.param]
    # On a GPU the same fp32 comparison runs there; TF32 would round HF's Conv3d differently.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    processor = AutoProcessor.from_pretrained(path)
    cfg = Qwen25VLConfig.from_hf(path)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = Qwen25VLModel(cfg).to(dev)
    load_hf_weights(ours, path)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(dev)
    batch = {k: v.to(dev) if torch.is_tensor(v) else v
             for k, v in two_sample_batch(processor, cfg).items()}
    return hf, ours, cfg, batch


def _hf_loss(hf, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return hf(**{k: batch[k] for k in keys}, labels=labels)


def _our_loss(ours, batch):
    per_token = ours(batch["input_ids"], position_ids=batch["position_ids"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     labels=batch["labels"])
    mask = batch["loss_mask"].float()
    return (per_token * mask).sum() / mask.sum()


def test_batch_has_two_images_of_different_sizes_in_one_sample(pair):
    *_, cfg, batch = pair
    grids = batch["image_grid_thw"]
    assert grids.shape[0] == 3 and not torch.equal(grids[0], grids[1])
    n0 = int((batch["input_ids"][0] == cfg.image_token_id).sum())
    assert n0 == int(grids[:2].prod(-1).sum()) // cfg.merge_unit
    assert (grids[:, 1:] % 4).any(), "grids should not all be multiples of the window"


def test_logits_match_hf(pair):
    hf, ours, cfg, batch = pair
    hf.eval(), ours.eval()
    with torch.no_grad():
        ref = _hf_loss(hf, batch).logits
        got = ours(batch["input_ids"], position_ids=batch["position_ids"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    real = batch["attention_mask"].bool()
    assert got.shape == ref.shape
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4


def test_loss_and_gradients_match_hf(pair):
    hf, ours, cfg, batch = pair
    hf.train(), ours.train()
    hf.zero_grad(), ours.zero_grad()
    ref = _hf_loss(hf, batch).loss
    got = _our_loss(ours, batch)
    assert abs(got.item() - ref.item()) <= 1e-5
    ref.backward()
    got.backward()
    table = NameTable(cfg)
    hf_params = {n: p for n, p in hf.named_parameters()}
    ours_params = dict(ours.named_parameters())
    for name in GRAD_PARAMS:
        hf_names, transform = table.lookup(name)
        ref_grad = transform.to_megatron(*(hf_params[h].grad for h in hf_names))
        our_grad = ours_params[name].grad[: ref_grad.shape[0]]  # drop padded vocab rows
        scale = ref_grad.abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero; the test would prove nothing"
        rel = (our_grad - ref_grad).abs().max().item() / scale
        assert rel <= 1e-4, f"{name}: relative gradient difference {rel:.2e}"
