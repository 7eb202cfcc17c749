"""The one chat layout that SFT samples (data/lvr_dataset.py) and the prompts of RL rollouts,
generation and evaluation (inference/prompts.py) are tokenised with, so a model is prompted at
inference exactly as it was trained:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text}<|vision_start|><|image_pad|>*n<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n

This is what Qwen2.5-VL's chat template renders for a user turn of [image, ..., text] (what the
LVR seed's evaluation and GRPO prompts are), with the template's default system message.
`<image>` placeholders in record text take one newline on each side with them: the seed's SFT
data rewrites `\\n?<image>\\n?` to the vision block (LVR `src/dataset/data_utils.py`,
`replace_image_tokens`), so "<image>\\nQ" in a record and [image, "Q"] in a chat message give the
same tokens.

A layout is a list of pieces `(text or token ids, flag)`; `tokenize` encodes all texts in one
batch and keeps each id's flag (SFT uses it to mark supervised tokens). Text between two special
tokens is one piece, as the rendered chat text is tokenised; the assistant header is a piece of
its own, so the first answer token starts a new BPE token, as when it is generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen2.5-VL's template default, and the seed's
_IMAGE = re.compile(r"\n?" + re.escape(IMAGE_PLACEHOLDER) + r"\n?")

Piece = tuple[str | list[int], bool]


@dataclass(frozen=True)
class ChatTokens:
    """The special-token ids of the layout (data/lvr_tokens.TokenIds has the same fields)."""
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTokens":
        from megatron_latent.latent.tokens import single_id

        return cls(*(single_id(tokenizer, s) for s in ("<|im_start|>", "<|im_end|>",
                                                       "<|vision_start|>", "<|vision_end|>",
                                                       "<|image_pad|>")))


def split_at_images(text: str) -> list[str]:
    """The text around each `<image>` placeholder (one part more than placeholders), a newline
    next to a placeholder dropped."""
    return _IMAGE.split(text)


def system_turn(t, system: str | None) -> list[Piece]:
    """The system turn; None or "" -> the default message (as the chat template does)."""
    return [([t.im_start], False), ("system\n" + (system or DEFAULT_SYSTEM), False),
            ([t.im_end], False), ("\n", False)]


def user_turn(t, parts: list[str], image_tokens: Iterator[int]) -> list[Piece]:
    """A user turn: the texts `parts` with a vision block between each two (its image pads: the
    next count of `image_tokens`, merged visual tokens). A record's text: `split_at_images`."""
    pieces: list[Piece] = [([t.im_start], False)]
    for j, part in enumerate(parts):
        if j:
            pieces.append(([t.vision_start] + [t.image_pad] * next(image_tokens) + [t.vision_end],
                           False))
        pieces.append(("user\n" + part if j == 0 else part, False))
    return pieces + [([t.im_end], False), ("\n", False)]


def assistant_header(t) -> list[Piece]:
    return [([t.im_start], False), ("assistant\n", False)]


def prompt_pieces(t, question: str, image_tokens: Iterable[int], system: str | None = None,
                  answer_prefix: str = "", images_first: bool = True) -> list[Piece]:
    """System turn, one user turn (the images first, then `question`; or the question first,
    as HyLaR's SFT data has it), the assistant header and `answer_prefix` (e.g.
    "<|lvr_start|>": the answer opens with a latent span). A question with `<image>`
    placeholders (RL parquet problems) puts each image at its placeholder instead, whatever
    `images_first` says; ValueError when placeholders and images differ in number."""
    counts = list(image_tokens)
    if IMAGE_PLACEHOLDER in question:
        parts = split_at_images(question)
        if len(parts) - 1 != len(counts):
            raise ValueError(f"the text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
                             f"but {len(counts)} images are given")
    elif images_first:
        parts = [""] * len(counts) + [question]
    else:
        parts = [question] + [""] * len(counts)
    return (system_turn(t, system) + user_turn(t, parts, iter(counts))
            + assistant_header(t) + [(answer_prefix, False)])


def tokenize(tokenizer, pieces: list[Piece]) -> tuple[list[int], list[bool]]:
    """-> (token ids, each id's piece flag); empty texts are skipped."""
    texts = [p for p, _ in pieces if isinstance(p, str) and p]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids: list[int] = []
    flags: list[bool] = []
    for p, flag in pieces:
        if isinstance(p, str):
            if not p:
                continue
            p = next(encoded)
        ids.extend(p)
        flags.extend([flag] * len(p))
    return ids, flags
