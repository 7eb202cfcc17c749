"""The synthetic visual-search dataset: layout, formats, boxes checked against pixels, determinism,
atomic writing and the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_latent.data import synthetic_lvr as syn

NUM, VAL_NUM = 12, 4
REPO = Path(__file__).resolve().parents[2]


def _make(out, seed=0, **kw):
    return syn.make_synthetic_lvr(out, num=NUM, val_num=VAL_NUM, seed=seed, progress=False, **kw)


def _load(d: Path, name: str):
    return json.loads((d / name).read_text())


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("syn") / "ds")


def _target(record) -> tuple[str, str]:
    """(colour, shape) that the record's question and answer say the target has."""
    kind, named = syn.parse_question(record["conversations"][0]["value"])
    answer = re.fullmatch(r"(?:<lvr>\n)?<answer>(\w+)</answer>", record["conversations"][1]["value"]).group(1)
    return (answer, named) if kind == "colour" else (named, answer)


def _pixel_box(box, w, h):
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(box, (w, h, w, h)))
    return x0, y0, x1, y1


def test_layout_and_counts(ds):
    names = sorted(p.name for p in ds.iterdir())
    assert names == ["images", "meta.json", "meta_rl.json", "meta_val.json", "meta_val_rl.json",
                     "train.json", "train_rl.json", "val.json", "val_rl.json"]
    pngs = sorted(p.name for p in (ds / "images").iterdir())
    assert len(pngs) == NUM + VAL_NUM and all(n.endswith(".png") for n in pngs)
    for split, n in (("train", NUM), ("val", VAL_NUM)):
        assert len(_load(ds, f"{split}.json")) == n and len(_load(ds, f"{split}_rl.json")) == n
    meta = _load(ds, "meta.json")
    assert meta == [{"data_path": "train.json", "image_folder": "images", "ds_name": "synthetic_vsearch"}]
    # relative paths in a meta file resolve against the meta file's directory
    for entry in meta:
        for rec in _load(ds, entry["data_path"]):
            assert (ds / entry["image_folder"] / rec["image"]).is_file()
    assert not [p for p in ds.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("split", ["train", "val"])
def test_stage1_records(ds, split):
    recs = _load(ds, f"{split}.json")
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert set(r) == {"id", "image", "conversations", "bboxes"}
        assert isinstance(r["id"], str) and r["image"].endswith(".png")
        (human, gpt) = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert re.fullmatch(r"<lvr>\n<answer>\w+</answer>", gpt["value"])
        colour, shape = _target(r)
        assert colour in syn.COLOURS and shape in syn.SHAPES
        assert len(r["bboxes"]) == 1
        x0, y0, x1, y1 = box = r["bboxes"][0]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 and round(v, 4) == v for v in box)
        assert x0 < x1 and y0 < y1
        w, h = Image.open(ds / "images" / r["image"]).size
        assert 224 <= w <= 448 and 224 <= h <= 448
        side = (x1 - x0) * w  # target size 6-12% of the shorter side, plus outline and padding
        assert 0.05 * min(w, h) <= side <= 0.12 * min(w, h) + 2 * syn.BOX_PAD + 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_hold_the_drawn_target(ds, split):
    for r in _load(ds, f"{split}.json"):
        a = np.asarray(Image.open(ds / "images" / r["image"]).convert("RGB"))
        h, w = a.shape[:2]
        x0, y0, x1, y1 = _pixel_box(r["bboxes"][0], w, h)
        colour, shape = _target(r)
        # exactly one of the target colours occurs in the image: the drawn one
        present = [c for c, rgb in syn.COLOURS.items() if (a == rgb).all(-1).any()]
        assert present == [colour], (r["id"], present)
        fill = (a == syn.COLOURS[colour]).all(-1)
        inside = fill[y0:y1, x0:x1].sum()
        assert inside == fill.sum(), r["id"]  # none of it outside the box ...
        ring = np.zeros_like(fill)
        ring[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = True
        ring[y0:y1, x0:x1] = False
        assert not fill[ring].any(), r["id"]  # ... in particular not just outside it
        # the fill dominates the box as far as the shape allows (outline and 1 px padding aside)
        min_frac = {"square": 0.5, "circle": 0.4, "triangle": 0.2}[shape]
        assert inside / ((x1 - x0) * (y1 - y0)) >= min_frac, r["id"]
        # and the box is tight: at most padding + outline (+1 for a triangle's slant) around the fill
        ys, xs = np.nonzero(fill)
        slack = (xs.min() - x0, x1 - 1 - xs.max(), ys.min() - y0, y1 - 1 - ys.max())
        assert all(1 <= s <= syn.BOX_PAD + 2 + (shape == "triangle") + 1 for s in slack), (r["id"], slack)
        # the shape agrees with the answer: fill fraction of its own bounding box
        frac = fill[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean()
        drawn = "square" if frac > 0.95 else "circle" if frac > 0.7 else "triangle"
        assert drawn == shape, (r["id"], frac)


@pytest.mark.parametrize("split", ["train", "val"])
def test_stage2_records(ds, split):
    s1, s2 = _load(ds, f"{split}.json"), _load(ds, f"{split}_rl.json")
    for a, b in zip(s1, s2, strict=True):
        assert (b["id"], b["image"], b["bboxes"]) == (a["id"], a["image"], a["bboxes"])
        human, gpt = b["conversations"]
        assert human == {"from": "human", "value": a["conversations"][0]["value"].removeprefix("<image>\n")}
        assert "<image>" not in human["value"] and human["value"].startswith("What ")
        assert re.fullmatch(r"<answer>\w+</answer>", gpt["value"]) and gpt["from"] == "gpt"
        assert _target(a) == _target(b)


def test_answer_vocabulary_is_small(ds):
    answers = {re.search(r"<answer>(\w+)</answer>", r["conversations"][1]["value"]).group(1)
               for split in ("train", "val") for r in _load(ds, f"{split}.json")}
    assert answers <= set(syn.ANSWERS) and len(syn.ANSWERS) == 9


def test_deterministic(ds, tmp_path):
    same = _make(tmp_path / "same", seed=0)
    files = sorted(p.relative_to(ds) for p in ds.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    for f in files:
        assert (ds / f).read_bytes() == (same / f).read_bytes(), f
    other = _make(tmp_path / "other", seed=1)
    assert (other / "train.json").read_bytes() != (ds / "train.json").read_bytes()
    assert all((other / "images" / n).read_bytes() != (ds / "images" / n).read_bytes()
               for n in ("train_000000.png", "val_000000.png"))
    # each record has its own random stream: a smaller num gives a prefix of the same records
    _, rec, _ = syn.make_sample(0, "train", 3)
    assert rec == _load(ds, "train.json")[3]


def test_refuses_existing_dir_and_overwrites(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        _make(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    _make(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "train.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_make(empty) / "meta.json").is_file()  # an empty directory is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    real = syn.make_sample

    def flaky(seed, split, index, *a):
        if index == 3:
            raise RuntimeError("boom")
        return real(seed, split, index, *a)

    monkeypatch.setattr(syn, "make_sample", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        _make(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_synthetic_lvr_cli", REPO / "tools" / "make_synthetic_lvr.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "ds"
    args = ["--out", str(out), "--num", "3", "--val-num", "1", "--seed", "5", "--no-progress"]
    assert cli.main(args) == 0
    assert len(_load(out, "train.json")) == 3 and len(_load(out, "val_rl.json")) == 1
    assert len(list((out / "images").iterdir())) == 4
    assert cli.main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    assert cli.main(["--out", str(tmp_path / "bad"), "--num", "0"]) == 2
