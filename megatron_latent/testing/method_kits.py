"""What the conformance suite (tests/latent/test_conformance.py) needs of each registered latent
method: its tiny SFT data, its tiny hyper-parameters, its span opener for generation, and an
independent computation of its loss terms written against HF transformers' modules.

A new method joins the suite by adding a kit here; the suite fails for a registered method
without one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MethodKit:
    name: str
    make_data: Callable[[Path], str]  # builds the SFT data under a dir -> --data-path
    hparams: Callable[[Path, str], dict]  # tiny hyper-parameters (side files built under the
    # dir, for the model in the HF dir)
    hf_terms: Callable  # (hf, mb, method, modules) -> {log name: mean}
    opener: str | None  # the token that opens a latent span (None: the method has none)
    cli: Callable[[dict], list[str]]  # the hyper-parameters as pretrain_sft.py flags
    # (method, side modules) -> method: the RL part's start, as a trained SFT checkpoint would
    # be (e.g. modules past their zero init, hparams fixed by training); None: as built
    rl_start: Callable | None = None
    rl_pipeline: bool = True  # its RL stage runs under pipeline parallelism (else it refuses)


def _hf_embed(hf, mb, image_token_id):
    ids = mb["input_ids"]
    feats = torch.cat(hf.model.get_image_features(mb["pixel_values"],
                                                  mb["image_grid_thw"]).pooler_output)
    emb = hf.model.get_input_embeddings()(ids).clone()
    emb[ids == image_token_id] = feats
    return emb, feats


def _hf_forward(hf, mb, emb, image_token_id, reduction="mean"):
    ids, attn = mb["input_ids"], mb["attention_mask"]
    pos, _ = hf.model.get_rope_index(ids, (ids == image_token_id).int(), mb["image_grid_thw"],
                                     attention_mask=attn)
    h = hf.model.language_model(inputs_embeds=emb, position_ids=pos,
                                attention_mask=attn).last_hidden_state
    logits = hf.lm_head(h).float()
    sup = mb["loss_mask"][:, :-1].bool()
    return h, F.cross_entropy(logits[:, :-1][sup], ids[:, 1:][sup], reduction=reduction)


def _regression(h, ids, latent_id, targets, reduction="mean"):
    """Squared error of the hidden state before each latent slot against its target."""
    predicts_latent = ids[:, 1:] == latent_id
    sq = (h[:, :-1][predicts_latent].float() - targets.float()).pow(2)
    return sq.sum() if reduction == "sum" else sq.mean()


def hf_lvr_sums(hf, mb, lvr_id):
    """LVR: the box's merged visual tokens at the <|lvr|> slots, teacher-forced (detached).
    -> (CE sum, its token count, squared-error sum, its element count)."""
    image_id = hf.config.image_token_id
    emb, feats = _hf_embed(hf, mb, image_id)
    targets = feats[mb["latent_index"]].detach()
    emb[mb["input_ids"] == lvr_id] = targets
    h, ce = _hf_forward(hf, mb, emb, image_id, reduction="sum")
    sq = _regression(h, mb["input_ids"], lvr_id, targets, reduction="sum")
    return ce, int(mb["loss_mask"][:, :-1].sum()), sq, targets.numel()


def hf_lvr_terms(hf, mb, method, modules=None):
    ce, n_ce, sq, n_sq = hf_lvr_sums(hf, mb, method.lvr_id)
    return {"lm loss": ce / n_ce, "latent mse": sq / n_sq}


def hf_hylar_terms(hf, mb, method, modules):
    """HyLaR (spec 1.5): canvas vectors in the <|canvas|> slots (with gradient, so the
    compressor and projector learn through the LLM), MSE to the detached canvas."""
    image_id = hf.config.image_token_id
    emb, _ = _hf_embed(hf, mb, image_id)
    canvas = modules(mb["canvas_pixel_values"]).flatten(0, 1)
    ids = mb["input_ids"]
    emb = emb.masked_scatter((ids == method.canvas_id).unsqueeze(-1), canvas.to(emb.dtype))
    h, ce = _hf_forward(hf, mb, emb, image_id)
    target = canvas if method.target_grad else canvas.detach()
    return {"lm loss": ce, "latent mse": _regression(h, ids, method.canvas_id, target)}


def _lvr_data(root: Path) -> str:
    from megatron_latent.data.synthetic_lvr import make_synthetic_lvr

    out = make_synthetic_lvr(root / "lvr_data", num=16, val_num=4, seed=0, min_side=112,
                             max_side=224, progress=False)
    return str(out / "meta.json")


def _hylar_data(root: Path) -> str:
    from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved

    out = make_synthetic_interleaved(root / "hylar_data", num=16, val_num=4, seed=0,
                                     min_side=112, max_side=224, progress=False)
    return str(out / "train")


def _hylar_hparams(root: Path, hf_dir: str) -> dict:
    from megatron_latent.testing.tiny_siglip import make_tiny_siglip

    siglip = root / "tiny_siglip"
    if not siglip.is_dir():
        make_tiny_siglip(siglip)
    return {"encoder": str(siglip), "canvas_tokens": 4}


def hf_deeplatent_terms(hf, mb, method, modules):
    """DeepLatent stage 2 (spec 2.5-2.7), on HF's modules: a context forward with the grid
    slots holding the pad embedding gives the final-norm states at each block's placeholders;
    the side modules build each block's latents from them (the same noise: a fixed function
    of the sample); the training forward's CE, the (1 - cos) to the teacher states at the
    aligned layers' outputs (forward hooks on HF's decoder layers), and the scale CE at the
    scale placeholder."""
    image_id = hf.config.image_token_id
    emb, feats = _hf_embed(hf, mb, image_id)
    lm, attn, pos = hf.model.language_model, mb["attention_mask"], mb["position_ids"]
    with torch.no_grad():
        h0 = lm(inputs_embeds=emb, position_ids=pos, attention_mask=attn).last_hidden_state
    blocks, latents, seen = mb["blocks"].tolist(), [], {}
    for k, (row, p, h, w) in enumerate(blocks):
        seen[row] = seen.get(row, -1) + 1
        gen = method.block_noise(mb["sample_ids"][row], seen[row])
        z, _ = modules.build_latents(h0[row, p + 2], h0[row, p + 3], h, w,
                                     feats[mb["question_features"][k]], mb["feature_coords"][k],
                                     tuple(mb["feature_grid"][k]), method.sigma_q,
                                     method.sigma_f, noise=True, generator=gen)
        latents.append(z)
    emb = emb.masked_scatter(mb["latent_mask"].unsqueeze(-1), torch.cat(latents).to(emb.dtype))
    outs = {}

    def grab(layer, module, args, output):
        outs[layer] = output[0] if isinstance(output, tuple) else output

    handles = [lm.layers[layer - 1].register_forward_hook(lambda m, a, o, layer=layer:
                                                          grab(layer, m, a, o))
               for layer in method.align_layers]
    try:
        h = lm(inputs_embeds=emb, position_ids=pos, attention_mask=attn).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    sup = mb["loss_mask"][:, :-1].bool()
    ce = F.cross_entropy(hf.lm_head(h).float()[:, :-1][sup], mb["input_ids"][:, 1:][sup])
    cos = [1 - F.cosine_similarity(outs[layer][mb["latent_mask"]].float(),
                                   mb["teacher"][layer].float(), dim=-1)
           for layer in method.align_layers]
    rows = torch.tensor([b[0] for b in blocks])
    at = torch.tensor([b[1] + 1 for b in blocks])
    lh, lw = modules.scale_head(h[rows, at])
    hw = torch.tensor([[b[2] - 1, b[3] - 1] for b in blocks])
    scale = (F.cross_entropy(lh.float(), hw[:, 0], reduction="none")
             + F.cross_entropy(lw.float(), hw[:, 1], reduction="none")).mean()
    return {"lm loss": ce, "align loss": torch.cat(cos).mean(), "scale loss": scale}


def _deeplatent_data(root: Path) -> str:
    from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved

    out = root / "deeplatent_data"
    if not out.is_dir():
        make_synthetic_interleaved(out, num=12, val_num=4, seed=0, min_side=112, max_side=224,
                                   progress=False, reasoning_images=2)
    return str(out / "train")


def _deeplatent_hparams(root: Path, hf_dir: str) -> dict:
    """Stage 2 with a teacher-state cache of random (seeded) states for every sample: the
    suite checks the loss formula; the teacher's own correctness (cache = online capture of
    the stage-1 model) is tests/latent/test_teacher_cache.py's."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoProcessor

    from megatron_latent.data.deeplatent_data import DeepLatentDataset
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    cache = root / "deeplatent_teacher"
    hp = {"stage": 2, "teacher": str(cache)}
    if (cache / "index.json").is_file():
        return hp
    cfg = Qwen25VLConfig.from_hf(hf_dir)
    proc = AutoProcessor.from_pretrained(hf_dir)
    from megatron_latent.latent.tokens import add_tokens
    from megatron_latent.data.deeplatent_tokens import LATENT_TOKENS

    add_tokens(proc.tokenizer, LATENT_TOKENS, cfg.vocab_size, special=False)
    ds = DeepLatentDataset(_deeplatent_data(root), stage=1, tokenizer=proc.tokenizer,
                           image_processor=proc.image_processor, vocab_size=cfg.vocab_size,
                           seq_length=2048, min_pixels=3136, max_pixels=50176)
    layers = sorted({max(1, round(cfg.num_layers * k / 4)) for k in (1, 2, 3, 4)})
    gen = torch.Generator().manual_seed(0)
    tensors, index = {}, {}
    for i in range(len(ds)):
        s = ds[i]
        n = sum(h * w for h, w in s["teacher_grids"])
        for layer in layers:
            tensors[f"{s['sample_id']}/L{layer}"] = torch.randn(n, cfg.hidden_size, generator=gen)
        index[s["sample_id"]] = {"shard": 0, "grids": s["teacher_grids"], "layers": layers,
                                 "model_hash": "random"}
    cache.mkdir(parents=True)
    save_file(tensors, str(cache / "00000.safetensors"))
    (cache / "index.json").write_text(json.dumps(index))
    return hp


def _deeplatent_rl_start(method, modules):
    """A stage-2 checkpoint's state: the modulation MLPs past their zero-initialised last layer
    (at zero init no gradient reaches h_l / h_i through them) and the sigmas training fixes
    (0.1 x RMS of the grid queries; of the question features, about 1 in the tiny model)."""
    import dataclasses

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mlp in (modules.mlp_l, modules.mlp_i):
            w = mlp.fc2.weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w) * 0.02)
        # small 2 x 3 grids, so a short rollout holds whole blocks and text after them
        modules.scale_head.h.bias[1] += 100.0
        modules.scale_head.w.bias[2] += 100.0
    rms = float(modules.grid.queries.detach().float().pow(2).mean().sqrt())
    return dataclasses.replace(method, sigma_q=0.1 * rms, sigma_f=0.1)


KITS = {
    "lvr": MethodKit("lvr", _lvr_data, lambda root, hf: {"loss_lambda": 0.1}, hf_lvr_terms,
                     "<|lvr_start|>", lambda hp: ["--lvr-loss-lambda", str(hp["loss_lambda"])]),
    "hylar": MethodKit("hylar", _hylar_data, _hylar_hparams, hf_hylar_terms,
                       "<|canvas_start|>", lambda hp: ["--canvas-encoder", hp["encoder"],
                                                       "--canvas-tokens", str(hp["canvas_tokens"])]),
    "deeplatent": MethodKit("deeplatent", _deeplatent_data, _deeplatent_hparams,
                            hf_deeplatent_terms, "<latent>",
                            lambda hp: ["--deeplatent-stage", "2", "--teacher-states",
                                        hp["teacher"]], _deeplatent_rl_start,
                            rl_pipeline=False),
}
