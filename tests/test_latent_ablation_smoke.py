"""benchmarks/latent_ablation.py (issue #23's ablation experiment): its data (every arm's records
are the same records, checked against the generator's own facts), its summary arithmetic on
hand-made rows, and the CPU smoke run end to end (every registered method's arm, 1 seed, 2
steps), checked against oracles that do not go through the benchmark: the generator's answers,
the arms x seeds grid, and the baseline that has no latents (its ablations are the identity)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_every_arm_gets_the_same_records(tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from ablation_data import write_arm_data
    from megatron_latent.data.synthetic_interleaved import zoom_crop
    from megatron_latent.data.synthetic_lvr import make_sample

    paths = write_arm_data(tmp_path, seed=3, num=3, val_num=2, min_side=112, max_side=160,
                           difficulty=2, workers=1)
    assert paths["distractors"] > 0  # difficulty 2 draws distractors
    facts = json.loads(Path(paths["facts_val"]).read_text())
    for split, n in (("train", 3), ("val", 2)):
        lvr = json.loads((tmp_path / f"lvr_{split}.json").read_text())
        none = json.loads((tmp_path / f"none_{split}.json").read_text())
        rows = pq.read_table(next((tmp_path / "zebra" / split).rglob("*.parquet"))).to_pylist()
        assert len(lvr) == len(none) == len(rows) == n
        for i, (a, b, row) in enumerate(zip(lvr, none, rows)):
            img, rec, fact = make_sample(3, split, i, 112, 160, 2)  # the generator's oracle
            question = rec["conversations"][0]["value"]
            assert a == rec
            assert b["conversations"][0]["value"] == question and b["bboxes"] == []
            assert b["conversations"][1]["value"] == f"<answer>{fact['answer']}</answer>"
            assert row["Question"].startswith(question.removeprefix("<image>\n") + " ")
            assert row["Final Answer"] == fact["answer"]
            shown = Image.open(tmp_path / "images" / rec["image"])
            assert shown.tobytes() == img.tobytes()
            problem = Image.open(io.BytesIO(row["problem_image_1"]["bytes"]))
            assert problem.tobytes() == img.tobytes()
            crop = Image.open(io.BytesIO(row["reasoning_image_1"]["bytes"]))
            assert crop.tobytes() == zoom_crop(img, rec["bboxes"][0]).tobytes()
            if split == "val":
                assert facts[i]["answer"] == fact["answer"] and facts[i]["box"] == rec["bboxes"][0]


def test_zebra_rows_are_the_interleaved_generators_at_difficulty_0(tmp_path):
    """At the difficulty it supports, data/synthetic_interleaved.make_row writes the same rows
    (text and image bytes) as ablation_data does for the HyLaR / DeepLatent arms."""
    import pyarrow.parquet as pq

    from ablation_data import write_arm_data
    from megatron_latent.data.synthetic_interleaved import make_row

    write_arm_data(tmp_path, seed=5, num=2, val_num=2, min_side=112, max_side=160,
                   difficulty=0, workers=1)
    for split in ("train", "val"):
        rows = pq.read_table(next((tmp_path / "zebra" / split).rglob("*.parquet"))).to_pylist()
        assert rows == [make_row(5, split, i, 112, 160, 1) for i in range(2)]


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(tmp_path):
    from ablation_data import write_arm_data

    for workers in (1, 2):  # 2: spawned worker processes
        write_arm_data(tmp_path / f"w{workers}", seed=3, num=3, val_num=2, min_side=112,
                       max_side=160, difficulty=2, workers=workers)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*")
                   if p.is_file())
    assert len(files) > 10
    assert all((tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()
               for f in files)


def test_summary_mean_std_and_na():
    from latent_ablation import markdown, metrics_of, summarize

    rows = [{"arm": "lvr", "seed": s, "status": "ok", "metrics": {"acc.as_generated": v},
             "na": {}} for s, v in ((0, 0.25), (1, 0.5), (2, 0.75))]
    rows.append({"arm": "hylar", "seed": 0, "status": "failed: RuntimeError: x"})
    got = summarize(rows, ["lvr", "hylar"])
    acc = got["lvr"]["acc.as_generated"]
    assert acc["mean"] == pytest.approx(0.5) and acc["std"] == pytest.approx(0.25)  # sample std
    assert acc["n"] == 3
    assert got["hylar"]["acc.as_generated"]["mean"] is None
    assert got["hylar"]["acc.as_generated"]["na"] == ["failed: RuntimeError: x"]
    # a probe result without latents: every ablation cell is its as-generated accuracy
    res = {"no_latents": True, "mean_latents_per_item": 0.0, "grounding": None,
           "accuracy": {"as_generated": {"accuracy": 0.4}}, "homogeneity": {"generated": None},
           "scale": {}}
    m, na = metrics_of("none", res)
    assert [m[f"acc.{k}"] for k in ("zeros", "mean", "shuffled", "span_removed")] == [0.4] * 4
    assert na["acc.zeros"] == "=" and na["homog.within"] == "no latents"
    s = {"shape": "x", "seeds": [0, 1, 2], "steps": 4, "num_val": 2, "difficulty": 2,
         "global_batch": 2, "deeplatent_stage1_steps": 2}
    md = markdown({"settings": s, "arms": ["lvr", "hylar"], "summary": got, "rows": rows,
                   "command": "c"})
    assert "| accuracy: as generated | 50.0 ± 25.0% | n/a [1] |" in md
    assert "[1] failed: RuntimeError: x" in md


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path):
    """The documented smoke command: every registered method end to end in a subprocess."""
    from megatron_latent.latent import registry

    out = tmp_path / "abl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_ablation.py"),
                           "--shape", "cpu-smoke", "--seeds", "0", "--device", "cpu",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert re.search(r"\[ablation +\d+ s, +\d+%, ETA +\d+ s\] seed 0 lvr: probed", proc.stdout)
    res = json.loads((out / "latent_ablation.json").read_text())
    arms = list(registry.names())
    assert sorted(res["arms"]) == sorted(arms)
    # one row per arm x seed, all run
    assert sorted((r["arm"], r["seed"]) for r in res["rows"]) == sorted((a, 0) for a in arms)
    assert all(r["status"] == "ok" for r in res["rows"]), [r["status"] for r in res["rows"]]
    s = res["settings"]
    assert s["steps"] == 2 and s["deeplatent_stage1_steps"] == 1 and s["seeds"] == [0]
    facts = json.loads((out / "seed0" / "data" / "facts_val.json").read_text())
    rows = {r["arm"]: r for r in res["rows"]}
    for arm, row in rows.items():
        probe = json.loads((out / row["probe_file"]).read_text())
        # the same held-out items for every arm, each with the generator's own answer
        assert [it["index"] for it in probe["items"]] == list(range(s["num_val"])), arm
        assert [it["answer"] for it in probe["items"]] == [f["answer"] for f in facts], arm
        st = [v for v in row["train"].values() if isinstance(v, dict)]
        assert sum(x["steps"] for x in st) == s["steps"], arm  # same step count for all arms
        acc = row["metrics"]["acc.as_generated"]
        ok = sum(it["outputs"]["as_generated"] is not None and
                 _independent_correct(it["outputs"]["as_generated"], it["answer"])
                 for it in probe["items"])
        assert acc == pytest.approx(ok / len(probe["items"])), arm
    # the baseline has no latents: each ablation is the identity, so its accuracy is the
    # as-generated one
    base = rows["none"]["metrics"]
    assert base["latents_per_item"] == 0
    for k in ("zeros", "mean", "shuffled", "span_removed"):
        assert base[f"acc.{k}"] == base["acc.as_generated"]
    # arms with latents generated some; the probe's ablations ran where it can run them
    for arm in ("lvr", "hylar", "deeplatent"):
        assert rows[arm]["metrics"]["latents_per_item"] > 0, arm
    for arm in ("lvr", "hylar", "deeplatent"):
        assert all(rows[arm]["metrics"][f"acc.{k}"] is not None
                   for k in ("zeros", "mean", "shuffled", "span_removed")), arm
    assert rows["lvr"]["metrics"]["ground.regions_top1"] is not None
    dl = rows["deeplatent"]  # no probe targets: its grounding is n/a with the reason
    assert dl["metrics"]["ground.samples_top1"] is None and "targets" in dl["na"][
        "ground.samples_top1"]
    md = (out / "latent_ablation.md").read_text()
    assert md in proc.stdout
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == res["arms"]


def _independent_correct(output: str, answer: str) -> bool:
    """The answer check written apart from eval/answers.py: the last <answer>..</answer> (else
    the whole output), lowercased, edge punctuation and articles dropped, equals the answer."""
    found = re.findall(r"<answer>(.*?)</answer>", output, flags=re.S)
    text = (found[-1] if found else output).lower().strip(" .,;:!?'\"")
    text = " ".join(w for w in text.split() if w not in ("a", "an", "the"))
    return text == answer.lower()


def test_merge_runs_of_one_seed_each(tmp_path):
    """--merge: rows of runs that differ only in their seeds, one table; other differences and
    a seed in two runs are refused."""
    from latent_ablation import main

    settings = {"shape": "x", "steps": 4, "num_val": 2, "difficulty": 2, "global_batch": 2,
                "deeplatent_stage1_steps": 2, "arms": ["lvr"]}
    for seed, acc in ((0, 0.2), (1, 0.4)):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        row = {"arm": "lvr", "seed": seed, "status": "ok", "probe_file": "p.json",
               "metrics": {"acc.as_generated": acc}, "na": {}}
        (d / "latent_ablation.json").write_text(json.dumps(
            {"command": f"run {seed}", "arms": ["lvr"], "rows": [row],
             "settings": {**settings, "seeds": [seed]}}))
    assert main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                 "--out", str(tmp_path / "m")]) == 0
    got = json.loads((tmp_path / "m" / "latent_ablation.json").read_text())
    assert got["settings"]["seeds"] == [0, 1] and len(got["rows"]) == 2
    acc = got["summary"]["lvr"]["acc.as_generated"]
    assert acc["mean"] == pytest.approx(0.3) and acc["n"] == 2
    assert got["rows"][1]["probe_file"] == str((tmp_path / "s1" / "p.json").absolute())
    assert "30.0 ± 14.1%" in (tmp_path / "m" / "latent_ablation.md").read_text()
    assert main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s0"),
                 "--out", str(tmp_path / "m2")]) == 2  # seed 0 twice
    other = json.loads((tmp_path / "s1" / "latent_ablation.json").read_text())
    other["settings"]["steps"] = 5
    (tmp_path / "s1" / "latent_ablation.json").write_text(json.dumps(other))
    assert main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                 "--out", str(tmp_path / "m3")]) == 2
