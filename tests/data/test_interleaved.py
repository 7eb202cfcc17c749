"""HyLaR SFT data (Zebra-CoT parquet): the layout and supervision of spec oracle 4, the collate's
canvas slots, named errors, skipping, sub-task folder filters and the synthetic set."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import SiglipImageProcessor

from megatron_latent.data.errors import DataError
from megatron_latent.data.interleaved import (CANVAS_TOKENS, ZebraCotDataset, parquet_files,
                                              split_trace)
from megatron_latent.data.lvr_tokens import load_hf_processing
from megatron_latent.data.sample_inputs import sample_photo
from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved
from megatron_latent.latent.tokens import add_tokens
from megatron_latent.models.qwen25vl.rope_index import rope_index

SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=1024 * 28 * 28)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
P1, R1, R2 = ("<image_start>[problem_image_1]<image_end>", "<image_start>[reasoning_image_1]<image_end>",
              "<image_start>[reasoning_image_2]<image_end>")
ORACLE = {"Question": f"Q {P1}", "Text Reasoning Trace": f"THOUGHT 1: a\n\nb {R1} THOUGHT 2: c",
          "Final Answer": "7"}


def png(name="astronaut", size=(56, 56), truncate=False) -> dict:
    buf = io.BytesIO()
    sample_photo(name).resize(size).save(buf, format="PNG")
    data = buf.getvalue()
    return {"bytes": data[:len(data) // 2] if truncate else data, "path": None}


def write(path, rows, n_problem=1, n_reasoning=2, drop=()):
    cols = {"Question": pa.string(), "Text Reasoning Trace": pa.string(), "Final Answer": pa.string()}
    cols |= {f"problem_image_{k}": IMAGE for k in range(1, n_problem + 1)}
    cols |= {f"reasoning_image_{k}": IMAGE for k in range(1, n_reasoning + 1)}
    schema = pa.schema([(k, v) for k, v in cols.items() if k not in drop])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    return path


def row(n_reasoning=1, **kw):
    trace = "THOUGHT 1: look. " + " ".join(f"{r} THOUGHT {k + 2}: step {k}."
                                          for k, r in enumerate((R1, R2)[:n_reasoning]))
    out = {"Question": f"What is it? {P1}", "Text Reasoning Trace": trace, "Final Answer": "cat",
           "problem_image_1": png("chelsea", (84, 56))}
    out |= {f"reasoning_image_{k + 1}": png("coffee", (40 + 10 * k, 30)) for k in range(n_reasoning)}
    return out | kw


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("zebra")
    tok, ip, vocab = load_hf_processing(make_tiny_qwen25vl(root / "ckpt", preset="tiny-a"))
    ids = add_tokens(tok, CANVAS_TOKENS, vocab, special=False)
    canvas = SiglipImageProcessor(size={"height": 56, "width": 56}, resample=2,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return dict(root=root, tok=tok, ip=ip, vocab=vocab, ids=ids, canvas=canvas)


def make_ds(env, path, **kw):
    kw = dict(SMALL, seq_length=4096) | kw
    return ZebraCotDataset(path, tokenizer=env["tok"], image_processor=env["ip"],
                           canvas_processor=env["canvas"], vocab_size=env["vocab"], **kw)


def test_split_trace():
    assert split_trace(ORACLE["Text Reasoning Trace"]) == [
        ("think", "a b"), ("image", "reasoning_image_1"), ("think", "c")]


def test_oracle4_layout_and_supervision(env):
    path = write(env["root"] / "oracle.parquet",
                 [ORACLE | {"problem_image_1": png(), "reasoning_image_1": png("coffee")}], n_reasoning=1)
    x = make_ds(env, path)[0]
    tok, ids = env["tok"], x["input_ids"]
    canvas, end = env["ids"]["<|canvas|>"], env["ids"]["<|canvas_end|>"]
    assistant = ("<think>a b</think>\n<|canvas_start|>" + "<|canvas|>" * 16
                 + "<|canvas_end|>\n<think>c</think><answer>7</answer><|im_end|>")
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ"
            "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|><|im_end|>\n"
            "<|im_start|>assistant\n" + assistant + "\n")
    assert tok.decode(ids) == want
    a = len(ids) - len(tok(assistant + "\n", add_special_tokens=False)["input_ids"])
    assert tok.decode(ids[a:-1]) == assistant  # content starts right after "assistant\n"
    assert x["image_grid_thw"].tolist() == [[1, 4, 4]] and x["pixel_values"].shape == (16, 1176)
    assert x["canvas_pixel_values"].shape == (1, 3, 56, 56)
    torch.testing.assert_close(x["labels"][:-1], ids[1:])
    slots = (ids == canvas).nonzero().squeeze(1)
    assert len(slots) == 16
    # targets: assistant content + <|im_end|>, except the 16 canvas targets
    target_pos = torch.arange(a - 1, len(ids) - 2)
    expected = torch.zeros(len(ids))
    expected[target_pos] = 1.0
    expected[slots - 1] = 0.0
    torch.testing.assert_close(x["loss_mask"], expected)
    last = int(slots[-1])
    assert x["labels"][last] == end and x["loss_mask"][last] == 1  # <|canvas_end|> from slot 16
    assert x["loss_mask"][slots[0] - 1] == 0 and x["labels"][slots[0] - 1] == canvas


def test_collate_canvas_slots(env):
    path = write(env["root"] / "two.parquet", [row(1), row(2)])
    ds = make_ds(env, path, canvas_tokens=4)
    samples = [ds[0], ds[1]]
    mb = ds.collate(samples, pad_to=256)
    b, s = mb["input_ids"].shape
    assert (b, s) == (2, 256)
    assert int(mb["latent_mask"].sum()) == 12 and mb["latent_mask"].sum(1).tolist() == [4, 8]
    assert mb["canvas_pixel_values"].shape == (3, 3, 56, 56)
    torch.testing.assert_close(mb["canvas_pixel_values"][1:],
                               samples[1]["canvas_pixel_values"])  # sample order
    assert mb["image_grid_thw"].tolist() == [[1, 4, 6]] * 2
    assert mb["pixel_values"].shape == (48, 1176)
    want, _ = rope_index(mb["input_ids"], mb["image_grid_thw"], image_token_id=ds.ids["<|image_pad|>"],
                         spatial_merge_size=2, attention_mask=mb["attention_mask"])
    torch.testing.assert_close(mb["position_ids"], want)
    n0 = len(samples[0]["input_ids"])
    assert mb["attention_mask"][0].sum() == n0 and mb["loss_mask"][0, n0:].sum() == 0
    assert mb["sources"] == [(str(path), 0), (str(path), 1)]
    broken = dict(samples[1], canvas_pixel_values=samples[1]["canvas_pixel_values"][:1])
    with pytest.raises(ValueError, match=r"two\.parquet', 1\)"):
        ds.collate([samples[0], broken])
    with pytest.raises(NotImplementedError, match="packing is not supported"):
        ds.pack(samples)


BAD = {  # row -> (field, reason)
    1: ("reasoning_image_1", "image"),  # truncated PNG
    2: ("reasoning_image_2", "image_count"),  # placeholder without an image
    3: ("reasoning_image_2", "image_count"),  # image without a placeholder
    4: ("Text Reasoning Trace", "too_long"),
    5: ("Question", "missing"),
    6: ("Final Answer", "reserved"),
    7: ("Question", "placeholder"),  # a reasoning placeholder in the question
}


def bad_rows():
    long_trace = "THOUGHT 1: " + "word " * 300 + R1
    return [row(1), row(1, reasoning_image_1=png(truncate=True)),
            row(2, reasoning_image_2=None), row(1, reasoning_image_2=png()),
            row(1, **{"Text Reasoning Trace": long_trace}), row(1, Question=None),
            row(1, **{"Final Answer": "<|canvas|>"}), row(1, Question=f"Q {P1} {R2}"), row(2)]


def test_named_errors(env):
    path = write(env["root"] / "bad.parquet", bad_rows())
    ds = make_ds(env, path, seq_length=250)
    assert len(ds) == 9
    ds[0], ds[8]
    for i, (field, reason) in BAD.items():
        with pytest.raises(DataError) as e:
            ds[i]
        assert (e.value.index, e.value.field, e.value.reason) == (i, field, reason), str(e.value)
        assert str(path) in str(e.value) and f"record {i}" in str(e.value)
    no_answer = write(env["root"] / "cols.parquet", [row(1)], drop=("Final Answer",))
    with pytest.raises(DataError, match=r"cols\.parquet.*'Final Answer'.*missing column"):
        make_ds(env, no_answer)
    with pytest.raises(DataError, match=r"bad\.parquet: record 1: field 'reasoning_image_1'"):
        make_ds(env, path, seq_length=250, scan=True)  # the scan raises the first bad row
    bare = load_hf_processing(env["root"] / "ckpt")[0]
    with pytest.raises(ValueError, match="lacks HyLaR's tokens"):
        ZebraCotDataset(path, tokenizer=bare, image_processor=env["ip"],
                        canvas_processor=env["canvas"], vocab_size=env["vocab"], seq_length=None)


def test_skip_bad_counts_by_reason(env):
    path = write(env["root"] / "bad.parquet", bad_rows())
    ds = make_ds(env, path, seq_length=250, skip_bad=True, scan_workers=2)
    assert len(ds) == 2 and [ds[i]["source"][1] for i in range(2)] == [0, 8]
    assert ds.skipped == {"image": 1, "image_count": 2, "too_long": 1, "missing": 1,
                          "reserved": 1, "placeholder": 1}
    only_bad = write(env["root"] / "allbad.parquet", bad_rows()[1:3])
    with pytest.raises(ValueError, match="all 2 rows are bad"):
        make_ds(env, only_bad, skip_bad=True)


def test_subtask_folders(env, tmp_path):
    names = ["2D Visual Reasoning - Visual Search", "3D Visual Reasoning - Embodied CoT",
             "Scientific Reasoning - Physics", "Visual Logic & Strategic Games - Tetris"]
    for k, name in enumerate(names):
        write(tmp_path / name / "train-00000-of-00001.parquet", [row(1)] * (k + 1))
    write(tmp_path / "top.parquet", [row(1)] * 5)
    rel = lambda fs: [f.relative_to(tmp_path).parts[0] for f in fs]  # noqa: E731
    assert rel(parquet_files(tmp_path)) == ["top.parquet", names[0]]
    assert rel(parquet_files(tmp_path, include=("Physics", "3D"), exclude=())) == [
        "top.parquet", names[1], names[2]]
    assert rel(parquet_files(tmp_path, exclude=("Search",))) == ["top.parquet"] + names[1:]
    assert len(make_ds(env, tmp_path)) == 5 + 1
    ds = make_ds(env, tmp_path, include=("Tetris",), exclude=())
    assert len(ds) == 5 + 4
    assert ds[8]["source"] == (str(tmp_path / names[3] / "train-00000-of-00001.parquet"), 3)
    write(tmp_path / "only3d" / names[1] / "a.parquet", [row(1)])
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        parquet_files(tmp_path / "only3d")  # everything excluded
    with pytest.raises(FileNotFoundError):
        parquet_files(tmp_path / "absent")


def test_synthetic_set_loads(env, tmp_path):
    out = make_synthetic_interleaved(tmp_path / "a", num=5, val_num=2, seed=3, min_side=64,
                                     max_side=112, progress=False)
    again = make_synthetic_interleaved(tmp_path / "b", num=5, val_num=2, seed=3, min_side=64,
                                       max_side=112, progress=False)
    f = "Synthetic - Visual Search/train-00000-of-00001.parquet"
    assert pq.read_table(out / "train" / f).equals(pq.read_table(again / "train" / f))
    ds = make_ds(env, out / "train", skip_bad=True)
    assert len(ds) == 5 and ds.skipped == {}
    from megatron_latent.testing.tiny_siglip import make_tiny_siglip

    val = ZebraCotDataset.from_hf_dir(out / "val", env["root"] / "ckpt", make_tiny_siglip(tmp_path / "sig"),
                                      seq_length=4096, **SMALL)
    assert len(val) == 2 and val.ids == ds.ids and val.canvas_processor.size["height"] == 56
    x = ds[0]
    assert x["canvas_pixel_values"].shape == (1, 3, 56, 56) and len(x["image_grid_thw"]) == 1
    text = env["tok"].decode(x["input_ids"])
    answer = pq.read_table(out / "train" / f).column("Final Answer")[0].as_py()
    assert f"<answer>{answer}</answer><|im_end|>" in text and answer in text.split("<|canvas_end|>")[1]
    mb = ds.collate([ds[i] for i in range(5)])
    assert int(mb["latent_mask"].sum()) == 16 * 5 and mb["canvas_pixel_values"].shape[0] == 5


def test_image_by_path(env, tmp_path):
    sample_photo("coffee").resize((40, 30)).save(tmp_path / "r.png")
    rows = [row(1, reasoning_image_1={"bytes": None, "path": "r.png"}),
            row(1, reasoning_image_1={"bytes": None, "path": "../r.png"})]
    ds = make_ds(env, write(tmp_path / "p.parquet", rows))
    assert ds[0]["canvas_pixel_values"].shape == (1, 3, 56, 56)
    with pytest.raises(DataError, match="leaves the folder"):
        ds[1]
