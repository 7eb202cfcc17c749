"""HyLaR's canvas encoder (SFT only): frozen SigLIP -> learnable query compressor -> projector.

A reasoning image becomes `n_queries` vectors in the LLM's input space (the teacher-forced canvas
latents). Parameter names of `CanvasCompressor` equal HyLaR's `LearnableCanvasCompressor` names
after `canvas_extractor.compressor.`, and `canvas_proj` its projector, so converters map 1:1.

SigLIP is HyLaR's `google/siglip2-so400m-patch14-384` loaded with transformers' SigLIP-1 class
`SiglipVisionModel` (FixRes, Conv2d patch embedding), not the NaFlex `Siglip2VisionModel`.
It is frozen and held outside the module tree: never in DDP buckets, the optimizer or checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
               "attention_dropout")
_DROP = ("text_model.", "logit_scale", "logit_bias", "head.")  # text tower, contrastive, MAP head


class CanvasLayer(nn.Module):
    """Pre-norm: queries self-attend, cross-attend to the (un-normalised) patches, then an FFN."""

    def __init__(self, dim: int, n_heads: int, ffn_mult: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True, bias=True)
        self.cross_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True, bias=True)
        self.self_attn_norm = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn_norm = nn.LayerNorm(dim, eps=1e-5)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(ffn_mult * dim, dim))

    def forward(self, q: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_norm(q)
        q = q + self.self_attn(x, x, x, need_weights=False)[0]
        q = q + self.cross_attn(self.cross_attn_norm(q), patches, patches, need_weights=False)[0]
        return q + self.ffn(self.ffn_norm(q))


class CanvasCompressor(nn.Module):
    """[n, n_patches, dim] -> [n, n_queries, dim] (HyLaR's LearnableCanvasCompressor)."""

    def __init__(self, dim: int, n_queries: int = 16, n_layers: int = 2, n_heads: int = 8,
                 ffn_mult: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.layers = nn.ModuleList(CanvasLayer(dim, n_heads, ffn_mult) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, patches)
        return self.final_norm(q)


class CanvasEncoder(nn.Module):
    """canvas_pixel_values [n, 3, S, S] -> C [n, n_queries, hidden_size].

    Only `compressor` and `canvas_proj` are parameters. SigLIP (`attach_siglip`, or given here)
    is moved to the input's device and its compute dtype when a forward needs it: `siglip_dtype`
    if set, else bf16 on a GPU when the parameters are fp32 or bf16 (it is frozen and forward
    only, its output a detached input; in fp32 it ran at the GPU's plain-fp32 rate, ~15% of a
    7B-shaped SFT step), else the parameters' dtype (the CPU; fp64 checks). Its output is cast
    to the parameters' dtype for the compressor."""

    def __init__(self, dim: int, hidden_size: int, siglip: nn.Module | None = None, *,
                 n_queries: int = 16, n_layers: int = 2, n_heads: int = 8, ffn_mult: int = 4,
                 siglip_dtype: torch.dtype | None = None):
        super().__init__()
        self.siglip_dtype = siglip_dtype
        self.compressor = CanvasCompressor(dim, n_queries, n_layers, n_heads, ffn_mult)
        self.canvas_proj = nn.Linear(dim, hidden_size, bias=True)
        self.dim, self.n_queries, self.hidden_size = dim, n_queries, hidden_size
        self._frozen: list[nn.Module] = []  # a plain list: not a submodule
        if siglip is not None:
            self.attach_siglip(siglip)

    def attach_siglip(self, siglip: nn.Module) -> None:
        if siglip.config.hidden_size != self.dim:
            raise ValueError(f"SigLIP width {siglip.config.hidden_size} != compressor dim {self.dim}")
        siglip.requires_grad_(False).eval()
        self._frozen[:] = [siglip]

    @property
    def siglip(self) -> nn.Module | None:
        return self._frozen[0] if self._frozen else None

    def forward(self, canvas_pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.canvas_proj.weight
        n = canvas_pixel_values.shape[0]
        if n == 0:
            return w.new_zeros(0, self.n_queries, self.hidden_size, device=canvas_pixel_values.device)
        return self.canvas_proj(self.compressor(self.encode_patches(canvas_pixel_values)))

    @torch.no_grad()
    def encode_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """SigLIP's last_hidden_state [n, n_patches, dim] (post-LN), without grad."""
        siglip = self.siglip
        if siglip is None:
            raise RuntimeError("CanvasEncoder has no SigLIP: call attach_siglip(load_siglip(...)[0])")
        out_dtype = self.canvas_proj.weight.dtype
        dtype = self.siglip_dtype or (
            torch.bfloat16 if pixels.is_cuda and out_dtype in (torch.float32, torch.bfloat16)
            else out_dtype)
        p = next(siglip.parameters())
        if p.device != pixels.device or p.dtype != dtype:
            siglip.to(device=pixels.device, dtype=dtype)
        siglip.eval()
        return siglip(pixel_values=pixels.to(dtype)).last_hidden_state.to(out_dtype)


# ---- SigLIP from a local Hugging Face directory ---------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def vision_config(path):
    """SiglipVisionConfig from config.json: a vision config, or a full SigLIP / SigLIP2 config's
    `vision_config` (read as SigLIP-1 FixRes: image_size from num_patches when absent)."""
    from transformers import SiglipVisionConfig

    cfg_file = Path(path) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    vc = cfg.get("vision_config", cfg)
    kw = {k: vc[k] for k in VISION_KEYS if k in vc}
    if "image_size" not in kw and "num_patches" in vc:
        kw["image_size"] = math.isqrt(vc["num_patches"]) * kw.get("patch_size", 16)
    if "hidden_size" not in kw:
        raise ValueError(f"{cfg_file}: no hidden_size in the (vision) config")
    return SiglipVisionConfig(**kw, vision_use_head=False)  # the MAP head is unused by HyLaR


def load_siglip(path):
    """(SiglipVisionModel in fp32, eval, frozen; SiglipImageProcessor) from a local directory.

    Weight names may carry `vision_model.` (transformers 4.x, full SigLIP checkpoints) or not
    (transformers 5.x SiglipVisionModel); text-tower, logit and MAP-head keys are dropped."""
    from safetensors import safe_open
    from transformers import SiglipImageProcessor, SiglipVisionModel

    path = Path(path)
    model = SiglipVisionModel(vision_config(path)).float().eval()
    want = model.state_dict()
    got, where = {}, {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = key.removeprefix("vision_model.")
                if name.startswith(_DROP):
                    continue
                t = sf.get_tensor(key)
                if name in want and tuple(t.shape) != tuple(want[name].shape):
                    raise ValueError(f"{f}: {key} has shape {tuple(t.shape)}, the config "
                                     f"({path / 'config.json'}) expects {tuple(want[name].shape)}")
                got[name], where[name] = t, f
    files = ", ".join(str(f) for f in _weight_files(path))
    if missing := sorted(set(want) - set(got)):
        raise ValueError(f"{files}: missing SigLIP vision weights {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected := sorted(set(got) - set(want)):
        raise ValueError(f"{where[unexpected[0]]}: unexpected keys {unexpected[:5]} "
                       f"({len(unexpected)} in all) for a SigLIP vision tower")
    model.load_state_dict({k: v.float() for k, v in got.items()}, strict=True)
    model.requires_grad_(False)
    pre = path / "preprocessor_config.json"
    if not pre.is_file():
        raise FileNotFoundError(f"{pre} is missing (SigLIP's image processor: size, resample, mean/std)")
    return model, SiglipImageProcessor.from_pretrained(str(path), local_files_only=True)


def siglip_fingerprint(path) -> str:
    """sha256 over the weight files (name and bytes, in name order): the checkpoint's metadata."""
    h = hashlib.sha256()
    for f in _weight_files(Path(path)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
