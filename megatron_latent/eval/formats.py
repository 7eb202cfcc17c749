"""Format rewards: does a completion have the shape a latent method trains (its span, then
an <answer>; or DeepLatent's blocks, then a final \\boxed{} answer)?"""

from __future__ import annotations

import re

from megatron_latent.eval.answers import boxed_span


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


# what may follow the final box: the close of the math it sits in ("$\boxed{5}$", "\[..\]"),
# whitespace and one end-of-turn token; nothing else (not even a full stop)
_BOX_TAIL = re.compile(r"\s*(?:\$\$?|\\\]|\\\))?\s*(?:<\|im_end\|>|<\|endoftext\|>)?\s*")


def _blocks_well_formed(text: str, start: str, end: str) -> bool:
    """Every `start` closed by the next `end` (no nesting, no stray `end`, none left open) and
    no `\\boxed` inside a block."""
    marks = sorted({start, end, "\\boxed"}, key=len, reverse=True)  # longest first at a tie
    inside = False
    for m in re.finditer("|".join(map(re.escape, marks)), text):
        if m.group() == start:
            if inside:
                return False
            inside = True
        elif m.group() == end:
            if not inside:
                return False
            inside = False
        elif inside:  # a box inside a latent block
            return False
    return not inside


def make_boxed_format_reward(start: str | None = None, end: str | None = None):
    """DeepLatent's format check (spec 2.9: "the format reward checks \\boxed{}"): 1.0 if the
    completion ends with its final answer in a `\\boxed{...}`, else 0.0.

    * The final box is the last `\\boxed{`; its braces must balance (nested braces allowed,
      escaped ones count as braces, as in `eval.answers.boxed_span`) and hold more than
      whitespace. Earlier boxes are allowed; a box inside the final one is not (the inner one is
      then the last, and the outer's closing brace follows it).
    * After it only whitespace, one end-of-turn token (`<|im_end|>` / `<|endoftext|>`) and the
      close of the math it sits in (`$`, `$$`, `\\]`, `\\)`) may follow: "$\\boxed{5}$" passes,
      "\\boxed{5}." fails.
    * With `start`/`end` (the latent block's opener and closer, e.g. "<latent>", "</latent>"):
      every opener is closed by the next closer, blocks do not nest, no closer is unmatched and
      no `\\boxed` appears inside a block. Zero blocks is a valid format (text-only reasoning).
    The reference is not read."""
    if (start is None) != (end is None):
        raise ValueError(f"boxed format reward: give both block tokens or neither, got "
                         f"{start!r}, {end!r}")
    if start is not None and (not start or not end or start == end):
        raise ValueError(f"boxed format reward: block tokens must be non-empty and differ, got "
                         f"{start!r}, {end!r}")

    def boxed_format_reward(completion: str, reference: str) -> float:
        span = boxed_span(completion)
        if span is None or not completion[span[0]:span[1]].strip():
            return 0.0
        if not _BOX_TAIL.fullmatch(completion, span[1] + 1):
            return 0.0
        if start is not None and not _blocks_well_formed(completion, start, end):
            return 0.0
        return 1.0

    return boxed_format_reward
