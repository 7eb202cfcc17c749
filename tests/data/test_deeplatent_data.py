"""DeepLatent SFT data (docs/deeplatent.md): stage 1 (real assistant images, teacher slots),
stage 2 (latent blocks: layout, CE targets, block table, question features, image-like mRoPE =
spec oracle 15), the one-to-one map of teacher slot k and latent slot k, named errors and skips,
stage-1 packing and the synthetic set with several reasoning images."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_latent.data.deeplatent_data import DeepLatentDataset, assistant_grid
from megatron_latent.data.deeplatent_tokens import END, LATENT_TOKENS, PAD, PLACEHOLDERS, START
from megatron_latent.data.errors import DataError
from megatron_latent.data.lvr_tokens import load_hf_processing
from megatron_latent.data.sample_inputs import sample_photo
from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved
from megatron_latent.latent.tokens import add_tokens
from megatron_latent.models.qwen25vl.rope_index import rope_index

SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
P1 = "<image_start>[problem_image_1]<image_end>"
R = [f"<image_start>[reasoning_image_{k}]<image_end>" for k in range(1, 7)]
REASONING_SIZES = [(100, 60), (40, 30), (600, 150), (30, 30), (60, 60), (28, 56)]


def png(name="coffee", size=(56, 56)) -> dict:
    buf = io.BytesIO()
    sample_photo(name).resize(size).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def row(n=2, **kw) -> dict:
    trace = "THOUGHT 1: look. " + " ".join(f"{R[k]} THOUGHT {k + 2}: step {k}." for k in range(n))
    out = {"Question": f"What is it? {P1}", "Text Reasoning Trace": trace, "Final Answer": "cat",
           "problem_image_1": png("chelsea", (84, 56))}
    out |= {f"reasoning_image_{k + 1}": png("coffee", REASONING_SIZES[k]) for k in range(n)}
    return out | kw


def write(path, rows, n_reasoning=6):
    cols = {"Question": pa.string(), "Text Reasoning Trace": pa.string(),
            "Final Answer": pa.string(), "problem_image_1": IMAGE}
    cols |= {f"reasoning_image_{k}": IMAGE for k in range(1, n_reasoning + 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(list(cols.items()))), path,
                   row_group_size=2)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("deeplatent")
    tok, ip, vocab = load_hf_processing(make_tiny_qwen25vl(root / "ckpt", preset="tiny-a"))
    ids = add_tokens(tok, LATENT_TOKENS, vocab, special=False)
    path = write(root / "sub" / "rows.parquet", [row(1), row(3), row(0)])
    return dict(root=root, tok=tok, ip=ip, vocab=vocab, ids=ids, path=path)


def make_ds(env, stage, path=None, **kw):
    kw = dict(SMALL, seq_length=4096) | kw
    return DeepLatentDataset(path or env["path"], stage=stage, tokenizer=env["tok"],
                             image_processor=env["ip"], vocab_size=env["vocab"], **kw)


def test_assistant_grid_caps_each_side_at_16():
    assert assistant_grid((448, 448)) == (1, 32, 32)  # merged 16 x 16
    assert assistant_grid((896, 224)) == (1, 8, 32)  # 448 x 112: 4 x 16 (a pixel bound gives 8 x 32)
    assert assistant_grid((100, 60)) == (1, 4, 8)  # 56 x 112: 2 x 4, no upscaling
    assert assistant_grid((40, 30)) == (1, 2, 2)  # 1 x 1
    assert assistant_grid((1000, 10)) == (1, 2, 32)  # thin: 1 x 16
    with pytest.raises(ValueError, match="aspect ratio"):
        assistant_grid((3000, 10))


def test_stage1_fields(env):
    ds = make_ds(env, 1)
    x = ds[1]  # 3 reasoning images
    tok, ids, pad = env["tok"], x["input_ids"], ds.ids["<|image_pad|>"]
    assert x["teacher_grids"] == [(2, 4), (1, 1), (4, 16)]
    assert x["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 8], [1, 2, 2], [1, 8, 32]]
    assert x["pixel_values"].shape == (24 + 32 + 4 + 256, 1176)  # question, then assistant images
    assert int(x["teacher_mask"].sum()) == 8 + 1 + 64 == int((ids == pad).sum()) - 6
    assert not x["teacher_mask"][:int((ids == pad).nonzero()[5]) + 1].any()  # not the question's
    assert x["loss_mask"][x["labels"] == pad].sum() == 0  # pads are never CE targets
    text = tok.decode(ids)
    block = lambda n: "\n<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>\n"  # noqa: E731
    assert text.endswith("<|im_start|>assistant\n<think>look.</think>" + block(8)
                         + "<think>step 0.</think>" + block(1) + "<think>step 1.</think>" + block(64)
                         + "<think>step 2.</think><answer>cat</answer><|im_end|>\n")
    assert x["sample_id"] == "rows.parquet#1" and ds.sample_id(ds.files[0], 1) == x["sample_id"]
    mb = ds.collate([ds[0], ds[1], ds[2]], pad_to=512)
    assert mb["teacher_mask"].shape == (3, 512) and mb["teacher_mask"].sum(1).tolist() == [8, 73, 0]
    assert mb["teacher_grids"] == [[(2, 4)], [(2, 4), (1, 1), (4, 16)], []]
    assert mb["sample_ids"] == ["rows.parquet#0", "rows.parquet#1", "rows.parquet#2"]
    assert len(mb["pixel_values"]) == int(mb["image_grid_thw"].prod(-1).sum())
    want, _ = rope_index(mb["input_ids"], mb["image_grid_thw"], image_token_id=pad,
                         spatial_merge_size=2, attention_mask=mb["attention_mask"])
    assert torch.equal(mb["position_ids"], want)


def test_stage2_layout_targets_and_blocks(env):
    ds = make_ds(env, 2)
    t = ds.ids
    samples = [ds[0], ds[1], ds[2]]
    x = samples[1]
    assert x["image_grid_thw"].tolist() == [[1, 4, 6]] and x["pixel_values"].shape == (24, 1176)
    assert x["teacher_grids"] == [(2, 4), (1, 1), (4, 16)]
    text = env["tok"].decode(x["input_ids"])
    block = lambda n: f"\n{START}{''.join(PLACEHOLDERS)}" + PAD * n + f"{END}\n"  # noqa: E731
    assert text.endswith("assistant\n<think>look.</think>" + block(8) + "<think>step 0.</think>"
                         + block(1) + "<think>step 1.</think>" + block(64)
                         + "<think>step 2.</think><answer>cat</answer><|im_end|>\n")
    # CE targets: text, <|im_end|> and <latent>; never a placeholder, a pad or </latent>
    targets = set(x["labels"][x["loss_mask"].bool()].tolist())
    assert t[START] in targets and t["<|im_end|>"] in targets
    assert not targets & {t[n] for n in (END, PAD) + PLACEHOLDERS}
    assert int(x["loss_mask"][x["labels"] == t[START]].sum()) == 3
    assert int(x["latent_mask"].sum()) == 73
    mb = ds.collate(samples, pad_to=256)
    assert mb["latent_mask"].sum(1).tolist() == [8, 73, 0]
    assert mb["blocks"].tolist() == [[0, mb["blocks"][0, 1].item(), 2, 4]] + [
        [1, p, h, w] for p, (h, w) in zip(mb["blocks"][1:, 1].tolist(), x["teacher_grids"])]
    for r, p, h, w in mb["blocks"].tolist():
        ids = mb["input_ids"][r]
        assert ids[p] == t[START] and ids[p + 1:p + 4].tolist() == [t[n] for n in PLACEHOLDERS]
        assert mb["latent_mask"][r, p + 4:p + 4 + h * w].all() and ids[p + 4 + h * w] == t[END]
        # image-like mRoPE (spec oracle 15): slot (i, j) -> (q, q + i, q + j), q = <latent>'s + 4
        q = int(mb["position_ids"][0, r, p]) + 4
        slots = mb["position_ids"][:, r, p + 4:p + 4 + h * w].T.tolist()
        assert slots == [[q, q + i, q + j] for i in range(h) for j in range(w)]
        assert mb["position_ids"][:, r, p + 4 + h * w].tolist() == [q + max(h, w)] * 3
    # question features of each block's row: rows of the concatenated features, coords, grid
    assert [f.tolist() for f in mb["question_features"]] == [list(range(6))] + [list(range(6, 12))] * 3
    assert mb["feature_coords"][1].tolist() == [[r, c] for r in range(2) for c in range(3)]
    assert mb["feature_grid"] == [(2, 3)] * 4
    assert mb["teacher_grids"] == [[(2, 4)], [(2, 4), (1, 1), (4, 16)], []]
    assert mb["sample_ids"] == ["rows.parquet#0", "rows.parquet#1", "rows.parquet#2"]
    text_like = make_ds(env, 2, latent_positions="text").collate(samples)["position_ids"]
    r, p, h, w = mb["blocks"][-1].tolist()  # the flag's fallback: slots count on like text
    q = int(text_like[0, r, p])
    assert text_like[:, r, p:p + 5 + h * w].tolist() == [list(range(q, q + 5 + h * w))] * 3
    with pytest.raises(NotImplementedError, match="stage 2"):
        ds.pack(samples)


def test_teacher_slot_k_is_latent_slot_k(env):
    """Stage-1 teacher slots and stage-2 latent slots of a sample: the same count per image k,
    in the same row-major order (the same relative (h, w) mRoPE offsets), and the same tokens
    outside the blocks."""
    one, two = make_ds(env, 1), make_ds(env, 2)
    s1 = one.collate([one[i] for i in range(3)])
    s2 = two.collate([two[i] for i in range(3)])
    assert s1["teacher_grids"] == s2["teacher_grids"] and s1["sample_ids"] == s2["sample_ids"]
    for r, grids in enumerate(s1["teacher_grids"]):
        teacher = s1["teacher_mask"][r].nonzero().squeeze(1)
        student = s2["latent_mask"][r].nonzero().squeeze(1)
        assert len(teacher) == len(student) == sum(h * w for h, w in grids)
        at = 0
        for h, w in grids:
            pt = s1["position_ids"][:, r, teacher[at:at + h * w]]
            ps = s2["position_ids"][:, r, student[at:at + h * w]]
            assert torch.equal(pt - pt[:, :1], ps - ps[:, :1])  # slot p = (i, j) in both
            at += h * w
        block = {one.ids[n] for n in ("<|vision_start|>", "<|vision_end|>")} | \
            {two.ids[n] for n in LATENT_TOKENS}
        keep = lambda ids, lat: [i for k, i in enumerate(ids.tolist()) if i not in block  # noqa: E731
                                 and not lat[k]]
        n1, n2 = int(s1["attention_mask"][r].sum()), int(s2["attention_mask"][r].sum())
        assert keep(s1["input_ids"][r, :n1], s1["teacher_mask"][r]) == \
            keep(s2["input_ids"][r, :n2], s2["latent_mask"][r])
        assert n2 - n1 == 3 * len(grids)


BAD = {  # row -> (field, reason)
    1: ("Text Reasoning Trace", "too_many_blocks"),
    3: ("Final Answer", "reserved"),
    4: ("reasoning_image_1", "image"),  # aspect ratio over 200
    5: ("Text Reasoning Trace", "too_long"),  # fits stage 1, not the stage-2 layout
    6: ("reasoning_image_2", "image_count"),
}


def test_named_errors_and_identical_skips(env):
    long_text = "THOUGHT 1: " + "word " * 40 + " ".join(R[:5])
    rows = [row(1), row(6), row(1, Question="What is it?", problem_image_1=None),
            row(1, **{"Final Answer": "<latent>"}), row(1, reasoning_image_1=png(size=(2000, 8))),
            row(5, **{"Text Reasoning Trace": long_text}), row(1, reasoning_image_2=png()), row(2)]
    path = write(env["root"] / "bad.parquet", rows)
    budget = len(make_ds(env, 1, path=path, seq_length=None)[5]["input_ids"]) + 5  # < 3 x 5 more
    for stage in (1, 2):
        ds = make_ds(env, stage, path=path, seq_length=budget)
        for i, (field, reason) in BAD.items():
            with pytest.raises(DataError) as e:
                ds[i]
            assert (e.value.index, e.value.field, e.value.reason) == (i, field, reason), str(e.value)
        kept = make_ds(env, stage, path=path, seq_length=budget, skip_bad=True, scan_workers=2)
        assert kept.skipped == {r: 1 for _, r in BAD.values()}
        assert [kept[i]["sample_id"] for i in range(len(kept))] == [
            "bad.parquet#0", "bad.parquet#2", "bad.parquet#7"]
        if stage == 2:  # no question image: no features, the block is its own frame
            mb = kept.collate([kept[1]])
            assert mb["question_features"][0].numel() == 0 and mb["feature_coords"][0].shape == (0, 2)
            assert mb["feature_grid"] == [(2, 4)] and mb["pixel_values"].shape[0] == 0
    bare = load_hf_processing(env["root"] / "ckpt")[0]
    with pytest.raises(ValueError, match="lacks DeepLatent's tokens"):
        DeepLatentDataset(path, stage=1, tokenizer=bare, image_processor=env["ip"],
                          vocab_size=env["vocab"], seq_length=None)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        make_ds(env, 3)


def test_stage1_pack(env):
    ds = make_ds(env, 1)
    samples = [ds[i] for i in range(3)]
    mb = ds.pack(samples, pad_to_multiple=64)
    n = [len(x["input_ids"]) for x in samples]
    assert mb["input_ids"].shape == (1, -(-sum(n) // 64) * 64)
    assert mb["cu_seqlens"].tolist()[:4] == [0, n[0], n[0] + n[1], sum(n)]
    assert int(mb["teacher_mask"].sum()) == 81
    assert mb["sample_ids"] == [x["sample_id"] for x in samples]
    assert mb["teacher_grids"] == [x["teacher_grids"] for x in samples]  # per packed sample
    for k, x in enumerate(samples):
        a = int(mb["cu_seqlens"][k])
        pos, _ = rope_index(x["input_ids"][None], x["image_grid_thw"],
                            image_token_id=ds.ids["<|image_pad|>"], spatial_merge_size=2)
        assert torch.equal(mb["position_ids"][:, :, a:a + n[k]], pos)
        assert torch.equal(mb["teacher_mask"][0, a:a + n[k]], x["teacher_mask"])


def test_synthetic_with_several_reasoning_images(env, tmp_path):
    out = make_synthetic_interleaved(tmp_path / "s", num=3, val_num=0, seed=2, min_side=64,
                                     max_side=160, progress=False, reasoning_images=3)
    for stage in (1, 2):
        ds = make_ds(env, stage, path=out / "train", skip_bad=True, scan_workers=2)
        assert len(ds) == 3 and ds.skipped == {}
        mb = ds.collate([ds[i] for i in range(3)])
        assert [len(g) for g in mb["teacher_grids"]] == [3, 3, 3]
        areas = [[h * w for h, w in g] for g in mb["teacher_grids"]]
        assert all(a[0] >= a[1] >= a[2] for a in areas)  # zooming in: tighter crops
        if stage == 2:
            assert len(mb["blocks"]) == 9
