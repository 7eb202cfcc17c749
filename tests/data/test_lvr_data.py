"""LVR stage-1 data pipeline: bbox -> visual tokens, prompt/labels, multi-image indices, collate,
errors, skipping, special tokens and the inspect tool."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_latent.data import (LvrDataError, LvrSftDataset, add_lvr_tokens, bbox_token_indices,
                                  collate, load_hf_processing, make_collate)
from megatron_latent.models.qwen25vl.rope_index import rope_index
from megatron_latent.testing.samples import sample_photo

REPO = Path(__file__).resolve().parents[2]
WORKED_BOX = [0.382, 0.456, 0.718, 0.656]
WORKED_IDX = [ty * 23 + tx for ty in range(7, 12) for tx in range(8, 17)]
SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=1024 * 28 * 28)  # keeps 28-multiple sizes


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("lvr_data")
    ckpt = make_tiny_qwen25vl(root / "ckpt", preset="tiny-a")
    tok, ip, vocab = load_hf_processing(ckpt)
    imgs = root / "images"
    imgs.mkdir()
    sample_photo("astronaut").resize((644, 476)).save(imgs / "astronaut.png")  # grid 34 x 46
    sample_photo("astronaut").resize((224, 168)).save(imgs / "a_small.png")  # grid 12 x 16
    sample_photo("coffee").resize((140, 196)).save(imgs / "coffee.png")  # grid 14 x 10
    sample_photo("chelsea").resize((56, 56)).save(imgs / "cat.png")  # grid 4 x 4
    (imgs / "garbage.png").write_bytes(b"this is not a png")
    return dict(root=root, ckpt=ckpt, tok=tok, ip=ip, vocab=vocab, imgs=imgs)


def write(env, name, obj) -> Path:
    path = env["root"] / name
    path.write_text(json.dumps(obj))
    return path


def make_ds(env, records, name="d.json", **kw):
    kw.setdefault("seq_length", 4096)
    return LvrSftDataset(write(env, name, records), tokenizer=env["tok"], image_processor=env["ip"],
                         vocab_size=env["vocab"], image_folder=env["imgs"], **kw)


def worked_record(prefix="Look here: "):
    return {"image": "astronaut.png",
            "conversations": [{"from": "human", "value": "<image>\nWhere is the flag?"},
                              {"from": "gpt", "value": prefix + "<lvr>\n<answer>left</answer>"}],
            "bboxes": [WORKED_BOX]}


# image 0: a_small (grid 12x16 -> merged 6x8 = 48), image 1: coffee (grid 14x10 -> merged 7x5 = 35)
TWO_IMG_BOXES = [{"image": 1, "bbox": [0.0, 0.0, 0.35, 0.25]},
                 {"image": 0, "bbox": [0.1, 0.2, 0.45, 0.5]},
                 {"image": 1, "bbox": [0.55, 0.6, 1.0, 1.0]}]
# by hand: img1 box A: x [0, 3.5) -> patches 0..3 -> tokens cols 0..1; y [0, 3.5) -> rows 0..1
#   -> local 0,1,5,6 (W2 = 5) -> global 48 + that
# img0 box: x 1.6..7.2 -> patches 1..7 -> cols 0..3; y 2.4..6 -> patches 2..5 -> rows 1..2 (W2 = 8)
# img1 box B: x 5.5..10 -> patches 5..9 -> cols 2..4; y 8.4..14 -> patches 8..13 -> rows 4..6
TWO_IMG_EXPECTED = ([48 + i for i in (0, 1, 5, 6)] + [8, 9, 10, 11, 16, 17, 18, 19]
                    + [48 + r * 5 + c for r in (4, 5, 6) for c in (2, 3, 4)])


def two_image_record():
    return {"image": ["a_small.png", "coffee.png"],
            "conversations": [
                {"from": "human", "value": "Compare <image> with <image>."},
                {"from": "gpt", "value": "First <lvr> then <lvr>."},
                {"from": "human", "value": "And the corner?"},
                {"from": "gpt", "value": "<lvr> done"}],
            "bboxes": TWO_IMG_BOXES}


def mask_indices(bbox, h, w):
    """Independent: merged tokens (2x2 patches) touched by the box's patch cover."""
    covered = np.zeros((h, w), bool)
    x0, y0, x1, y1 = bbox
    covered[int(np.floor(y0 * h)):int(np.ceil(y1 * h)), int(np.floor(x0 * w)):int(np.ceil(x1 * w))] = True
    return np.flatnonzero(covered.reshape(h // 2, 2, w // 2, 2).any(axis=(1, 3))).tolist()


def test_bbox_mapping_worked_example():
    from qwen_vl_utils import smart_resize

    assert smart_resize(476, 644, 28, 128 * 28 * 28, 5120 * 28 * 28) == (476, 644)
    idx = bbox_token_indices(WORKED_BOX, (34, 46))
    assert len(idx) == 45 and idx == WORKED_IDX
    assert idx[0] == 7 * 23 + 8 and idx[-1] == 11 * 23 + 16
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = 2 * rng.integers(1, 20, size=2)
        x0, x1 = np.sort(rng.uniform(0, 1, 2))
        y0, y1 = np.sort(rng.uniform(0, 1, 2))
        assert bbox_token_indices((x0, y0, x1, y1), (h, w)) == mask_indices((x0, y0, x1, y1), h, w)


def test_worked_example_end_to_end(env):
    ds = make_ds(env, [worked_record()])  # default stage-1 min/max pixels keep 644 x 476
    s = ds[0]
    assert s["image_grid_thw"].tolist() == [[1, 34, 46]]
    assert s["pixel_values"].shape == (34 * 46, 1176) and s["pixel_values"].dtype == torch.float32
    assert s["latent_index"].tolist() == WORKED_IDX
    ids, t = s["input_ids"].tolist(), ds.ids
    assert ids.count(t.image_pad) == 17 * 23 and ids.count(t.lvr) == 45
    start = ids.index(t.lvr_start)
    assert ids[start + 1:start + 46] == [t.lvr] * 45 and ids[start + 46] == t.lvr_end
    text = env["tok"].decode(ids)
    assert "<|im_start|>assistant\nLook here: <|lvr_start|>" in text  # text before <lvr> is kept
    ref = env["ip"](images=[sample_photo("astronaut").resize((644, 476))], do_resize=False,
                    return_tensors="pt")["pixel_values"]
    assert torch.equal(s["pixel_values"], ref)  # PNG round trip is lossless


def test_two_images_three_boxes(env):
    ds = make_ds(env, [two_image_record()], **SMALL)
    s = ds[0]
    assert s["image_grid_thw"].tolist() == [[1, 12, 16], [1, 14, 10]]
    assert s["pixel_values"].shape[0] == 12 * 16 + 14 * 10
    assert s["latent_index"].tolist() == TWO_IMG_EXPECTED
    grids, offsets = {0: (12, 16), 1: (14, 10)}, {0: 0, 1: 48}  # the mask formulation agrees
    assert TWO_IMG_EXPECTED == [offsets[b["image"]] + i for b in TWO_IMG_BOXES
                                for i in mask_indices(b["bbox"], *grids[b["image"]])]
    ids, t = s["input_ids"].tolist(), ds.ids
    runs = [ids[i + 1:].index(t.vision_end) for i, v in enumerate(ids) if v == t.vision_start]
    assert runs == [48, 35]
    latent_runs = [ids[i + 1:].index(t.lvr_end) for i, v in enumerate(ids) if v == t.lvr_start]
    assert latent_runs == [4, 8, 9]


def expected_supervised(ids, t, tok):
    """Independent: positions of assistant content + its <|im_end|>, minus <|lvr|> tokens."""
    header = tok.encode("assistant\n", add_special_tokens=False)
    out = set()
    for i, v in enumerate(ids):
        if v == t.im_start and ids[i + 1:i + 1 + len(header)] == header:
            j = i + 1 + len(header)
            while True:
                if ids[j] != t.lvr:
                    out.add(j)
                if ids[j] == t.im_end:
                    break
                j += 1
    return out


def test_prompt_labels_and_loss_mask(env):
    ds = make_ds(env, [two_image_record()], **SMALL)
    s, t, tok = ds[0], ds.ids, env["tok"]
    ids = s["input_ids"].tolist()
    pads = lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"  # noqa: E731
    lat = lambda n: "<|lvr_start|>" + "<|lvr|>" * n + "<|lvr_end|>"  # noqa: E731
    full = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\nCompare {pads(48)} with {pads(35)}.<|im_end|>\n"
            f"<|im_start|>assistant\nFirst {lat(4)} then {lat(8)}.<|im_end|>\n"
            "<|im_start|>user\nAnd the corner?<|im_end|>\n"
            f"<|im_start|>assistant\n{lat(9)} done<|im_end|>\n")
    assert tok.decode(ids) == full
    assert ids == tok.encode(full, add_special_tokens=False)  # piecewise == whole here
    assert s["labels"].tolist() == ids[1:] + [t.pad]
    lm = s["loss_mask"]
    assert lm.dtype == torch.float32
    targets = {i + 1 for i in torch.nonzero(lm).flatten().tolist()}
    assert targets == expected_supervised(ids, t, tok)
    sup_text = tok.decode([ids[i] for i in sorted(targets)])
    assert sup_text == ("First <|lvr_start|><|lvr_end|> then <|lvr_start|><|lvr_end|>.<|im_end|>"
                        "<|lvr_start|><|lvr_end|> done<|im_end|>")
    assert not any(ids[i] == t.lvr for i in targets)
    # <|lvr_end|> is predicted from the last <|lvr|> position; the "\n" after <|im_end|> is not
    last_lvr = max(i for i, v in enumerate(ids) if v == t.lvr)
    assert lm[last_lvr] == 1 and lm[len(ids) - 2] == 0 and lm[-1] == 0


def test_collate_offsets_and_positions(env):
    ds = make_ds(env, [worked_record(), two_image_record()], **SMALL)
    s0, s1 = ds[0], ds[1]
    b = collate([s0, s1], **ds.collate_kwargs)
    n0, n1 = len(s0["input_ids"]), len(s1["input_ids"])
    s = max(n0, n1)
    assert b["input_ids"].shape == b["labels"].shape == b["loss_mask"].shape == (2, s)
    assert b["position_ids"].shape == (3, 2, s) and b["latent_mask"].dtype == torch.bool
    assert b["latent_index"].tolist() == WORKED_IDX + [391 + i for i in TWO_IMG_EXPECTED]
    assert b["image_grid_thw"].tolist() == [[1, 34, 46], [1, 12, 16], [1, 14, 10]]
    assert b["pixel_values"].shape == (34 * 46 + 12 * 16 + 14 * 10, 1176)
    assert b["attention_mask"].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    assert (b["input_ids"][short, min(n0, n1):] == ds.ids.pad).all()
    assert (b["loss_mask"][short, min(n0, n1):] == 0).all()
    assert int(b["latent_mask"].sum()) == len(b["latent_index"]) == 45 + 21
    # features injected in b-major order land on the right tokens
    feats = torch.arange(391 + 83)
    inj = torch.full(b["input_ids"].shape, -1).masked_scatter(b["latent_mask"], feats[b["latent_index"]])
    assert inj[0][b["latent_mask"][0]].tolist() == WORKED_IDX
    pos, _ = rope_index(b["input_ids"], b["image_grid_thw"], image_token_id=ds.ids.image_pad,
                        spatial_merge_size=2, attention_mask=b["attention_mask"])
    assert torch.equal(b["position_ids"], pos)
    lat = b["position_ids"][:, 1][:, b["latent_mask"][1]]  # latent tokens advance like text
    assert (lat[0] == lat[1]).all() and (lat[0] == lat[2]).all()
    assert (b["position_ids"][:, short, min(n0, n1):] == 0).all()
    wide = make_collate(ds, pad_to=s + 5)([s0, s1])
    assert wide["input_ids"].shape == (2, s + 5) and torch.equal(wide["latent_index"], b["latent_index"])
    with pytest.raises(ValueError, match="pad_to"):
        collate([s0, s1], pad_to=s - 1, **ds.collate_kwargs)


def test_text_only_record_and_dataloader(env):
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    ds = make_ds(env, [rec, worked_record()], **SMALL)
    assert ds[0]["pixel_values"].shape == (0, 1176) and ds[0]["latent_index"].numel() == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=make_collate(ds))
    b = next(iter(loader))
    assert b["latent_index"].tolist() == WORKED_IDX and b["sources"][1][1] == 1


BAD = {  # name: (record mutation, field expected in the message)
    "missing_image": (lambda r: r.update(image="nope.png"), "image[0]"),
    "unreadable_image": (lambda r: r.update(image="garbage.png"), "image[0]"),
    "bbox_outside": (lambda r: r.update(bboxes=[[0.1, 0.1, 1.2, 0.5]]), "bboxes[0]"),
    "bbox_x_order": (lambda r: r.update(bboxes=[[0.5, 0.1, 0.4, 0.5]]), "bboxes[0]"),
    "bbox_y_order": (lambda r: r.update(bboxes=[[0.1, 0.5, 0.4, 0.5]]), "bboxes[0]"),
    "bbox_plain_multi_image": (lambda r: r.update(image=["cat.png", "cat.png"]) or
                               r["conversations"][0].update(value="<image><image>?"), "bboxes[0]"),
    "bbox_image_index": (lambda r: r.update(bboxes=[{"image": 1, "bbox": [0, 0, .5, .5]}]), "bboxes[0]"),
    "more_lvr_than_boxes": (lambda r: r["conversations"][1].update(value="<lvr> <lvr> a"), "bboxes"),
    "fewer_lvr_than_boxes": (lambda r: r.update(bboxes=[[0, 0, .5, .5]] * 2), "bboxes"),
    "image_count": (lambda r: r["conversations"][0].update(value="<image> <image> two?"), "image"),
    "too_long": (lambda r: r["conversations"][1].update(value="<lvr> " + "word " * 300), "conversations"),
    "reserved_text": (lambda r: r["conversations"][0].update(value="<image> <|im_end|>"),
                      "conversations[0].value"),
}


def small_record():
    return {"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                  {"from": "gpt", "value": "<lvr>\nA cat."}],
            "bboxes": [[0.25, 0.25, 0.75, 0.75]]}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_record_field(env, case):
    bad = small_record()
    BAD[case][0](bad)
    path = env["root"] / f"bad_{case}.json"
    with pytest.raises(LvrDataError) as ei:
        ds = make_ds(env, [small_record(), bad], name=path.name, seq_length=200, **SMALL)
        ds[0]
        ds[1]
    msg = str(ei.value)
    assert str(path) in msg and "record 1" in msg and repr(BAD[case][1]) in msg, msg


def test_unreadable_json_and_bad_meta(env):
    path = env["root"] / "broken.json"
    path.write_text('[{"image": "cat.png", ')
    with pytest.raises(LvrDataError, match="broken.json.*unreadable JSON"):
        LvrSftDataset(path, tokenizer=env["tok"], image_processor=env["ip"],
                      vocab_size=env["vocab"], seq_length=100, skip_bad=True)  # raises anyway
    meta = write(env, "bad_meta.json", [{"data_path": "d.json"}, {"image_folder": "x"}])
    with pytest.raises(LvrDataError, match=r"bad_meta.json: record 1: field 'data_path'"):
        LvrSftDataset(meta, tokenizer=env["tok"], image_processor=env["ip"],
                      vocab_size=env["vocab"], seq_length=100)


def test_skip_bad_counts_and_meta(env, caplog):
    recs = [small_record()]
    for case in ("missing_image", "bbox_outside", "more_lvr_than_boxes", "too_long", "image_count"):
        r = small_record()
        BAD[case][0](r)
        recs.append(r)
    recs.append(small_record())
    write(env, "mixed.json", recs)
    write(env, "good.json", [two_image_record()])
    meta = write(env, "meta.json", {"a": {"data_path": "mixed.json", "image_folder": "images",
                                          "ds_name": "a"},
                                    "b": {"data_path": "good.json", "image_folder": "images"}})
    with caplog.at_level(logging.WARNING, logger="megatron_latent.data.lvr_dataset"):
        ds = LvrSftDataset(meta, tokenizer=env["tok"], image_processor=env["ip"],
                           vocab_size=env["vocab"], seq_length=400, skip_bad=True, **SMALL)
    assert len(ds) == 3
    assert ds.skipped == {"image": 1, "bbox": 1, "lvr_count": 1, "too_long": 1, "image_count": 1}
    assert len([r for r in caplog.records if "skipped 5 of 8" in r.getMessage()]) == 1
    assert [(Path(f).name, i) for f, i in (ds[k]["source"] for k in range(3))] == \
        [("mixed.json", 0), ("mixed.json", 6), ("good.json", 0)]
    missing = small_record()
    BAD["missing_image"][0](missing)
    with pytest.raises(LvrDataError, match="record 1: field 'image\\[0\\]'"):  # strict: raises
        make_ds(env, [small_record(), missing], name="scan.json", scan=True, **SMALL)  # up front


def test_add_lvr_tokens(env):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["ckpt"])
    assert len(tok) == 534 and env["vocab"] == 576
    ids = add_lvr_tokens(tok, env["vocab"])
    assert ids == {"<|lvr_start|>": 534, "<|lvr|>": 535, "<|lvr_end|>": 536}
    assert add_lvr_tokens(tok, env["vocab"]) == ids and len(tok) == 537
    assert tok.encode("a<|lvr|>b", add_special_tokens=False)[1] == 535
    with pytest.raises(ValueError, match="embedding rows"):
        add_lvr_tokens(AutoTokenizer.from_pretrained(env["ckpt"]), 535)


def test_inspect_data_json(env, capsys):
    data = write(env, "inspect.json", [worked_record()])
    spec = importlib.util.spec_from_file_location("inspect_data", REPO / "tools" / "inspect_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--data", str(data), "--hf-dir", str(env["ckpt"]), "--image-folder",
                     str(env["imgs"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_latent"] == 45 and d["images"][0]["merged_hw"] == [17, 23]
    assert [(x["row"], x["col"]) for x in d["latents"][:2]] == [(7, 8), (7, 9)]
    assert d["latents"][-1]["feature_index"] == 11 * 23 + 16
    assert d["tokens"][0]["text"] == "<|im_start|>"
    assert mod.main(["--data", str(data), "--hf-dir", str(env["ckpt"]), "--image-folder",
                     str(env["imgs"])]) == 0
    assert "-> feature 169 (image 0, row 7, col 8)" in capsys.readouterr().out
