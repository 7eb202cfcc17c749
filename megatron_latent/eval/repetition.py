"""Repetition score of a generated text (HyLaR's degenerate-output detector, used to set the
accuracy reward to -1).

The score in [0, 1] is the largest of three rates:
1. 4-gram repetition: 1 - distinct 4-grams / all 4-grams, over whitespace tokens;
2. repeated blocks: the share of tokens covered by the longest run of identical consecutive
   windows of 50 (then 25) tokens, checked only when the text has at least 100 tokens;
3. repeated lines: 1 - distinct lines / lines, over the stripped lines longer than 10 characters,
   when there are more than 2 of them.
Rates 1 and 2 see the text without `<|...|>` tokens and without <think>/<answer> tags; rate 3
sees the raw lines (tags included), as in HyLaR. A text of fewer than 5 tokens scores 0.
"""

from __future__ import annotations

import re

_SPECIAL_TOKEN = re.compile(r"<\|.*?\|>")  # no DOTALL (HyLaR's): a token never spans lines
_TAG = re.compile(r"</?(?:think|answer)>")
_MIN_LINE_CHARS = 10


def _tokens(text: str) -> list[str]:
    return _TAG.sub(" ", _SPECIAL_TOKEN.sub(" ", text)).split()


def ngram_repetition(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_block_coverage(tokens: list[str], window: int) -> float:
    """Largest share of the tokens covered by k >= 2 identical consecutive blocks of `window`
    (or `window // 2`) tokens. Both sizes are tried only when there are >= 2 * window tokens."""
    n, best = len(tokens), 0.0
    if n < 2 * window:
        return 0.0
    for size in (window, window // 2):
        if size < 5:
            continue
        for i in range(n - 2 * size + 1):
            block = tokens[i:i + size]
            if tokens[i + size:i + 2 * size] != block:
                continue
            count, pos = 2, i + 2 * size
            while pos + size <= n and tokens[pos:pos + size] == block:
                count, pos = count + 1, pos + size
            best = max(best, count * size / n)
    return best


def line_repetition(text: str) -> float:
    lines = [s for s in (line.strip() for line in text.split("\n")) if len(s) > _MIN_LINE_CHARS]
    return 1.0 - len(set(lines)) / len(lines) if len(lines) > 2 else 0.0


def repetition_score(text: str, ngram_size: int = 4, window_size: int = 50) -> float:
    """max(n-gram repetition, repeated-block coverage, line repetition), capped at 1."""
    tokens = _tokens(text)
    if len(tokens) < ngram_size + 1:
        return 0.0
    return min(1.0, max(ngram_repetition(tokens, ngram_size),
                        repeated_block_coverage(tokens, window_size), line_repetition(text)))
