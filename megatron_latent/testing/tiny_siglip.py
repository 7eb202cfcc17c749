"""A tiny random SigLIP vision tower saved like a hub checkpoint (config.json, model.safetensors,
preprocessor_config.json), built offline: HyLaR's canvas encoder in tests and demos."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from megatron_latent.fsutil import atomic_dir, check_writable


def make_tiny_siglip(out_dir, *, hidden: int = 32, layers: int = 2, heads: int = 2,
                     image_size: int = 56, patch: int = 14, seed: int = 0, prefix: str = "",
                     overwrite: bool = False) -> Path:
    """Write the checkpoint to `out_dir`, return its path. Weight names are transformers 5.x's
    (`embeddings.…`); `prefix="vision_model."` writes transformers 4.x's layout instead. The MAP
    head is saved as in real checkpoints. Byte-identical for equal arguments."""
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, overwrite)
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             image_size=image_size, patch_size=patch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(cfg).float()
    weights = {}
    for name, p in model.state_dict().items():  # own generator per name: order-independent
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1:
            value = noise * 0.02 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        else:
            value = noise / math.sqrt(p[0].numel())
        weights[prefix + name] = value.contiguous()
    with atomic_dir(out_dir) as tmp:
        cfg.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=2,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp)
    return out_dir
