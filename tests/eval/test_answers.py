"""Answer extraction, normalisation, number parsing and multiple-choice parsing."""

import pytest

from megatron_latent.eval.answers import (answers_match, choice_letter, extract_answer,
                                          match_choice_by_text, normalize_text, parse_choice,
                                          parse_number, score_prediction)


@pytest.mark.parametrize("text, expected", [
    ("<answer> cat </answer>", "cat"),
    ("<answer>a</answer> then <answer>\nb\n</answer>", "b"),  # the last pair
    ("<answer>a <answer>b</answer>", "b"),  # the last open tag before the last close tag
    ("<answer>a</answer><answer>b", "a"),  # the trailing pair is incomplete
    ("<answer></answer>", ""),
    ("no tags", None),
    ("<answer>unclosed", None),
    ("</answer> <answer>", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("  The  Red\tCar. ", "red car"),
    ('"An apple"', "apple"),
    ("(A)", "a"),
    ("A", "a"),  # only an article: kept, so it does not become ""
    ("the cat and a dog!", "cat and dog"),
    ("theory", "theory"),  # articles are whole words only
    ("-3", "-3"),  # a sign is not edge punctuation
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("42", 42.0), ("-0.5", -0.5), ("+7", 7.0), (".25", 0.25), ("1,234", 1234.0),
    ("1,234,567.5", 1234567.5), ("50%", 50.0), ("12.5 \\%", 12.5), ("3/4", 0.75), ("-3/4", -0.75),
    ("\\frac{3}{4}", 0.75), ("-\\dfrac{1}{8}", -0.125), ("\\boxed{12}", 12.0),
    ("so \\boxed{\\frac{1}{2}}", 0.5), ("$5$", 5.0), ("5.", 5.0), ("1e3", 1000.0),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1,23", "1/0", "nan", "inf", "1e999", "3 apples",
                                  "\\boxed{x}", "1.2.3", "--1"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("pred, ref, expected", [
    ("The Cat.", "cat", True),
    ("1,000", "1000", True),
    ("0.75", "\\frac{3}{4}", True),
    ("1.0000001", "1", True),  # within rel 1e-6
    ("1.00001", "1", False),
    ("1e-10", "0", True),  # within abs 1e-9
    ("-3", "3", False),
    ("50%", "50", True),  # the percent sign is dropped, not divided by 100
    ("dog", "cat", False),
])
def test_answers_match(pred, ref, expected):
    assert answers_match(pred, ref) is expected


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("(B)", "B"), ("C.", "C"), ("D)", "D"), ("A:", "A"), ("[C]", "C"),
    ("Option B", "B"), ("The answer is C.", "C"), ("answer: (b)", "B"), ("Answer: d", "D"),
    ("The correct answer is (c) the red car", "C"), ("(a) a dog", "A"),
    ("Looking closely, the answer is B", "B"),
    ("B. The red car", "B"), ("C) blue", "C"), ("d) green", "D"),  # leading letter (LVR)
    ("<answer> (C) </answer>", "C"), ("I see a car. <answer>D</answer>", "D"),
    # None: out of range, ambiguous lowercase, or no marker at all
    ("E", None), ("The answer is E", None), ("a", None), ("a dog", None),
    ("The answer is a dog", None), ("I think so", None), ("Apple", None), ("", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, 4) == expected


def test_parse_choice_rejects_bad_count():
    with pytest.raises(ValueError, match="n_choices=0"):
        parse_choice("A", 0)
    with pytest.raises(ValueError, match="n_choices=27"):
        parse_choice("A", 27)


def test_choice_letter():
    assert [choice_letter(i) for i in (0, 1, 25)] == ["A", "B", "Z"]
    with pytest.raises(ValueError, match="choice index 26"):
        choice_letter(26)


def test_match_choice_by_text():
    choices = ["red car", "blue car", "the green car"]
    assert match_choice_by_text("Blue car.", choices) == "B"
    assert match_choice_by_text("<answer>green car</answer>", choices) == "C"
    assert match_choice_by_text("car", choices) is None
    assert match_choice_by_text("red", ["red", "Red."]) is None  # ambiguous


def test_score_prediction_multiple_choice():
    choices = ["left", "right"]
    assert score_prediction("<answer>B</answer>", "B", choices) == ("B", True)
    assert score_prediction("(b)", "(B)", choices) == ("B", True)
    assert score_prediction("A. left", "right", choices) == ("A", False)  # reference as text
    assert score_prediction("Right.", "B", choices) == ("B", True)  # prediction by text
    assert score_prediction("maybe", "A", choices) == (None, False)
    with pytest.raises(ValueError, match="reference answer 'C'"):
        score_prediction("A", "C", choices)


def test_score_prediction_free_form():
    assert score_prediction("It is <answer>1,024</answer>", "1024", None) == ("1,024", True)
    assert score_prediction("  The cat ", "cat", None) == ("The cat", True)
    assert score_prediction("<answer>dog</answer>", "cat", None) == ("dog", False)
