"""The data of benchmarks/latent_ablation.py: one set of synthetic visual-search records per seed
(megatron_latent/data/synthetic_lvr.py's `make_sample` at a `difficulty`), written in each arm's
format, every arm's record i the same image, question and answer:

    DIR/images/{train,val}_000000.png     the problem images (shared by the JSON formats)
    DIR/lvr_{train,val}.json              LVR: "<lvr>\\n<answer>X</answer>" with the target's box
    DIR/none_{train,val}.json             the no-latent baseline: the same records with the
                                          latent span stripped ("<answer>X</answer>", no box)
    DIR/meta_{lvr,none}[_val].json        meta files of the above
    DIR/zebra/{train,val}/<sub-task>/*.parquet
                                          HyLaR and DeepLatent (Zebra-CoT rows): one reasoning
                                          image, the target's zoomed crop, as
                                          data/synthetic_interleaved.py's `make_row` writes it
    DIR/facts_val.json                    per val record: answer, question kind, box (the
                                          benchmark's own oracle of the answers)

`make_row` itself draws at difficulty 0 only, so the Zebra-CoT rows are built here from the
same `make_sample` records with its text and `zoom_crop` (the same trace for a row of one
reasoning image). Records are drawn in parallel (`workers` processes); the output is the same
for any `workers`.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARM_FORMAT = {"lvr": "lvr", "none": "none", "hylar": "zebra", "deeplatent": "zebra"}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _record(job):
    """One record in every format: (LVR record, baseline record, Zebra-CoT row, val facts)."""
    from megatron_latent.data.synthetic_interleaved import zoom_crop
    from megatron_latent.data.synthetic_lvr import make_sample

    seed, split, i, min_side, max_side, difficulty = job
    img, rec, facts = make_sample(seed, split, i, min_side, max_side, difficulty)
    png = _png(img)
    human, gpt = rec["conversations"]
    baseline = {**rec, "conversations": [human, {"from": "gpt",
                                                 "value": gpt["value"].removeprefix("<lvr>\n")}],
                "bboxes": []}
    question = human["value"].removeprefix("<image>\n")
    what = (f"small {facts['shape']}" if question.startswith("What colour")
            else f"small {facts['colour']} object")
    # data/synthetic_interleaved.make_row's text for one reasoning image
    trace = (f"THOUGHT 1: I look for the {what} and zoom in on it.\n\n"
             f"<image_start>[reasoning_image_1]<image_end> "
             f"THOUGHT 2: The zoomed view shows a {facts['colour']} {facts['shape']}.")
    row = {"Question": f"{question} <image_start>[problem_image_1]<image_end>",
           "Text Reasoning Trace": trace, "Final Answer": facts["answer"],
           "problem_image_1": {"bytes": png, "path": f"{rec['id']}_problem.png"},
           "reasoning_image_1": {"bytes": _png(zoom_crop(img, rec["bboxes"][0])),
                                 "path": f"{rec['id']}_reasoning.png"}}
    kind = "colour" if question.startswith("What colour") else "shape"
    fact = {"id": rec["id"], "answer": facts["answer"], "kind": kind, "box": rec["bboxes"][0],
            "distractors": len(facts.get("distractors", []))}
    return rec, baseline, row, png, fact


def write_arm_data(out_dir, *, seed: int, num: int, val_num: int, min_side: int, max_side: int,
                   difficulty: int, workers: int = 1) -> dict:
    """Write every arm's data for `seed` under `out_dir` (module docstring) -> the paths:
    {arm format: {"train": path, "val": path}}, plus "facts_val" and "distractors" (mean per
    record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_latent.data.synthetic_interleaved import ROW_GROUP, SUBTASK

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("Question", pa.string()), ("Text Reasoning Trace", pa.string()),
                        ("Final Answer", pa.string()), ("problem_image_1", image),
                        ("reasoning_image_1", image)])
    paths: dict = {"lvr": {}, "none": {}, "zebra": {}}
    n_distractors = []
    for split, n in (("train", num), ("val", val_num)):
        jobs = [(seed, split, i, min_side, max_side, difficulty) for i in range(n)]
        if workers > 1:  # spawned: the caller may hold threads and CUDA already (no fork)
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                got = list(pool.map(_record, jobs, chunksize=max(1, n // (4 * workers))))
        else:
            got = [_record(j) for j in jobs]
        lvr, base, rows, facts = [], [], [], []
        for rec, baseline, row, png, fact in got:
            (out / "images" / rec["image"]).write_bytes(png)
            lvr.append(rec)
            base.append(baseline)
            rows.append(row)
            facts.append(fact)
            n_distractors.append(fact["distractors"])
        for fmt, records in (("lvr", lvr), ("none", base)):
            data = out / f"{fmt}_{split}.json"
            data.write_text(json.dumps(records, indent=1) + "\n")
            meta = out / f"meta_{fmt}{'' if split == 'train' else '_val'}.json"
            meta.write_text(json.dumps([{"data_path": data.name, "image_folder": "images",
                                         "ds_name": f"vsearch_{fmt}"}]) + "\n")
            paths[fmt][split] = str(meta)
        folder = out / "zebra" / split / SUBTASK
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       folder / f"{split}-00000-of-00001.parquet", row_group_size=ROW_GROUP)
        paths["zebra"][split] = str(out / "zebra" / split)
        if split == "val":
            (out / "facts_val.json").write_text(json.dumps(facts, indent=1) + "\n")
            paths["facts_val"] = str(out / "facts_val.json")
    paths["distractors"] = sum(n_distractors) / max(1, len(n_distractors))
    return paths
