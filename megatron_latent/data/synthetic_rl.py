"""A small synthetic RL prompt set in HyLaR-RL-Data's parquet schema (verl/EasyR1's
`RLHFDataset`), for tests and demos; rl/data.load_rl_prompts reads it.

Rows are synthetic_lvr's visual-search samples (a photo with one small coloured shape; the
answer, its colour or its shape, is one word read from the image). Every third row has two images
and text between them; the question is about the second, the first is a distractor photo:

    {"problem": "<image>What colour is the small square?", "answer": "red",
     "images": [{"bytes": PNG}]}
    {"problem": "Picture A: <image> Picture B: <image> In picture B: What shape is the small red
     object?", "answer": "square", "images": [{"bytes": PNG}, {"bytes": PNG}]}

Written as DIR/train-00000-of-00001.parquet, ROW_GROUP rows per row group. Deterministic given
the seed (the rows' photos are synthetic_lvr.make_sample's for split "rl").
"""

from __future__ import annotations

from pathlib import Path

from megatron_latent.data.synthetic_interleaved import _png
from megatron_latent.data.synthetic_lvr import make_sample
from megatron_latent.fsutil import atomic_dir, check_writable

SPLIT = "rl"
ROW_GROUP = 8  # small, so that tests cross row groups
FILE_NAME = "train-00000-of-00001.parquet"


def make_row(seed: int, index: int, min_side: int = 112, max_side: int = 224) -> dict:
    img, rec, facts = make_sample(seed, SPLIT, index, min_side, max_side)
    question = rec["conversations"][0]["value"].removeprefix("<image>\n")
    if index % 3 != 2:
        return {"problem": "<image>" + question, "answer": facts["answer"],
                "images": [{"bytes": _png(img)}]}
    other, _, _ = make_sample(seed, SPLIT + "_distractor", index, min_side, max_side)
    return {"problem": f"Picture A: <image> Picture B: <image> In picture B: {question}",
            "answer": facts["answer"], "images": [{"bytes": _png(other)}, {"bytes": _png(img)}]}


def make_synthetic_rl_parquet(out_dir, num: int = 32, seed: int = 0, min_side: int = 112,
                              max_side: int = 224, overwrite: bool = False) -> Path:
    """Write `num` rows (layout in the module docstring) to `out_dir`, built beside it and
    renamed into place (an existing non-empty `out_dir` is replaced only when `overwrite`);
    return `out_dir`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if num < 1:
        raise ValueError(f"need num >= 1, got {num}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, overwrite)
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary())])))])
    rows = [make_row(seed, i, min_side, max_side) for i in range(num)]
    with atomic_dir(out_dir) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp / FILE_NAME,
                       row_group_size=ROW_GROUP)
    return out_dir
