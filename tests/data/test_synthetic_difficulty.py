"""synthetic_lvr's difficulty knob, checked against the pixels: a smaller target, distractors that
share the attribute the question names but not the answer, larger than the target, apart from
every other object; level 0 unchanged (its records and pixels are test_synthetic_lvr.py's)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_latent.data import synthetic_lvr as syn


def _px(box, w, h):
    return tuple(round(v * s) for v, s in zip(box, (w, h, w, h)))


def _component(a: np.ndarray, colour: str, box, w, h) -> np.ndarray:
    x0, y0, x1, y1 = _px(box, w, h)
    return (a[y0:y1, x0:x1] == syn.COLOURS[colour]).all(-1)


def _shape_of(fill: np.ndarray) -> str:
    ys, xs = np.nonzero(fill)
    frac = fill[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean()
    return "square" if frac > 0.95 else "circle" if frac > 0.7 else "triangle"


@pytest.mark.parametrize("difficulty", [1, 2])
def test_distractors_share_the_named_attribute_not_the_answer(difficulty):
    frac, n_max = syn.LEVELS[difficulty]
    seen = 0
    for i in range(12):
        img, rec, facts = syn.make_sample(0, "val", i, difficulty=difficulty)
        a = np.asarray(img)
        h, w = a.shape[:2]
        kind, named = syn.parse_question(rec["conversations"][0]["value"])
        answer = facts["answer"]
        assert answer == (facts["colour"] if kind == "colour" else facts["shape"])
        box = rec["bboxes"][0]
        side = (box[2] - box[0]) * w
        assert side <= max(8, frac[1] * min(w, h)) + 2 * syn.BOX_PAD + 1  # smaller than level 0
        fill = _component(a, facts["colour"], box, w, h)
        assert fill.sum() > 0 and _shape_of(fill) == facts["shape"]
        boxes = [_px(box, w, h)]
        assert len(facts["distractors"]) <= n_max
        for d in facts["distractors"]:
            seen += 1
            # it matches what the question names, and would give a wrong answer
            if kind == "colour":
                assert d["shape"] == named and d["colour"] != answer
            else:
                assert d["colour"] == named and d["shape"] != answer
            dfill = _component(a, d["colour"], d["box"], w, h)
            assert _shape_of(dfill) == d["shape"]
            assert (d["box"][2] - d["box"][0]) * w >= 1.8 * side  # "small" picks the target
            boxes.append(_px(d["box"], w, h))
        for j, (ax0, ay0, ax1, ay1) in enumerate(boxes):  # no two objects touch
            for bx0, by0, bx1, by1 in boxes[j + 1:]:
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
    assert seen >= 12 * n_max * 0.8  # placement rarely gives up


def test_difficulty_through_the_writer_and_level_zero_unchanged(tmp_path):
    out = syn.make_synthetic_lvr(tmp_path / "hard", num=2, val_num=1, seed=3, progress=False,
                                 difficulty=2)
    rec = json.loads((out / "train.json").read_text())[0]
    _, same, facts = syn.make_sample(3, "train", 0, difficulty=2)
    assert rec == same and len(facts["distractors"]) >= 1
    # level 0 is the default, without distractors; the photo and the target's identity are
    # the level's, drawn from the same stream
    _, rec0, facts0 = syn.make_sample(3, "train", 0)
    assert "distractors" not in facts0 and rec0 == syn.make_sample(3, "train", 0, difficulty=0)[1]
    assert (facts0["colour"], facts0["shape"]) == (facts["colour"], facts["shape"])
    with pytest.raises(ValueError, match="difficulty"):
        syn.make_synthetic_lvr(tmp_path / "bad", num=1, progress=False, difficulty=3)


def test_cli_flag(tmp_path):
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic_lvr.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_lvr_cli", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "ds"
    assert cli.main(["--out", str(out), "--num", "1", "--val-num", "0", "--seed", "3",
                     "--difficulty", "2", "--no-progress"]) == 0
    rec = json.loads((out / "train.json").read_text())[0]
    assert rec == syn.make_sample(3, "train", 0, difficulty=2)[1]
