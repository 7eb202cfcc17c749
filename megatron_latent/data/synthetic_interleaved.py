"""A small synthetic Zebra-CoT-style set (HyLaR's SFT format) on real photos, for tests and demos.

Each row is synthetic_lvr's visual-search sample: the problem image is a photo with one small
coloured shape; the reasoning image is a zoomed crop around it (the box, grown to at least
twice its size and 32 px, clipped to the image), so the answer (its colour or its shape) can be read
from the crop. With `reasoning_images=n` > 1 the trace zooms in n steps (crops 2^(n-1), ..., 2, 1
times that size; "THOUGHT k: I zoom in closer." before image k > 1): several assistant images, as
DeepLatent's interleaved samples have. Row (columns as Zebra-CoT, images as HF Image structs
{"bytes": PNG, "path"}), for n = 1:

    Question:             "What colour is the small square? <image_start>[problem_image_1]<image_end>"
    Text Reasoning Trace: "THOUGHT 1: I look for the small square and zoom in on it.
                           <image_start>[reasoning_image_1]<image_end> THOUGHT 2: The zoomed view
                           shows a red square."
    Final Answer:         "red"

Layout written by :func:`make_synthetic_interleaved`::

    DIR/train/Synthetic - Visual Search/train-00000-of-00001.parquet   (ZebraCotDataset(DIR/train))
    DIR/val/Synthetic - Visual Search/val-00000-of-00001.parquet

Deterministic given the seed (the rows are synthetic_lvr.make_sample's, so the same seed gives the
same photos, targets and questions as the LVR set).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from megatron_latent.data.synthetic_lvr import make_sample
from megatron_latent.fsutil import atomic_dir, check_writable

SUBTASK = "Synthetic - Visual Search"
ROW_GROUP = 32  # rows per parquet row group (small, as HF image datasets write them)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def zoom_crop(img: Image.Image, box, grow: float = 1) -> Image.Image:
    """The region around a normalised xyxy box, grown to >= 2x the box and >= 32 px a side,
    times `grow`."""
    w, h = img.size
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0, 16) * grow
    l, t = max(0, round(cx - half)), max(0, round(cy - half))
    return img.crop((l, t, min(w, round(cx + half)), min(h, round(cy + half))))


def make_row(seed: int, split: str, index: int, min_side: int = 224, max_side: int = 448,
             reasoning_images: int = 1) -> dict:
    img, rec, facts = make_sample(seed, split, index, min_side, max_side)
    question = rec["conversations"][0]["value"].removeprefix("<image>\n")
    what = f"small {facts['shape']}" if question.startswith("What colour") else \
        f"small {facts['colour']} object"
    n = reasoning_images
    steps = [f"THOUGHT 1: I look for the {what} and zoom in on it.\n\n"] + \
        [f"THOUGHT {k}: I zoom in closer.\n\n" for k in range(2, n + 1)]
    trace = "".join(f"{step}<image_start>[reasoning_image_{k}]<image_end> "
                    for k, step in enumerate(steps, 1))
    trace += f"THOUGHT {n + 1}: The zoomed view shows a {facts['colour']} {facts['shape']}."
    row = {"Question": f"{question} <image_start>[problem_image_1]<image_end>",
           "Text Reasoning Trace": trace, "Final Answer": facts["answer"],
           "problem_image_1": {"bytes": _png(img), "path": f"{rec['id']}_problem.png"}}
    for k in range(1, n + 1):  # the last crop is the tightest (the one crop of n = 1)
        crop = zoom_crop(img, rec["bboxes"][0], grow=2 ** (n - k))
        suffix = "" if n == 1 else f"_{k}"
        row[f"reasoning_image_{k}"] = {"bytes": _png(crop), "path": f"{rec['id']}_reasoning{suffix}.png"}
    return row


def make_synthetic_interleaved(out_dir, num: int = 200, val_num: int = 16, seed: int = 0,
                               min_side: int = 224, max_side: int = 448, overwrite: bool = False,
                               *, progress: bool = True, reasoning_images: int = 1) -> Path:
    """Write the set (layout in the module docstring) to `out_dir`, built beside it and renamed
    into place; an existing non-empty `out_dir` is replaced only when `overwrite`.
    `reasoning_images`: zoom steps (assistant images) per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if num < 1 or val_num < 0:
        raise ValueError(f"need num >= 1 and val_num >= 0, got num={num}, val_num={val_num}")
    if reasoning_images < 1:
        raise ValueError(f"need reasoning_images >= 1, got {reasoning_images}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, overwrite)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("Question", pa.string()), ("Text Reasoning Trace", pa.string()),
                        ("Final Answer", pa.string()), ("problem_image_1", image)]
                       + [(f"reasoning_image_{k}", image) for k in range(1, reasoning_images + 1)])
    with atomic_dir(out_dir) as tmp:
        bar = tqdm(total=num + val_num, desc="synthetic_interleaved", unit="row", disable=not progress)
        for split, n in (("train", num), ("val", val_num)):
            if not n:
                continue
            rows = []
            for i in range(n):
                rows.append(make_row(seed, split, i, min_side, max_side, reasoning_images))
                bar.update(1)
            folder = tmp / split / SUBTASK
            folder.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                           folder / f"{split}-00000-of-00001.parquet", row_group_size=ROW_GROUP)
        bar.close()
    return out_dir
