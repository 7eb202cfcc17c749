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
    hparams: Callable[[Path], dict]  # tiny hyper-parameters (side files built under the dir)
    hf_terms: Callable  # (hf, mb, method, modules) -> {log name: mean}
    opener: str | None  # the token that opens a latent span (None: the method has none)
    cli: Callable[[dict], list[str]]  # the hyper-parameters as pretrain_sft.py flags


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


def _hylar_hparams(root: Path) -> dict:
    from megatron_latent.testing.tiny_siglip import make_tiny_siglip

    siglip = root / "tiny_siglip"
    if not siglip.is_dir():
        make_tiny_siglip(siglip)
    return {"encoder": str(siglip), "canvas_tokens": 4}


KITS = {
    "lvr": MethodKit("lvr", _lvr_data, lambda root: {"loss_lambda": 0.1}, hf_lvr_terms,
                     "<|lvr_start|>", lambda hp: ["--lvr-loss-lambda", str(hp["loss_lambda"])]),
    "hylar": MethodKit("hylar", _hylar_data, _hylar_hparams, hf_hylar_terms,
                       "<|canvas_start|>", lambda hp: ["--canvas-encoder", hp["encoder"],
                                                       "--canvas-tokens", str(hp["canvas_tokens"])]),
}
