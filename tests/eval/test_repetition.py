"""HyLaR's repetition score: 4-gram rate, repeated-block coverage, repeated-line rate."""

import pytest

from megatron_latent.eval.repetition import (line_repetition, repeated_block_coverage,
                                             repetition_score)

BLOCK = [f"t{i}" for i in range(25)]  # 25 distinct tokens
FILLER = [f"u{i}" for i in range(100)]


def test_ngram_rate_hand_worked():
    # 8 tokens -> 5 4-grams: abcd bcda cdab dabc abcd; 4 distinct -> 1 - 4/5 = 0.2.
    # Under 100 tokens: no block check; one line: no line rate.
    assert repetition_score("a b c d a b c d") == pytest.approx(0.2)


def test_special_tokens_and_tags_are_removed():
    # "w<|im_end|>x" splits into "w", "x": the same 8 tokens as above -> 0.2. Kept as one token,
    # the 7 tokens would have 4 distinct 4-grams out of 4 -> 0.
    assert repetition_score("x y z w<|im_end|>x y z w") == pytest.approx(0.2)
    # Tags are not words: "<think>a b</think><|canvas|><answer>c d e</answer>" is 5 tokens.
    assert repetition_score("<think>a b</think><|canvas|><answer>c d e</answer>") == 0.0


def test_short_text_scores_zero():
    assert repetition_score("a a a a") == 0.0  # 4 tokens < 4 + 1


def test_line_rate_hand_worked():
    # Lines longer than 10 characters: "first line here" twice, "second line!!" ("short" is
    # dropped) -> 3 lines, 2 distinct -> 1/3. Its 9 tokens have 6 distinct 4-grams of 6 -> 0.
    text = "first line here\nfirst line here\nsecond line!!\nshort"
    assert repetition_score(text) == pytest.approx(1 / 3)


def test_line_length_boundary():
    # "ab cd efghi" has 11 characters: 3 equal lines -> 1 - 1/3 = 2/3. Their 9 tokens repeat
    # with period 3: 3 distinct 4-grams of 6 -> 0.5. Max: 2/3.
    assert repetition_score("ab cd efghi\n" * 3) == pytest.approx(2 / 3)
    # "ab cd efgh" has 10: the lines do not count, only the 4-gram rate 0.5 is left.
    assert repetition_score("ab cd efgh\n" * 3) == pytest.approx(0.5)
    assert line_repetition("one line is long\none line is long") == 0.0  # needs > 2 lines


def test_block_coverage_hand_worked():
    # 25-token block twice then 50 distinct tokens (100 tokens): the 50-token windows never
    # repeat; the 25-token ones at 0 and 25 do -> 2 * 25 / 100 = 0.5.
    # 4-grams: 97, of which those starting at 25..46 repeat those at 0..21 -> 1 - 75/97.
    tokens = BLOCK * 2 + FILLER[:50]
    assert repeated_block_coverage(tokens, 50) == 0.5
    assert repetition_score(" ".join(tokens)) == 0.5
    # Three copies + 25 fillers: a run of 3 blocks -> 0.75 (4-gram rate 1 - 50/97 = 0.485).
    assert repetition_score(" ".join(BLOCK * 3 + FILLER[:25])) == 0.75
    # A 50-token block twice covers everything.
    assert repeated_block_coverage(BLOCK * 2 + BLOCK * 2, 50) == 1.0


def test_block_check_needs_twice_the_window():
    # 99 tokens: under 2 * 50, so no block check even for the 25-token windows.
    assert repeated_block_coverage(BLOCK * 2 + FILLER[:49], 50) == 0.0


def test_heavy_repetition_and_normal_text():
    looping = "<think>" + "I need to look at the image again. " * 30 + "</think><answer>3</answer>"
    assert repetition_score(looping) > 0.5
    normal = ("<think>The image shows a red car parked next to a tree; the license plate is "
              "partly hidden, but two digits are visible.</think>\n<answer>red</answer>")
    assert repetition_score(normal) < 0.5
    assert repetition_score(normal) == 0.0
