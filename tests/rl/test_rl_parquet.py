"""RL prompts in the verl/EasyR1 parquet schema (HyLaR-RL-Data): the synthetic set round-trips,
every image encoding and the Thyme-RL row form load, bad rows name file, record and field, and
an interleaved problem is prompted exactly as the HF chat template renders EasyR1's message."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from megatron_latent.data.errors import DataError
from megatron_latent.data.synthetic_rl import FILE_NAME, ROW_GROUP, make_row, \
    make_synthetic_rl_parquet
from megatron_latent.rl.data import EncodedImage, ParquetPrompts, RLPrompt, load_rl_prompts

SYSTEM = "\nYou are a helpful assistant.\n"  # HyLaR's RL system message (with its newlines)
PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=1024 * 28 * 28)


def png(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write(path, columns: dict, types: dict | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = types or {}
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()})
    pq.write_table(table, path)
    return path


def pixels(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_rl_parquet(tmp_path_factory.mktemp("rl") / "data", num=20, seed=3)


# ---------------------------------------------------------------------- loading
def test_round_trip(synthetic):
    prompts = load_rl_prompts(synthetic)
    assert isinstance(prompts, ParquetPrompts) and len(prompts) == 20
    assert load_rl_prompts(synthetic / FILE_NAME)[5] == prompts[5]  # the file itself, too
    listed = list(prompts)  # streamed per file; indexing reads one row: the same prompts
    assert all(prompts[i] == listed[i] for i in (0, ROW_GROUP - 1, ROW_GROUP, 13, 19, -1))
    for i, p in enumerate(listed):
        row = make_row(3, i)
        assert p.question == row["problem"] and p.reference == row["answer"]
        assert p.id == f"{FILE_NAME}#{i}"
        assert all(isinstance(im, EncodedImage) for im in p.images)  # bytes, not pixels, held
        opened = p.open_images()
        assert len(opened) == len(row["images"]) == p.question.count("<image>")
        for im, src in zip(opened, row["images"]):
            assert im.mode == "RGB"
            assert np.array_equal(pixels(im), pixels(Image.open(io.BytesIO(src["bytes"]))))
    assert {len(p.images) for p in listed} == {1, 2}


def test_load_keeps_text_only(synthetic):
    """Loading reads the text columns: no image bytes are held until a prompt is taken."""
    import pyarrow as pa

    before = pa.total_allocated_bytes()
    prompts = load_rl_prompts(synthetic)
    held = pa.total_allocated_bytes() - before
    assert held < sum(len(im.data) for p in prompts for im in p.images) / 10
    assert not any(isinstance(v, (bytes, EncodedImage)) for f in prompts.files
                   for v in vars(f).values())


def test_image_encodings(tmp_path):
    """{"bytes"} structs, raw bytes, base64 strings (plain, data-URL, line-wrapped), base64 as
    bytes: all give the same image."""
    import pyarrow as pa

    data = png()
    b64 = base64.b64encode(data).decode()
    cells = [[{"bytes": data}], [data], [b64], ["data:image/png;base64," + b64],
             ["\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))], [b64.encode()]]
    for k, cell in enumerate(cells):
        typ = pa.list_(pa.struct([("bytes", pa.binary())])) if k == 0 else None
        path = write(tmp_path / f"{k}.parquet", {"problem": ["<image>What colour?"],
                                                 "answer": ["red"], "images": [cell]},
                     {"images": typ})
        (p,) = load_rl_prompts(path)
        assert p.images[0].data == data, k
        assert pixels(p.open_images()[0])[0, 0].tolist() == [200, 30, 30]


def test_text_only_rows_and_ids(tmp_path):
    path = write(tmp_path / "t.parquet", {"problem": ["What is 2 + 2?"], "answer": [" 4 "],
                                          "id": [17]})
    assert list(load_rl_prompts(path)) == [RLPrompt("17", (), "What is 2 + 2?", "4")]


def test_thyme_rows(tmp_path):
    """Thyme-RL rows: question, solution and one base64 image (`image`, or `images` of one as
    EasyR1 reads it) -> problem "<image>" + question."""
    b64 = base64.b64encode(png()).decode()
    for column, cell in (("image", b64), ("images", [b64])):
        path = write(tmp_path / f"{column}.parquet", {"question": ["What colour is it?"],
                                                      "solution": ["red"], column: [cell]})
        (p,) = load_rl_prompts(path)
        assert (p.question, p.reference) == ("<image>What colour is it?", "red")
        assert len(p.open_images()) == 1


def test_json_records_still_load(synthetic_lvr):
    prompts = load_rl_prompts(synthetic_lvr / "meta_rl.json")
    assert isinstance(prompts, list) and isinstance(prompts[0].images[0], str)
    assert len(prompts[0].open_images()) == 1


# ---------------------------------------------------------------------- errors
GOOD = {"problem": ["<image>Q?", "<image>Q?"], "answer": ["a", "b"]}
ERRORS = {  # name: (columns, record index, field, words in the message)
    "no problem column": ({"answer": ["a"], "images": [[png()]]}, None, "problem", "missing"),
    "no answer column": ({"problem": ["<image>Q"], "images": [[png()]]}, None, "answer",
                         "missing"),
    "no solution column": ({"question": ["Q"], "image": [png()]}, None, "solution", "missing"),
    "null problem": ({**GOOD, "problem": ["<image>Q?", None], "images": [[png()]] * 2}, 1,
                     "problem", "null"),
    "empty answer": ({**GOOD, "answer": ["a", "  "], "images": [[png()]] * 2}, 1, "answer",
                     "non-empty"),
    "reserved token": ({**GOOD, "answer": ["a", "<|im_end|>"], "images": [[png()]] * 2}, 1,
                       "answer", "reserved"),
    "too few images": ({**GOOD, "images": [[png()], []]}, 1, "images", "0 images for 1"),
    "too many images": ({**GOOD, "images": [[png()], [png(), png()]]}, 1, "images",
                        "2 images for 1"),
    "no images column": ({**GOOD}, 0, "images", "0 images for 1"),
    "two thyme images": ({"question": ["Q"], "solution": ["s"], "images": [["aGk=", "aGk="]]},
                         0, "images", "2 images for 1"),
    "bad base64": ({**GOOD, "images": [[base64.b64encode(png()).decode()], ["not base64!"]]}, 1,
                   "images[0]", "base64"),
    "struct without bytes": ({**GOOD, "images": [[{"bytes": png(), "path": None}],
                                                 [{"bytes": None, "path": "x.png"}]]},
                             1, "images[0]", "without bytes"),
    "undecodable bytes": ({**GOOD, "images": [[png()], [png()[:40]]]}, 1, "images[0]",
                          "cannot decode"),
    "not an image": ({**GOOD, "images": [[png()], [b"\x00\x01 not an image"]]}, 1, "images[0]",
                     "not an image file"),
}


def _load_all(path):
    """Load, take every prompt and decode its images (the errors surface where they belong)."""
    for p in load_rl_prompts(path):
        p.open_images()


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_rows_name_file_record_field(tmp_path, case):
    columns, index, field, words = ERRORS[case]
    path = write(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataError) as e:
        _load_all(path)
    err = e.value
    assert (err.file, err.index, err.field) == (str(path), index, field), str(err)
    where = f"record {index}" if index is not None else "(whole file)"
    assert str(path) in str(err) and where in str(err) and repr(field) in str(err)
    assert words in str(err), str(err)


def test_scan_finds_image_errors_at_load(tmp_path):
    path = write(tmp_path / "bad.parquet", {**GOOD, "images": [[png()], [png()[:40]]]})
    prompts = load_rl_prompts(path)  # lazy: the text is fine
    with pytest.raises(DataError, match=r"record 1: field 'images\[0\]'"):
        load_rl_prompts(path, scan=True)
    assert len(prompts) == 2


def test_empty_or_unreadable_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without \\*.parquet"):
        load_rl_prompts(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="unreadable parquet"):
        load_rl_prompts(tmp_path / "junk.parquet")
    path = write(tmp_path / "none.parquet", {"problem": [], "answer": []},
                 {"problem": None, "answer": None})
    with pytest.raises(DataError, match="no rows"):
        load_rl_prompts(path)


# ---------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def processor(tiny_ckpts):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_ckpts["tiny-a"])
    proc.image_processor.size = {"shortest_edge": PIXELS["min_pixels"],
                                 "longest_edge": PIXELS["max_pixels"]}
    return proc


def easyr1_prompt(proc, problem, images, system):
    """EasyR1's rendering: the problem split at each <image>, empty texts left out."""
    content = []
    for i, text in enumerate(problem.split("<image>")):
        if i:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=images, return_tensors="pt")
    return enc["input_ids"][0].tolist(), enc


@pytest.mark.parametrize("index", [0, 2], ids=["one image", "two images, text between"])
def test_interleaved_prompt_is_the_chat_templates(synthetic, processor, index):
    from megatron_latent.inference.prompts import build_prompt

    rec = load_rl_prompts(synthetic)[index]
    images = rec.open_images()
    for system in (SYSTEM, None):
        ours = build_prompt(processor, rec.question, images, system=system)
        oracle, enc = easyr1_prompt(processor, rec.question, images,
                                    system or "You are a helpful assistant.")
        tok = processor.tokenizer
        assert ours.input_ids == oracle, (tok.decode(ours.input_ids), tok.decode(oracle))
        assert ours.pixel_values.equal(enc["pixel_values"])
        assert ours.image_grid_thw.tolist() == enc["image_grid_thw"].tolist()


def test_placeholders_override_layout_and_must_match(processor):
    from megatron_latent.inference.prompts import build_prompt

    im = Image.new("RGB", (56, 56), (0, 0, 255))
    text = "Look: <image> now answer."
    assert (build_prompt(processor, text, [im], images_first=False).input_ids
            == build_prompt(processor, text, [im]).input_ids)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        build_prompt(processor, "<image> and <image>", [im])
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        build_prompt(processor, "<image> Q")


def test_prompt_builder_on_parquet_prompts(synthetic, tiny_ckpts, processor):
    from megatron_latent.inference.generator import Prompt
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.rl.step_data import PromptBuilder

    cfg = SimpleNamespace(seq_length=4096, max_new_tokens=64, system_prompt=SYSTEM,
                          answer_prefix="", **PIXELS)
    builder = PromptBuilder(tiny_ckpts["tiny-a"], None, cfg)
    records = [load_rl_prompts(synthetic)[i] for i in (1, 2, 5)]
    prompts, refs, ids, skipped = builder.build(records)
    assert skipped == 0 and refs == [r.reference for r in records]
    assert ids == [r.id for r in records]
    for p, rec in zip(prompts, records):
        assert isinstance(p, Prompt) and len(p.image_grid_thw) == len(rec.images)
        want = build_prompt(processor, rec.question, rec.open_images(), system=SYSTEM)
        assert p.input_ids == want.input_ids and p.pixel_values.equal(want.pixel_values)
    bad = RLPrompt("r", (EncodedImage(b"junk", "f.parquet", 7, "images[0]"),), "<image>Q", "a")
    with pytest.raises(DataError, match=r"f.parquet: record 7: field 'images\[0\]'"):
        builder.build([bad])
