"""Answer extraction and matching for free-form and multiple-choice VQA.

Free-form: the prediction is the last `<answer>...</answer>` span (else the whole output), matched
to the reference by SQuAD-style normalised text or, when both are numbers, by value.
Multiple choice (V* / MMVP): the output is reduced to an option letter, see `parse_choice`.
"""

from __future__ import annotations

import math
import re
import string

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_CHOICES = len(string.ascii_uppercase)

# Stripped from both ends only. Not +, -, %, $: "-3" must not normalise to "3" (the text
# comparison runs before the numeric one).
_EDGE_PUNCT = ".,;:!?'\"`*()[]{}<>\u201c\u201d\u2018\u2019"
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(_NUM)
_FRACTION = re.compile(rf"({_NUM})\s*/\s*({_NUM})")
_LATEX_FRAC = re.compile(rf"([+-]?)\\[dt]?frac\{{\s*({_NUM})\s*\}}\{{\s*({_NUM})\s*\}}")


def extract_answer(text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>` pair, stripped; None if there is none.
    Searching back from the last close tag means "<answer>a <answer>b</answer>" gives "b"."""
    close = text.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = text.rfind(ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(ANSWER_OPEN):close].strip()


def normalize_text(s: str) -> str:
    """Lowercase, strip edge punctuation/quotes, drop articles, collapse whitespace. Articles are
    kept when nothing else is left, so the answer "A" does not normalise to ""."""
    s = " ".join(str(s).lower().split()).strip(_EDGE_PUNCT + " ")
    without = " ".join(_ARTICLES.sub(" ", s).split())
    return without if without else s


def boxed_span(s: str) -> tuple[int, int] | None:
    """(start, end) of the contents of the last `\\boxed{...}` (`s[start:end]`, the closing brace
    at `end`), with nested braces; None if absent or unbalanced. Escaped braces count too."""
    start = s.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return i, j
    return None


def boxed_content(s: str) -> str | None:
    """Contents of the last `\\boxed{...}`, with nested braces; None if absent or unbalanced."""
    span = boxed_span(s)
    return None if span is None else s[span[0]:span[1]]


def _to_float(num: str) -> float:
    return float(num.replace(",", ""))


def parse_number(s: str) -> float | None:
    """A number written as int/decimal ("1,234", "-0.5", "1e3"), percentage ("50%" -> 50.0),
    fraction ("3/4", "\\frac{3}{4}") or inside `\\boxed{}` / `$...$`; None otherwise."""
    s = str(s).strip()
    boxed = boxed_content(s)
    if boxed is not None:
        s = boxed.strip()
    s = s.strip("$ ").rstrip(".").strip().replace("\\%", "%")
    try:
        if m := _LATEX_FRAC.fullmatch(s):
            sign, num, den = m.groups()
            value = _to_float(num) / _to_float(den) * (-1.0 if sign == "-" else 1.0)
        elif m := _FRACTION.fullmatch(s):
            value = _to_float(m.group(1)) / _to_float(m.group(2))
        elif s.endswith("%") and _NUM_RE.fullmatch(s[:-1].strip()):
            value = _to_float(s[:-1].strip())
        elif _NUM_RE.fullmatch(s):
            value = _to_float(s)
        else:
            return None
    except (ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def answers_match(pred: str, ref: str) -> bool:
    """Normalised text equal, or both numbers equal within rel 1e-6 / abs 1e-9."""
    if normalize_text(pred) == normalize_text(ref):
        return True
    p, r = parse_number(pred), parse_number(ref)
    return p is not None and r is not None and math.isclose(p, r, rel_tol=1e-6, abs_tol=1e-9)


def choice_letter(index: int) -> str:
    if not 0 <= index < MAX_CHOICES:
        raise ValueError(f"choice index {index} is outside 0..{MAX_CHOICES - 1}")
    return string.ascii_uppercase[index]


# Whole text is an option marker: "A", "(A)", "A.", "A)", "A:", "[A]". Uppercase only: a lone
# lowercase "a" is more likely the article than an option.
_EXACT = re.compile(r"[(\[]?([A-Z])[)\]]?[.:)]?")
# "(b) ..." at the start: parentheses make the letter a marker in either case.
_PAREN_START = re.compile(r"[(\[]([A-Za-z])[)\]]")
# "The answer is B", "Option C", "answer: (b)"; the keyword in any case. The letter is `mark`
# (parenthesised, any case), `upper` (uppercase, then a non-letter) or `lower` (lowercase, then
# end or punctuation, so that "the answer is a dog" is not read as "A").
_PHRASE = re.compile(
    r"(?i:\b(?:answer|option|choice)(?:\s+is)?)\s*[:\-]?\s*"
    r"(?:[(\[](?P<mark>[A-Za-z])[)\]]|(?P<upper>[A-Z])(?![A-Za-z])|(?P<lower>[a-z])(?=$|[.,:;)!]))")
# LVR eval convention: the first character when a non-letter follows. Lowercase only before
# marker punctuation ("a) dog"), not before a space ("a dog").
_LEADING = re.compile(r"([A-Z])(?![A-Za-z])|([a-z])(?=[.:)])")


def _phrase_letter(s: str) -> str | None:
    found = None
    for m in _PHRASE.finditer(s):
        found = m.group("mark") or m.group("upper") or m.group("lower")
    return found  # the last statement of the answer wins


def parse_choice(text: str, n_choices: int) -> str | None:
    """Option letter ("A".."Z") from a model output, or None. Looks inside the last <answer>
    span if any; tries, in order, an exact marker, a leading "(x)", an "answer is X" / "option X"
    phrase (the last one wins) and the leading letter (LVR convention). Letters past `n_choices`
    are skipped."""
    if not 1 <= n_choices <= MAX_CHOICES:
        raise ValueError(f"n_choices={n_choices} is outside 1..{MAX_CHOICES}")
    inner = extract_answer(text)
    s = (text if inner is None else inner).strip()
    valid = string.ascii_uppercase[:n_choices]
    candidates = []
    if m := _EXACT.fullmatch(s):
        candidates.append(m.group(1))
    if m := _PAREN_START.match(s):
        candidates.append(m.group(1))
    candidates.append(_phrase_letter(s))
    if m := _LEADING.match(s):
        candidates.append(m.group(1) or m.group(2))
    for c in candidates:
        if c and c.upper() in valid:
            return c.upper()
    return None


def match_choice_by_text(text: str, choices: list[str]) -> str | None:
    """The letter of the one choice whose normalised text equals the output's (inside <answer>
    if present); None if none or several match."""
    inner = extract_answer(text)
    s = normalize_text(text if inner is None else inner)
    if not s:
        return None
    hits = [i for i, c in enumerate(choices) if normalize_text(c) == s]
    return choice_letter(hits[0]) if len(hits) == 1 else None


_REF_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?\.?")


def reference_letter(answer: str, choices: list[str]) -> str | None:
    """The letter a reference answer names: a letter ("A", "(a)") within range, else the text of
    exactly one choice; None if neither (the data is then inconsistent)."""
    if m := _REF_LETTER.fullmatch(answer.strip()):
        letter = m.group(1).upper()
        if letter in string.ascii_uppercase[:len(choices)]:
            return letter
    return match_choice_by_text(answer, choices)


def score_prediction(output_text: str, answer: str,
                     choices: list[str] | None) -> tuple[str | None, bool]:
    """(prediction, correct). With choices the prediction is a letter; without, the answer text."""
    if choices:
        ref = reference_letter(answer, choices)
        if ref is None:
            raise ValueError(f"reference answer {answer!r} is neither a letter within "
                             f"A..{choice_letter(len(choices) - 1)} nor the text of one choice "
                             f"of {choices!r}")
        pred = parse_choice(output_text, len(choices)) or match_choice_by_text(output_text, choices)
        return pred, pred == ref
    inner = extract_answer(output_text)
    pred = (output_text if inner is None else inner).strip()
    return pred, answers_match(pred, answer)
