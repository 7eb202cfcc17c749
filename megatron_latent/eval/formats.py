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


# HyLaR scores text in which the end-of-turn tokens are dropped and whitespace around every
# '<', '>' and '/' is squeezed out (so "< /think >" counts as "</think>").
_END_TOKENS = ("<|endoftext|>", "<|im_end|>")
_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")


def squeeze_tag_whitespace(text: str) -> str:
    return _TAG_SPACE.sub(r"\1", text)


def span_placeholder(latent: str) -> str:
    """What a latent span's content is rendered as: the latent token without its pipes
    ("<|canvas|>" -> "<canvas>", HyLaR's literal). A plain tag, so the repetition score keeps it
    as a word instead of dropping it as a special token."""
    return latent.replace("<|", "<").replace("|>", ">")


def make_span_renderer(start: str, end: str, latent: str):
    """text -> text with each `start ... end` span's content (whatever was decoded there, even
    nothing) replaced by `span_placeholder(latent)`, then <|endoftext|> and <|im_end|> removed."""
    if not start or not end or not latent:
        raise ValueError(f"span renderer: start, end and latent tokens must be non-empty, got "
                         f"{start!r}, {end!r}, {latent!r}")
    span = re.compile(rf"{re.escape(start)}.*?{re.escape(end)}", re.DOTALL)
    rendered = start + span_placeholder(latent) + end

    def render(text: str) -> str:
        text = span.sub(lambda _: rendered, text)
        for token in _END_TOKENS:
            text = text.replace(token, "")
        return text

    return render


def make_think_span_format_reward(start: str, end: str, latent: str):
    """1.0 if the completion is <think>..</think>, then one or more latent spans each followed by
    <think>..</think>, then <answer>..</answer> (HyLaR's strict format; at least one span), after
    `make_span_renderer` and `squeeze_tag_whitespace`; else 0.0."""
    render = make_span_renderer(start, end, latent)
    span = re.escape(squeeze_tag_whitespace(start + span_placeholder(latent) + end))
    pattern = re.compile(rf"\s*<think>.*?</think>(?:\s*{span}\s*<think>.*?</think>)+"
                         r"\s*<answer>.*?</answer>\s*", re.DOTALL)

    def think_span_format_reward(completion: str, reference: str) -> float:
        return 1.0 if pattern.fullmatch(squeeze_tag_whitespace(render(completion))) else 0.0

    return think_span_format_reward
