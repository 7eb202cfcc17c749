"""Chat prompts with images -> `Prompt`s, through the checkpoint's own HF processor."""

from __future__ import annotations

from megatron_latent.inference.generator import Prompt


def build_prompt(processor, text: str, images=(), *, system: str | None = None,
                 answer_prefix: str = "") -> Prompt:
    """One user turn (images first, then text) and the assistant header, plus `answer_prefix`
    (e.g. "<|lvr_start|>" to start the answer with a latent span)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    msgs = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system
            else []) + [{"role": "user", "content": content}]
    chat = processor.apply_chat_template(msgs, add_generation_prompt=True) + answer_prefix
    enc = processor(text=[chat], images=list(images) or None, return_tensors="pt")
    return Prompt(input_ids=enc["input_ids"][0].tolist(),
                  pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))
