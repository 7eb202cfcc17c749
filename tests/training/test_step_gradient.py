"""The training step's gradient is the gradient of the global mean loss: over two micro-batches
with different token counts, the main_grads after train_step equal transformers' gradient of
sum(CE over both micro-batches' tokens) / (their token count), on the same weights (fp32, CPU).
The scaling is ours (losses pre-divided by the host-known global count; megatron's 1/num_tokens
pass is skipped), so a wrong or doubled scale shows here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_latent.conversion.hf_mapping import NameTable
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import MICRO_BATCH_KEYS, two_sample_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step

COMPARED = ["language_model.embedding.word_embeddings.weight",
            "language_model.decoder.layers.1.self_attention.linear_qkv.weight",
            "language_model.decoder.layers.0.mlp.linear_fc2.weight",
            "language_model.output_layer.weight"]


def test_step_gradient_is_the_global_mean_gradient(tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = tiny_ckpts["tiny-b"]  # untied output layer
    cfg = Qwen25VLConfig.from_hf(path)
    batch = two_sample_batch(AutoProcessor.from_pretrained(path), cfg)
    first = {k: batch[k] for k in MICRO_BATCH_KEYS}
    second = dict(first, loss_mask=first["loss_mask"].clone())
    second["loss_mask"][0] = 0  # the second micro-batch counts the second sample only
    assert first["loss_mask"].sum() != second["loss_mask"].sum()

    model = build_model(cfg, path, freeze_vision=True)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3, clip_grad=0.0))
    train_step(model, optimizer, [first, second])
    params = dict(unwrap(model[0]).named_parameters())

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    logits = hf(**{k: batch[k] for k in keys}).logits
    ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    weight = (first["loss_mask"] + second["loss_mask"]).float()  # tokens counted twice weigh 2
    (ce * weight).sum().div(weight.sum()).backward()

    hf_params = dict(hf.named_parameters())
    table = NameTable(cfg)
    for name in COMPARED:
        hf_names, transform = table.lookup(name)
        ref = transform.to_megatron(*(hf_params[h].grad for h in hf_names))
        got = params[name].main_grad[: ref.shape[0]]  # drop padded vocab rows
        scale = ref.abs().max().item()
        assert scale > 0, name
        rel = (got - ref).abs().max().item() / scale
        assert rel <= 1e-4, f"{name}: relative gradient difference {rel:.2e}"
