"""Real-photo vision-language batches for tests and demos (scikit-image ships the photos)."""

from __future__ import annotations

import torch
from PIL import Image

from megatron_latent.models.qwen25vl.rope_index import rope_index


def photos() -> list[Image.Image]:
    """Three photos at odd, different sizes (no side a multiple of 28)."""
    import skimage.data as sd

    return [Image.fromarray(sd.astronaut()).resize((150, 100)),
            Image.fromarray(sd.coffee()).resize((90, 130)),
            Image.fromarray(sd.chelsea()).resize((121, 115))]


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
