"""Local VQA benchmark files: one JSON object per line.

Fields: `image` (str) or `images` (list of str), paths relative to `image_root` (default: the
JSONL's folder; absolute or `..` paths that leave it are refused unless `allow_outside_root`);
`question` (str); `choices` (optional, >= 2 str); `answer` (str: free-form
text, or with choices an option letter or the text of one choice); `id` (optional, str or int;
default: the line number). Other fields are ignored, so benchmark metadata may stay in the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_latent.data.images import leaves_folder
from megatron_latent.eval.answers import MAX_CHOICES, choice_letter, reference_letter
from megatron_latent.fsutil import write_text_atomic

CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


class VqaDataError(ValueError):
    """A bad VQA record; the message names the file, the 1-based line and the field."""

    def __init__(self, file, line: int, field: str | None, message: str):
        self.file, self.line, self.field = str(file), line, field
        what = f" field {field!r}" if field else ""
        super().__init__(f"{file} line {line}{what}: {message}")


@dataclass
class VqaItem:
    id: str
    images: list[Path]
    question: str
    choices: list[str] | None
    answer: str
    line: int


def _nonempty_str(value, file, line: int, field: str) -> str:
    if not isinstance(value, str):
        raise VqaDataError(file, line, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise VqaDataError(file, line, field, "is empty")
    return value


def _images(obj: dict, file, line: int, root: Path, allow_outside: bool) -> list[Path]:
    if "image" in obj and "images" in obj:
        raise VqaDataError(file, line, "image", "give either 'image' or 'images', not both")
    if "image" in obj:
        named = [("image", _nonempty_str(obj["image"], file, line, "image"))]
    elif "images" in obj:
        images = obj["images"]
        if not isinstance(images, list) or not images:
            raise VqaDataError(file, line, "images", "expected a non-empty list of paths")
        named = [(f"images[{i}]", _nonempty_str(p, file, line, f"images[{i}]"))
                 for i, p in enumerate(images)]
    else:
        raise VqaDataError(file, line, "image", "missing: give 'image' (str) or 'images' (list)")
    paths = []
    for field, rel in named:
        if not allow_outside and leaves_folder(rel, root):
            raise VqaDataError(file, line, field, f"{rel!r} leaves the image root {root} "
                               "(absolute or '..' path); pass --allow-images-outside-folder")
        path = root / rel  # an absolute `rel` replaces `root`
        if not path.exists():
            raise VqaDataError(file, line, field, f"file not found: {path}")
        if not path.is_file():  # a FIFO would block the image loader for ever
            raise VqaDataError(file, line, field, f"not a regular file: {path}")
        paths.append(path)
    return paths


def _choices(obj: dict, file, line: int) -> list[str] | None:
    if obj.get("choices") is None:
        return None
    choices = obj["choices"]
    if not isinstance(choices, list):
        raise VqaDataError(file, line, "choices", f"expected a list, got {type(choices).__name__}")
    if not 2 <= len(choices) <= MAX_CHOICES:
        raise VqaDataError(file, line, "choices",
                           f"has {len(choices)} entries; need 2..{MAX_CHOICES}")
    return [_nonempty_str(c, file, line, f"choices[{i}]") for i, c in enumerate(choices)]


def _record(obj, file, line: int, root: Path, allow_outside: bool = False) -> VqaItem:
    if not isinstance(obj, dict):
        raise VqaDataError(file, line, None, f"expected a JSON object, got {type(obj).__name__}")
    for field in ("question", "answer"):
        if field not in obj:
            raise VqaDataError(file, line, field, "missing")
    question = _nonempty_str(obj["question"], file, line, "question").strip()
    answer = _nonempty_str(obj["answer"], file, line, "answer").strip()
    choices = _choices(obj, file, line)
    if choices and reference_letter(answer, choices) is None:
        last = choice_letter(len(choices) - 1)
        raise VqaDataError(file, line, "answer", f"{answer!r} is neither a letter within "
                           f"A..{last} nor the text of one choice")
    rid = obj.get("id", str(line))
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise VqaDataError(file, line, "id", f"expected a non-empty string or int, got {rid!r}")
    return VqaItem(id=str(rid), images=_images(obj, file, line, root, allow_outside),
                   question=question, choices=choices, answer=answer, line=line)


def read_vqa_jsonl(path: str | Path, image_root: str | Path | None = None, *,
                   allow_outside_root: bool = False) -> list[VqaItem]:
    """All records of `path`, checked; raises VqaDataError at the first bad one. Blank lines
    are skipped but still counted, so line numbers match an editor's."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    items: list[VqaItem] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise VqaDataError(path, line_no, None, f"invalid JSON: {e}") from None
            item = _record(obj, path, line_no, root, allow_outside_root)
            if item.id in seen:
                raise VqaDataError(path, line_no, "id",
                                   f"duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = line_no
            items.append(item)
    return items


def format_question(item: VqaItem) -> str:
    """The prompt text: the question, then for multiple choice "A. ..." lines and the LVR eval
    instruction to answer with the letter."""
    if not item.choices:
        return item.question
    options = [f"{choice_letter(i)}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join([item.question, *options, CHOICE_SUFFIX])


def write_predictions_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per row; written to a temp file beside `path` and renamed over it, so a
    crash never leaves a half-written file."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"{path}: row {i} is a {type(row).__name__}, not a dict")
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
