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
import torch.nn.functional as F
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
        q = q + _attend(self.self_attn, x, None)
        q = q + _attend(self.cross_attn, self.cross_attn_norm(q), patches)
        return q + self.ffn(self.ffn_norm(q))


def _attend(mha: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor | None) -> torch.Tensor:
    """`mha(q, kv, kv, need_weights=False)[0]` (batch first, no masks, dropout 0; kv None: self
    attention) on the module's own parameters, straight to SDPA: nn.MultiheadAttention's
    Python path costs several times the GPU time of these small attentions in host time."""
    n, lq, d = q.shape
    h = mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if kv is None:
        qq, k, v = F.linear(q, w, b).chunk(3, dim=-1)
    else:
        qq = F.linear(q, w[:d], None if b is None else b[:d])
        k, v = F.linear(kv, w[d:], None if b is None else b[d:]).chunk(2, dim=-1)
    heads = lambda t: t.unflatten(-1, (h, d // h)).transpose(1, 2)  # noqa: E731 [n, h, l, hd]
    out = F.scaled_dot_product_attention(heads(qq), heads(k), heads(v))
    return mha.out_proj(out.transpose(1, 2).reshape(n, lq, d))


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
    is moved to the input's device and the compute dtype when a forward needs it.

    Compute dtype: `compute_dtype` if set, else bf16 on a GPU when the parameters are fp32 or
    bf16, else the parameters' dtype (the CPU; fp64 checks). On a GPU with fp32 parameters (as
    the side modules are built) the compressor and projector then run under bf16 autocast (fp32
    master weights, bf16 GEMMs and attention) and the output is bf16. The frozen SigLIP's
    forward on a GPU replays a CUDA graph per input shape (`siglip_graphs` shapes kept; 0:
    eager), captured on a shape's second sighting: eager, its ~450 small kernels an image cost
    the host about three times their GPU time. On one H200 (7B-shaped 4-layer SFT step, 8
    micro-batches, one 384-pixel image each; benchmarks/bench_sft.py --method lvr hylar), the
    canvas path cost 29.9% of LVR's tokens/s with SigLIP and the compressor eager in fp32, 18.3%
    with SigLIP eager in bf16, 14.0% as here (benchmarks/results/2026-12-03/)."""

    def __init__(self, dim: int, hidden_size: int, siglip: nn.Module | None = None, *,
                 n_queries: int = 16, n_layers: int = 2, n_heads: int = 8, ffn_mult: int = 4,
                 compute_dtype: torch.dtype | None = None, siglip_graphs: int = 4):
        super().__init__()
        from megatron_latent.models.qwen25vl.vision_graphs import VisionGraphs

        self.compute_dtype = compute_dtype
        self._graphs = VisionGraphs(siglip_graphs)  # a plain object: not a submodule
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
        self._graphs.reset()
        self._graphs.param_dicts = None  # the graphs' weight check reads the new tower

    @property
    def siglip(self) -> nn.Module | None:
        return self._frozen[0] if self._frozen else None

    def _dtype(self, pixels: torch.Tensor) -> torch.dtype:
        own = self.canvas_proj.weight.dtype
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if pixels.is_cuda and own in (torch.float32, torch.bfloat16) else own

    def forward(self, canvas_pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.canvas_proj.weight
        n = canvas_pixel_values.shape[0]
        if n == 0:
            return w.new_zeros(0, self.n_queries, self.hidden_size, device=canvas_pixel_values.device)
        dtype = self._dtype(canvas_pixel_values)
        patches = self._patches(canvas_pixel_values, dtype)
        if dtype == w.dtype:
            return self.canvas_proj(self.compressor(patches.to(dtype)))
        with torch.autocast(canvas_pixel_values.device.type, dtype=dtype):
            return self.canvas_proj(self.compressor(patches))

    @torch.no_grad()
    def encode_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """SigLIP's last_hidden_state [n, n_patches, dim] (post-LN), without grad, in the
        parameters' dtype (computed in the compute dtype)."""
        return self._patches(pixels, self._dtype(pixels)).to(self.canvas_proj.weight.dtype)

    @torch.no_grad()
    def _patches(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        siglip = self.siglip
        if siglip is None:
            raise RuntimeError("CanvasEncoder has no SigLIP: call attach_siglip(load_siglip(...)[0])")
        p = next(siglip.parameters())
        if p.device != pixels.device or p.dtype != dtype:
            siglip.to(device=pixels.device, dtype=dtype)
        siglip.eval()

        def run(px, _layout=None):
            return siglip(pixel_values=px).last_hidden_state

        key = ("siglip", tuple(pixels.shape), dtype)
        if self._graphs.usable(siglip, pixels, key):
            return self._graphs.run(key, run, pixels, dtype, lambda: None)
        return run(pixels.to(dtype))


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
