"""Issue 19, items 3, 4, 5, 7 and 9 (records): images that fail only when decoded are skipped
under --skip-bad-samples; pixel modes are converted right or refused by name; image paths stay
in their folder and only regular files are opened; empty or mis-shaped records files say so."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_latent.data import LvrDataError, LvrSftDataset, load_hf_processing
from megatron_latent.eval.vqa_data import VqaDataError, read_vqa_jsonl
from megatron_latent.inference.loading import open_image  # generation's, = training's
from megatron_latent.testing.samples import sample_photo

SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=1024 * 28 * 28, seq_length=4096)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("reliability_data")
    tok, ip, vocab = load_hf_processing(make_tiny_qwen25vl(root / "ckpt", preset="tiny-a"))
    imgs = root / "images"
    imgs.mkdir()
    photo = sample_photo("coffee").resize((112, 84))
    photo.save(imgs / "ok.png")
    gray = np.asarray(photo.convert("L"))
    Image.fromarray(gray, "L").save(imgs / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(imgs / "gray16.png")  # 16-bit, same image
    data = (imgs / "ok.png").read_bytes()
    (imgs / "truncated.png").write_bytes(data[:len(data) // 2])  # header intact, pixels cut
    return dict(root=root, tok=tok, ip=ip, vocab=vocab, imgs=imgs, photo=photo, gray=gray)


def record(image: str, text: str = "What is here?") -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{text}"},
                                              {"from": "gpt", "value": "coffee"}]}


def dataset(env, records, name="d.json", **kw):
    path = env["root"] / name
    path.write_text(json.dumps(records))
    return LvrSftDataset(path, tokenizer=env["tok"], image_processor=env["ip"],
                         vocab_size=env["vocab"], image_folder=env["imgs"], **{**SMALL, **kw})


# ------------------------------------------------------------------ item 3
def test_skip_bad_samples_skips_an_image_truncated_after_its_header(env):
    recs = [record("ok.png", "first"), record("truncated.png"), record("ok.png", "third")]
    ds = dataset(env, recs, skip_bad=True)
    assert len(ds) == 3  # the header-only scan cannot see the damage
    got = ds[1]  # a step asking for it gets the next loadable sample instead, and it is counted
    assert got["source"][1] == 2 and torch.equal(got["input_ids"], ds[2]["input_ids"])
    assert ds.skipped == {"image": 1} and "truncated.png" in ds.skip_examples["image"]
    ds[1]
    assert ds.skipped == {"image": 1}, "a known-bad record is not counted twice"
    with pytest.raises(LvrDataError, match=r"d.json: record 1: field 'image\[0\]'.*truncated"):
        dataset(env, recs)[1]  # without the flag the record is named


# ------------------------------------------------------------------ item 4
def test_16_bit_grayscale_equals_its_8_bit_version(env):
    s16 = dataset(env, [record("gray16.png")])[0]["pixel_values"]
    s8 = dataset(env, [record("gray8.png")])[0]["pixel_values"]
    assert abs(s16.mean().item()) < 1.5, "16-bit gray must not saturate to white"
    assert torch.equal(s16, s8)
    assert np.array_equal(np.asarray(open_image(env["imgs"] / "gray16.png")),
                          np.stack([env["gray"]] * 3, -1))


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.int64)


def test_other_pixel_modes(env, tmp_path):
    rgb = np.asarray(env["photo"]).astype(np.int64)
    gray = env["gray"]
    alpha = np.broadcast_to(np.arange(112, dtype=np.uint8) * 2, (84, 112)).copy()
    cases = {  # file -> the RGB expected, computed without PIL's conversions
        "la.png": (Image.fromarray(np.stack([gray, alpha], -1), "LA"),
                   _over_white(np.stack([gray] * 3, -1).astype(np.int64), alpha)),
        "rgba.png": (Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1).astype(np.uint8),
                                     "RGBA"), _over_white(rgb, alpha)),
        "bw.png": (Image.fromarray(gray > 128).convert("1"),
                   np.stack([(gray > 128) * 255] * 3, -1)),
    }
    pal = Image.fromarray((gray // 64).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.info["transparency"] = 0  # index 0 transparent: white, not black
    lut = np.array([[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]])
    cases["p_transparent.png"] = (pal, lut[gray // 64])
    for name, (im, want) in cases.items():
        im.save(tmp_path / name, **({"transparency": 0} if name.startswith("p_") else {}))
        got = np.asarray(open_image(tmp_path / name)).astype(np.int64)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, name
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "float.tif")
    Image.fromarray(gray.astype(np.int32) * 1000).save(tmp_path / "int32.tif")
    for name, mode in (("float.tif", "F"), ("int32.tif", "I")):
        with pytest.raises(ValueError, match=rf"{name}: unsupported pixel mode '{mode}'"):
            open_image(tmp_path / name)


def test_unsupported_mode_is_refused_by_name_and_skipped_by_the_scan(env):
    Image.fromarray(env["gray"].astype(np.float32)).save(env["imgs"] / "float.tif")
    with pytest.raises(LvrDataError, match=r"record 0: field 'image\[0\]'.*float.tif: "
                                           r"unsupported pixel mode 'F'"):
        dataset(env, [record("float.tif")])[0]
    ds = dataset(env, [record("float.tif"), record("ok.png")], skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"image": 1}


# ------------------------------------------------------------------ item 5
def test_image_paths_must_stay_in_their_folder(env):
    outside = env["root"] / "outside.png"
    env["photo"].save(outside)
    for bad in ("/etc/passwd", "../outside.png", "sub/../../outside.png", str(outside)):
        with pytest.raises(LvrDataError, match=r"record 0: field 'image\[0\]'.*leaves the image "
                                               r"folder.*--allow-images-outside-folder"):
            dataset(env, [record(bad)])
    ds = dataset(env, [record("../outside.png")], allow_images_outside_folder=True)
    assert ds[0]["pixel_values"].shape[0] > 0
    assert len(dataset(env, [record(str(env["imgs"] / "ok.png"))])) == 1  # absolute but inside


def _returns_within(fn, seconds: float, fifo) -> BaseException | None:
    """Run fn in a thread; a FIFO open that blocks is released by opening its write end."""
    box = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))  # unblock the reader, then fail
        t.join(5)
        pytest.fail("opening a FIFO blocked the loader")
    return box[0] if box else None


def test_a_fifo_is_refused_not_waited_on(env):
    fifo = env["imgs"] / "pipe.png"
    os.mkfifo(fifo)
    try:
        err = _returns_within(lambda: dataset(env, [record("pipe.png")])[0], 10, fifo)
        assert isinstance(err, LvrDataError) and "is a FIFO, not a regular file" in str(err)
        err = _returns_within(lambda: dataset(env, [record("pipe.png")], skip_bad=True), 10, fifo)
        assert isinstance(err, ValueError) and "all 1 records are bad" in str(err)
    finally:
        fifo.unlink()


def test_eval_jsonl_paths_are_contained(env, tmp_path):
    jsonl = env["imgs"] / "q.jsonl"

    def write(image):
        jsonl.write_text(json.dumps({"image": image, "question": "Q", "answer": "a"}) + "\n")

    for bad in ("/etc/passwd", "../outside.png"):
        write(bad)
        with pytest.raises(VqaDataError, match=r"line 1 field 'image': .*leaves the image root"):
            read_vqa_jsonl(jsonl)
    write("../outside.png")
    assert read_vqa_jsonl(jsonl, allow_outside_root=True)[0].images[0].name == "outside.png"
    os.mkfifo(env["imgs"] / "pipe2.png")
    write("pipe2.png")
    with pytest.raises(VqaDataError, match="not a regular file"):
        read_vqa_jsonl(jsonl)
    (env["imgs"] / "pipe2.png").unlink()


# ------------------------------------------------------------------ items 7 and 9
def test_empty_records_file_is_named(env):
    with pytest.raises(LvrDataError, match=r"empty.json: \(whole file\): no records"):
        dataset(env, [], name="empty.json")
    (env["root"] / "meta_empty.json").write_text(json.dumps([{"data_path": "empty.json"}]))
    with pytest.raises(LvrDataError, match=r"meta_empty.json.*no records in .*empty.json"):
        LvrSftDataset(env["root"] / "meta_empty.json", tokenizer=env["tok"],
                      image_processor=env["ip"], vocab_size=env["vocab"], **SMALL)


def test_a_records_file_that_is_one_object(env):
    with pytest.raises(LvrDataError, match=r"obj.json: \(whole file\): expected a JSON list of "
                                           r"records, got a JSON object: it looks like a single "
                                           r"record, wrap it in \[ \]"):
        dataset(env, record("ok.png"), name="obj.json")
    with pytest.raises(LvrDataError, match=r"expected a JSON list of records, got a JSON object "
                                           r"\(nor a meta JSON"):
        dataset(env, {"hello": 1}, name="obj2.json")
