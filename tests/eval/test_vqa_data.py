"""Local VQA JSONL reader: good records, and one error per kind of bad record."""

import json
import os
import re

import pytest
from PIL import Image

from megatron_latent.eval.vqa_data import (CHOICE_SUFFIX, VqaDataError, VqaItem, format_question,
                                           read_vqa_jsonl, write_predictions_jsonl)


@pytest.fixture
def root(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / name)
    return tmp_path


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_reads_records(root):
    path = write_jsonl(root / "data.jsonl", [
        {"id": "q1", "image": "a.png", "question": " What colour? ", "answer": "red"},
        "",  # blank lines are skipped but counted
        {"images": ["a.png", "b.png"], "question": "Which?", "choices": ["left", "right"],
         "answer": "B", "category": "ignored"},
        {"id": 7, "image": str(root / "b.png"), "question": "Q", "choices": ["x", "y"],
         "answer": "y"},
    ])
    items = read_vqa_jsonl(path)
    assert items == [
        VqaItem(id="q1", images=[root / "a.png"], question="What colour?", choices=None,
                answer="red", line=1),
        VqaItem(id="3", images=[root / "a.png", root / "b.png"], question="Which?",
                choices=["left", "right"], answer="B", line=3),
        VqaItem(id="7", images=[root / "b.png"], question="Q", choices=["x", "y"], answer="y",
                line=4),
    ]


def test_image_root(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("jsonl")
    path = write_jsonl(other / "data.jsonl", [{"image": "a.png", "question": "Q", "answer": "x"}])
    assert read_vqa_jsonl(path, image_root=root)[0].images == [root / "a.png"]
    with pytest.raises(VqaDataError, match="line 1 field 'image': file not found"):
        read_vqa_jsonl(path)  # default root: the JSONL's own folder


GOOD = {"image": "a.png", "question": "Q", "answer": "x"}


@pytest.mark.parametrize("record, field, message", [
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ({"image": "a.png", "answer": "x"}, "question", "missing"),
    ({**GOOD, "question": "  "}, "question", "is empty"),
    ({**GOOD, "question": 3}, "question", "expected a string, got int"),
    ({"image": "a.png", "question": "Q"}, "answer", "missing"),
    ({**GOOD, "answer": ["x"]}, "answer", "expected a string, got list"),
    ({"question": "Q", "answer": "x"}, "image", "missing"),
    ({**GOOD, "images": ["a.png"]}, "image", "not both"),
    ({"images": [], "question": "Q", "answer": "x"}, "images", "non-empty list"),
    ({"images": ["a.png", 5], "question": "Q", "answer": "x"}, "images[1]", "expected a string"),
    ({"images": ["a.png", "missing.png"], "question": "Q", "answer": "x"}, "images[1]",
     "file not found: .*missing.png"),
    ({**GOOD, "choices": "x,y"}, "choices", "expected a list, got str"),
    ({**GOOD, "choices": ["x"]}, "choices", "has 1 entries; need 2..26"),
    ({**GOOD, "choices": ["x", ""]}, "choices[1]", "is empty"),
    ({**GOOD, "choices": ["x", "y"], "answer": "C"}, "answer", "neither a letter within A..B"),
    ({**GOOD, "choices": ["x", "y"], "answer": "z"}, "answer", "nor the text of one choice"),
    ({**GOOD, "id": ""}, "id", "non-empty string or int"),
    ({**GOOD, "id": 1.5}, "id", "non-empty string or int"),
])
def test_errors_name_file_line_field(root, record, field, message):
    path = write_jsonl(root / "data.jsonl", [GOOD, "", record])  # the bad record is on line 3
    where = "line 3" + (f" field '{field}'" if field else "")
    pattern = re.escape(f"data.jsonl {where}: ") + f".*{message}"
    with pytest.raises(VqaDataError, match=pattern) as info:
        read_vqa_jsonl(path)
    assert (info.value.line, info.value.field) == (3, field)


def test_duplicate_id(root):
    path = write_jsonl(root / "data.jsonl", [{**GOOD, "id": "2"}, GOOD])  # line 2 defaults to "2"
    with pytest.raises(VqaDataError, match="line 2 field 'id': duplicate id '2' .first on line 1"):
        read_vqa_jsonl(path)


def test_format_question():
    item = VqaItem(id="1", images=[], question="Where is the cup?", choices=["left", "right"],
                   answer="A", line=1)
    assert format_question(item) == ("Where is the cup?\nA. left\nB. right\n"
                                     "Answer with the option's letter from the given choices "
                                     "directly.")
    assert CHOICE_SUFFIX in format_question(item)
    item.choices = None
    assert format_question(item) == "Where is the cup?"


def test_write_predictions_jsonl(tmp_path):
    out = tmp_path / "sub" / "preds.jsonl"
    write_predictions_jsonl(out, [{"id": "1", "pred": "é"}, {"id": "2", "pred": None}])
    expected = '{"id": "1", "pred": "é"}\n{"id": "2", "pred": null}\n'
    assert out.read_text(encoding="utf-8") == expected
    write_predictions_jsonl(out, [{"id": "3"}])  # replaces the previous file
    assert out.read_text() == '{"id": "3"}\n'
    with pytest.raises(TypeError, match="row 1 is a list"):
        write_predictions_jsonl(out, [{"id": "4"}, ["bad"]])
    assert out.read_text() == '{"id": "3"}\n'  # the old content survives a failed write
    assert os.listdir(out.parent) == ["preds.jsonl"]  # no temp file left behind
