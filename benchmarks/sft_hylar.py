"""HyLaR's side of bench_sft.py: the frozen SigLIP written offline at a real shape, the method
built through the registry, HyLaR micro-batches, and a standalone timing of the canvas path.

SigLIP presets (random weights, written like a hub checkpoint: config.json, model.safetensors,
preprocessor_config.json; `load_siglip` reads it back exactly as HyLaR SFT does):
  so400m: google/siglip2-so400m-patch14-384's vision tower as HyLaR loads it (SigLIP-1 FixRes):
    hidden 1152, intermediate 4304, 27 layers, 16 heads, patch 14, image 384 (729 patches),
    gelu_pytorch_tanh, layer-norm eps 1e-6;
  tiny: testing/tiny_siglip.py's default tower (for the CPU smoke run).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

SIGLIP_PRESETS = {
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16, image_size=384, patch_size=14,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh",
                 layer_norm_eps=1e-6),
}


def write_siglip(out_dir, preset: str, seed: int = 0) -> Path:
    """A random SigLIP vision tower of `preset`'s shape, written offline (nothing downloaded).
    Weights as testing/tiny_siglip.py draws them: matrices N(0, 1/fan_in), norms 1 + N(0, 0.02^2),
    biases N(0, 0.02^2); one generator per tensor name."""
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    cfg = SiglipVisionConfig(**SIGLIP_PRESETS[preset])
    with torch.device("meta"):  # shapes only
        shapes = {k: v.shape for k, v in SiglipVisionModel(cfg).state_dict().items()}
    weights = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(shape, generator=g)
        if len(shape) == 1:
            weights[name] = noise * 0.02 + (1.0 if "norm" in name and name.endswith("weight")
                                            else 0.0)
        else:
            weights[name] = noise / math.sqrt(math.prod(shape[1:]))
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}, resample=2,
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out_dir)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.rename(out_dir / "model.safetensors")
    return out_dir


def siglip_params(preset: str) -> int:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        m = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_PRESETS[preset]))
    return sum(p.numel() for p in m.parameters())


def canvas_forward_flops(preset: str, images: int) -> float:
    """Model FLOPs of the frozen SigLIP's forward over `images` reasoning images (2 N P + the
    attention's 4 P^2 h per layer); the compressor (16 queries) is small beside it."""
    s = SIGLIP_PRESETS[preset]
    p = (s["image_size"] // s["patch_size"]) ** 2
    return images * (2 * siglip_params(preset) * p
                     + 4 * s["num_hidden_layers"] * s["hidden_size"] * p * p)


def build_hylar(ids: dict, hidden_size: int, encoder_dir, canvas_tokens: int, loss_lambda=None):
    """HyLaR through the registry: `create` with the span's token ids (those of the LVR run,
    so both runs see the same input_ids) and the encoder dir (its width read from config.json)."""
    from types import SimpleNamespace

    from megatron_latent.latent import registry
    from megatron_latent.latent.hylar import TOKENS

    cls = registry.method_class("hylar")
    token_ids = {TOKENS[0]: ids["lvr"], TOKENS[1]: ids["lvr_start"], TOKENS[2]: ids["lvr_end"]}
    hp = dict(encoder=str(encoder_dir), canvas_tokens=canvas_tokens)
    if loss_lambda is not None:
        hp["loss_lambda"] = loss_lambda
    return cls.create(token_ids, SimpleNamespace(hidden_size=hidden_size), **hp)


def hylar_micro_batches(lvr_batches: list[dict], *, canvas_image: int, canvas_tokens: int,
                        ids: dict, pixel_dtype=None) -> list[dict]:
    """HyLaR micro-batches from LVR ones built with `canvas_tokens` latent tokens a sample:
    the same input_ids, labels, loss_mask, position ids and Qwen image (the problem image); the
    `<|lvr_start|>` + slots + `<|lvr_end|>` span is the canvas span (same ids), each sample has
    one reasoning image `canvas_pixel_values [mbs, 3, S, S]` (fp32, as the SigLIP processor
    gives them) and no `latent_index`."""
    import torch

    out = []
    for m, mb in enumerate(lvr_batches):
        lat = mb["latent_mask"]
        per_sample = lat.sum(1).tolist()
        if any(n != canvas_tokens for n in per_sample):
            raise ValueError(f"HyLaR needs {canvas_tokens} slots per reasoning image, the batch "
                             f"has {per_sample}")
        g = torch.Generator().manual_seed(2000 + m)
        pix = (torch.rand(lat.shape[0], 3, canvas_image, canvas_image, generator=g) * 2 - 1)
        new = {k: v for k, v in mb.items() if k != "latent_index"}
        new["canvas_pixel_values"] = pix.to(pixel_dtype or torch.float32).to(lat.device)
        out.append(new)
    return out


def canvas_breakdown(model_chunk, micro_batches: list[dict], repeats: int = 5) -> dict:
    """GPU time of the canvas path alone for one step's reasoning images, micro-batch by
    micro-batch as the step runs them (CUDA events, mean of `repeats`): the frozen SigLIP's
    forward, and the compressor + projector forward + backward (autograd.grad to the side
    parameters: nothing is accumulated into the model's gradients). Plus the dtypes it ran in."""
    import torch

    from megatron_latent.training.build import unwrap

    enc = unwrap(model_chunk).latent_modules
    dev = next(enc.parameters()).device
    pixels = [mb["canvas_pixel_values"].to(dev) for mb in micro_batches]
    params = [p for p in enc.parameters() if p.requires_grad]

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeats):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / repeats

    if hasattr(enc, "_patches"):  # as CanvasEncoder.forward runs them
        dtype = enc._dtype(pixels[0])
        encode = lambda p: enc._patches(p, dtype)  # noqa: E731
    else:  # canvas.py before its compute dtype (SigLIP and compressor in the params' dtype)
        dtype, encode = enc.canvas_proj.weight.dtype, enc.encode_patches
    patches = [encode(p) for p in pixels]

    def siglip():
        for p in pixels:
            encode(p)

    def compressor():
        for x in patches:
            with torch.autocast(dev.type, dtype=dtype,
                                enabled=dtype != enc.canvas_proj.weight.dtype):
                out = enc.canvas_proj(enc.compressor(x))
            torch.autograd.grad(out.float().square().sum(), params, allow_unused=True)

    siglip_ms, comp_ms = timed(siglip), timed(compressor)
    s = enc.siglip
    return {"siglip_fwd_ms": siglip_ms, "compressor_proj_fwd_bwd_ms": comp_ms,
            "canvas_ms": siglip_ms + comp_ms,
            "siglip_dtype": str(next(s.parameters()).dtype),
            "siglip_attn": getattr(s.config, "_attn_implementation", None),
            "side_param_dtype": str(next(enc.parameters()).dtype), "compute_dtype": str(dtype),
            "siglip_graphs": ({"captures": enc._graphs.captures, "replays": enc._graphs.replays,
                               "off": enc._graphs.disabled_reason}
                              if hasattr(enc, "_graphs") else None),
            "patches_dtype": str(patches[0].dtype), "images": sum(len(p) for p in pixels)}
