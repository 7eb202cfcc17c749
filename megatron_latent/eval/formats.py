"""Format rewards: does a completion have the shape a latent method trains (its span, then
an <answer>)?"""

from __future__ import annotations

import re


def make_format_reward(start: str, end: str):
    """1.0 if the completion is `start ... end <answer>...</answer>`, with optional surrounding
    whitespace and one optional trailing <|im_end|> or <|endoftext|>; else 0.0."""
    if not start or not end:
        raise ValueError(f"format reward: start and end tokens must be non-empty, got "
                         f"{start!r}, {end!r}")
    # DOTALL: the seed's pattern omitted it, so any newline inside the latent span or the answer
    # failed the format. We match across newlines because latent spans render as placeholder
    # tokens and the decoded text may wrap.
    pattern = re.compile(rf"\s*{re.escape(start)}.*?{re.escape(end)}\s*<answer>.*?</answer>\s*"
                         r"(?:<\|im_end\|>|<\|endoftext\|>)?\s*", re.DOTALL)

    def format_reward(completion: str, reference: str) -> float:
        return 1.0 if pattern.fullmatch(completion) else 0.0

    return format_reward
