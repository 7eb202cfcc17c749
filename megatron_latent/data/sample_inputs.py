"""Real-photo vision-language inputs (scikit-image ships the photos): the synthetic data
generator, the HF <-> Megatron comparison tool, demos and tests use them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image

from megatron_latent.models.qwen25vl.rope_index import rope_index


def sample_photo(name: str) -> Image.Image:
    """A photo shipped inside scikit-image (read as a file: no skimage import, no network)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-image is needed for its sample photos (pip install scikit-image)")
    path = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.png"
    return Image.open(path).convert("RGB")


def photos() -> list[Image.Image]:
    """Three photos at odd, different sizes (no side a multiple of 28)."""
    return [sample_photo("astronaut").resize((150, 100)), sample_photo("coffee").resize((90, 130)),
            sample_photo("chelsea").resize((121, 115))]


def two_sample_batch(processor, cfg, seq_length: int | None = None) -> dict:
    """Sample 0 holds two images of different sizes, sample 1 one image; right-padded.

    Returns the processor's tensors plus our training fields: labels (next token), loss_mask
    (real next tokens only) and mRoPE position_ids [3, b, s].
    """
    msgs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What differs?"},
                                      {"type": "image"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "The colours and the cup."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Describe the cat."},
                                      {"type": "image"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A tabby cat."}]}],
    ]
    texts = [processor.apply_chat_template(m) for m in msgs]
    kw = dict(padding="max_length", max_length=seq_length) if seq_length else dict(padding=True)
    enc = processor(text=texts, images=photos(), return_tensors="pt", padding_side="right", **kw)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    loss_mask = torch.cat([attn[:, 1:], torch.zeros_like(attn[:, :1])], dim=1)
    position_ids, _ = rope_index(ids, enc["image_grid_thw"], image_token_id=cfg.image_token_id,
                                 spatial_merge_size=cfg.spatial_merge_size, attention_mask=attn)
    return {**enc, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
