"""The `\\boxed{}` format reward (DeepLatent's format check) on hand-written completions; each
expected value is read off the string by the rules in `make_boxed_format_reward`'s docstring."""

from __future__ import annotations

import pytest

from megatron_latent.eval.answers import boxed_content, boxed_span, parse_number
from megatron_latent.eval.formats import make_boxed_format_reward

S, E = "<latent>", "</latent>"
BLOCK = S + "<|latent_scale|><|latent_qmod|><|latent_imod|><|latent_pad|><|latent_pad|>" + E

PLAIN = [  # (completion, reward without block tokens)
    ("\\boxed{5}", 1.0),
    ("The area is 12, so \\boxed{12}<|im_end|>", 1.0),
    ("so \\boxed{12} \n <|im_end|>\n", 1.0),
    ("so \\boxed{12}<|endoftext|>", 1.0),
    ("the answer is $\\boxed{\\frac{1}{2}}$", 1.0),  # closing math delimiter
    ("\\[ \\boxed{x^{2}} \\]", 1.0),
    ("\\boxed{\\{1, 2\\}}", 1.0),  # escaped braces balance as braces
    ("first \\boxed{3}, then \\boxed{4}", 1.0),  # an earlier box is fine
    ("\\boxed{{a}{b}}", 1.0),  # nested braces
    ("no box here: 5<|im_end|>", 0.0),  # missing
    ("\\boxed{5", 0.0),  # unbalanced
    ("\\boxed{{5}", 0.0),  # unbalanced nested
    ("\\boxed{5}}", 0.0),  # a stray closing brace after the box
    ("\\boxed{}", 0.0),  # empty
    ("\\boxed{  }<|im_end|>", 0.0),  # whitespace only
    ("\\boxed{5}.", 0.0),  # text after the box, even a full stop
    ("\\boxed{5} because it fits", 0.0),
    ("\\boxed{5}<|im_end|>more", 0.0),
    ("\\boxed{5}<|im_end|><|im_end|>", 0.0),  # one end token at most
    ("\\boxed{a \\boxed{b}}", 0.0),  # a box in the final box: the inner is last, "}" follows
    ("\\boxed{3} and \\boxed{4", 0.0),  # the last box is unbalanced
    ("\\boxed 5", 0.0),  # not a box
    ("", 0.0),
]


@pytest.mark.parametrize("text,want", PLAIN)
def test_boxed_without_blocks(text, want):
    assert make_boxed_format_reward()(text, "ignored") == want


BLOCKS = [  # (completion, reward with <latent> ... </latent> blocks)
    ("\\boxed{7}", 1.0),  # no block at all is a valid format
    (f"Look left. {BLOCK} Now right. {BLOCK}\nSo \\boxed{{7}}<|im_end|>", 1.0),
    (f"{BLOCK}{BLOCK}\\boxed{{7}}", 1.0),
    (f"Look. {S}<|latent_pad|> so \\boxed{{7}}", 0.0),  # an unclosed block
    (f"{BLOCK} {S} \\boxed{{7}}", 0.0),  # the last block unclosed
    (f"{S}{S}<|latent_pad|>{E}{E} \\boxed{{7}}", 0.0),  # nested blocks
    (f"{E} {BLOCK} \\boxed{{7}}", 0.0),  # a closer without an opener
    (f"{S}\\boxed{{3}}{E} \\boxed{{7}}", 0.0),  # a box inside a block
    (f"{BLOCK} \\boxed{{7}} {BLOCK}", 0.0),  # a block after the answer
    (f"{BLOCK} \\boxed{{7}}.", 0.0),  # text after the box
]


@pytest.mark.parametrize("text,want", BLOCKS)
def test_boxed_with_latent_blocks(text, want):
    assert make_boxed_format_reward(S, E)(text, "ignored") == want


def test_reference_is_not_read():
    fn = make_boxed_format_reward(S, E)
    assert fn("\\boxed{1}", "\\boxed{2}") == fn("\\boxed{1}", "") == 1.0


@pytest.mark.parametrize("args", [(S, None), (None, E), ("", E), (S, ""), (S, S)])
def test_bad_block_tokens(args):
    with pytest.raises(ValueError, match="block tokens"):
        make_boxed_format_reward(*args)


def test_boxed_span_and_content():
    text = "a \\boxed{b} c \\boxed{x{y}z} d"
    i, j = boxed_span(text)
    assert (text[i:j], text[j]) == ("x{y}z", "}")
    assert boxed_content(text) == "x{y}z"
    assert boxed_span("\\boxed{open") is None and boxed_content("none") is None
    assert parse_number("so \\boxed{\\frac{1}{2}}") == 0.5  # parse_number still reads boxes
