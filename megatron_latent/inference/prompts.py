"""Chat prompts with images -> `Prompt`s: the checkpoint's image processor for pixels, and the
chat layout SFT samples are tokenised with (data/chat.py) for the ids, so generation, evaluation
and RL rollouts prompt the model exactly as SFT trained it."""

from __future__ import annotations

from megatron_latent.data import chat
from megatron_latent.inference.generator import Prompt


def build_prompt(processor, text: str, images=(), *, system: str | None = None,
                 answer_prefix: str = "", images_first: bool = True) -> Prompt:
    """One user turn (images first, then `text`; `images_first=False`: the text first, the
    layout of a method whose SFT data has it so, `method.prompt_images_first`; a `text` with
    `<image>` placeholders, one per image: each image at its placeholder, with one adjacent
    newline on each side dropped as in SFT records, else ValueError) and the assistant
    header, plus `answer_prefix`
    (e.g. "<|lvr_start|>" to start the answer with a latent span). `system` None or "": the
    default system message, as Qwen2.5-VL's chat template (and SFT) use. The ids equal what the
    processor gives for its chat template's rendering of the same messages (tested)."""
    pixel_values = grid = None
    counts = []
    if images:
        ip = processor.image_processor
        enc = ip(images=list(images), return_tensors="pt")
        pixel_values, grid = enc["pixel_values"], enc["image_grid_thw"]
        counts = [int(t * h * w) // ip.merge_size ** 2 for t, h, w in grid.tolist()]
    tok = processor.tokenizer
    pieces = chat.prompt_pieces(chat.ChatTokens.from_tokenizer(tok), text, counts, system=system,
                                answer_prefix=answer_prefix, images_first=images_first)
    return Prompt(input_ids=chat.tokenize(tok, pieces)[0], pixel_values=pixel_values,
                  image_grid_thw=grid)
