"""The LVR training step's gradient is the gradient of CE + lambda * MSE: over two micro-batches
with different CE and latent counts, the main_grads of LLM weights after train_step equal
transformers' autograd gradient of the seed's formula written against
Qwen2_5_VLForConditionalGeneration on the same weights (fp32, CPU):

    L = sum(CE over supervised tokens) / n_ce + lambda * sum((h[t] - v[t+1])^2) / (n_latent * H)

(both means over the whole step, h the final-norm hidden state, v the injected visual token).
test_lvr_loss.py checks the value; this checks what training does with it: the MSE's share of
the gradient and its global-mean scale."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_mapping import NameTable
from megatron_latent.data.collate import collate
from megatron_latent.data.lvr_dataset import LvrSftDataset
from megatron_latent.latent.lvr import LVR
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.method_kits import hf_lvr_sums
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step

LAMBDA = 0.5  # not the default: a lambda dropped or hard-coded anywhere shows
COMPARED = ["language_model.embedding.word_embeddings.weight",
            "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
            "language_model.decoder.layers.1.self_attention.linear_proj.weight",
            "language_model.decoder.layers.1.mlp.linear_fc1.weight",
            "language_model.decoder.layers.0.mlp.linear_fc2.weight",
            "language_model.decoder.final_layernorm.weight",
            "language_model.output_layer.weight"]


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])  # tied and untied output layer
def test_lvr_step_gradient_matches_hf_autograd(preset, tiny_ckpts, synthetic_lvr,
                                               megatron_single_rank):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = tiny_ckpts[preset]
    ds = LvrSftDataset.from_hf_dir(synthetic_lvr / "meta.json", path, seq_length=2048,
                                   min_pixels=3136, max_pixels=50176)
    mbs = [collate([ds[0], ds[1]], **ds.collate_kwargs), collate([ds[2]], **ds.collate_kwargs)]
    lat = [int(mb["latent_mask"].sum()) for mb in mbs]
    ce_n = [int(mb["loss_mask"].sum()) for mb in mbs]
    assert min(lat) > 0 and lat[0] / ce_n[0] != lat[1] / ce_n[1], (lat, ce_n)

    cfg = Qwen25VLConfig.from_hf(path)
    method = LVR(lvr_id=ds.ids.lvr, start_id=ds.ids.lvr_start, end_id=ds.ids.lvr_end,
                 hidden_size=cfg.hidden_size, loss_lambda=LAMBDA)
    model = build_model(cfg, path, freeze_vision=True, freeze_merger=True, latent_method=method)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3, clip_grad=0.0))
    logs = train_step(model, optimizer, [dict(mb) for mb in mbs], method)
    params = dict(unwrap(model[0]).named_parameters())

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    hf.model.visual.requires_grad_(False)
    sums = [hf_lvr_sums(hf, mb, ds.ids.lvr) for mb in mbs]
    ce = sum(s[0] for s in sums) / sum(s[1] for s in sums)
    mse = sum(s[2] for s in sums) / sum(s[3] for s in sums)
    assert abs(logs["lm loss"] - ce.item()) <= 1e-5 and abs(logs["latent mse"] - mse.item()) <= 1e-5
    (LAMBDA * mse).backward(retain_graph=True)
    hf_params = dict(hf.named_parameters())
    mse_part = {n: p.grad.clone() for n, p in hf_params.items() if p.grad is not None}
    ce.backward()  # accumulates: .grad is now the gradient of ce + lambda * mse

    table, worst, mse_share = NameTable(cfg), 0.0, 0.0
    for name in COMPARED:
        if name not in params:  # tied: the output layer is the word embedding
            continue
        hf_names, transform = table.lookup(name)
        ref = transform.to_megatron(*(hf_params[h].grad for h in hf_names))
        got = params[name].main_grad[: ref.shape[0]]  # drop padded vocab rows
        scale = ref.abs().max().item()
        assert scale > 0, name
        if all(h in mse_part for h in hf_names):
            part = transform.to_megatron(*(mse_part[h] for h in hf_names))
            mse_share = max(mse_share, part.abs().max().item() / scale)
        rel = (got - ref).abs().max().item() / scale
        worst = max(worst, rel)
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e}"
    print(f"\n{preset}: largest relative gradient difference {worst:.1e}, "
          f"the MSE term's largest share {mse_share:.2f}")
    assert mse_share > 1e-2  # without the term the gradients would differ far beyond 1e-5
