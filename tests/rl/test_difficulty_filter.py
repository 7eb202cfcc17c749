"""tools/filter_by_difficulty.py end to end on the tiny checkpoint (subprocesses, CPU).

The pass rates come from an oracle reward written here, not from the model: a row's reference is
K, and the oracle passes the first K of every SAMPLES consecutive samples it scores (the tool
scores a prompt's samples side by side, prompt after prompt). So row K has pass rate K/SAMPLES
whatever the model writes, and the kept set follows by hand from the thresholds."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_latent.rl.data import load_rl_prompts
from megatron_latent.testing.samples import sample_photo
from megatron_latent.testing.tools import REPO, load_tool

SAMPLES = 4
ORACLE = f'''from megatron_latent.rl.rewards import register_reward

_scored = [0]


def oracle(completion, reference):
    k = _scored[0] % {SAMPLES}
    _scored[0] += 1
    return 1.0 if k < int(reference) else 0.0


register_reward("oracle", oracle)
'''
KS = [0, 1, 2, 3, 4, 2]  # passes per row; a last, over-long row is never sampled
LONG = "word " * 300  # > --seq-length 200 - --max-new-tokens 4 tokens
SMALL = ["--samples", SAMPLES, "--max-new-tokens", 4, "--seq-length", 200, "--min-pixels", 3136,
         "--max-pixels", 12544, "--micro-batch-size", 8, "--rewards", "oracle"]


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a world of one, whatever launched pytest
    return env


def _launch(*args, launcher=()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *launcher, str(REPO / "tools/filter_by_difficulty.py"),
                             *map(str, args)], env=_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}"
    return out


def _png(size=(56, 56)) -> bytes:
    buf = io.BytesIO()
    sample_photo("astronaut").resize(size).save(buf, format="PNG")
    return buf.getvalue()


def _json_records(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    sample_photo("astronaut").resize((56, 56)).save(folder / "img" / "a.png")
    recs = [{"id": f"r{i}", "image": "img/a.png", "extra": {"n": i},
             "conversations": [{"from": "human", "value": f"Question {i}?"},
                               {"from": "gpt", "value": str(k)}]} for i, k in enumerate(KS)]
    recs.append({"id": "long", "image": ["img/a.png"],
                 "conversations": [{"from": "human", "value": LONG},
                                   {"from": "gpt", "value": "0"}]})
    path = folder / "rl.json"
    path.write_text(json.dumps(recs, indent=1))
    return path


def _parquet_dir(folder: Path) -> Path:
    """Two files (the rows split 4 + 3), an extra column, two row groups in the first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    img = {"bytes": _png(), "path": None}
    problems = [f"<image>Question {i}?" for i in range(len(KS))] + ["<image>" + LONG]
    answers = [str(k) for k in KS] + ["0"]
    for name, rows in (("a.parquet", range(0, 4)), ("b.parquet", range(4, 7))):
        table = pa.table({"problem": [problems[i] for i in rows],
                          "answer": [answers[i] for i in rows],
                          "images": [[img] for _ in rows],
                          "score": pa.array([float(i) for i in rows], pa.float32())})
        pq.write_table(table, folder / name, row_group_size=2)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_ckpts, tmp_path_factory):
    """A records-JSON run (output beside the input, over a stale file with --overwrite-output)
    and a parquet-directory run (--min-pass-rate, --keep-skipped), side by side."""
    root = tmp_path_factory.mktemp("difficulty")
    (root / "oracle.py").write_text(ORACLE)
    records, pq_dir = _json_records(root / "json"), _parquet_dir(root / "pq")
    json_out = records.with_name("rl.hard.json")
    json_out.write_text("stale")
    common = ["--load", tiny_ckpts["tiny-a"], "--reward-module", root / "oracle.py", *SMALL]
    procs = [_launch(*common, "--data", records, "--output", json_out, "--overwrite-output"),
             _launch(*common, "--data", pq_dir, "--output", root / "pq_hard",
                     "--min-pass-rate", 0.25, "--keep-skipped")]
    outs = [_finish(p) for p in procs]
    return dict(root=root, records=records, json_out=json_out, json_stdout=outs[0],
                pq=pq_dir, pq_out=root / "pq_hard", pq_stdout=outs[1], common=common)


def _report(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".report.json").read_text())


def test_json_keeps_pass_rate_at_most_max(runs):
    records = json.loads(runs["records"].read_text())
    kept = json.loads(runs["json_out"].read_text())
    want = [i for i, k in enumerate(KS) if k / SAMPLES <= 0.6]  # K <= 2; the long row dropped
    assert want == [0, 1, 2, 5]
    assert kept == [records[i] for i in want]  # the records unchanged (same folder: no re-base)
    assert [p.id for p in load_rl_prompts(runs["json_out"])] == ["r0", "r1", "r2", "r5"]
    report = _report(runs["json_out"])
    assert report["totals"] == {
        "rows": 7, "kept": 4, "dropped": 3, "dropped_too_easy": 2, "dropped_too_hard": 0,
        "skipped_for_length": 1, "skipped_kept": 0,
        "passes_histogram": {"0": 1, "1": 1, "2": 2, "3": 1, "4": 1}}
    rows = report["rows"]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(6)] + ["long"]
    assert [r["passes"] for r in rows] == KS + [None]
    assert [r["pass_rate"] for r in rows] == [k / SAMPLES for k in KS] + [None]
    assert [r["kept"] for r in rows] == [True, True, True, False, False, True, False]
    assert rows[-1]["skipped"] and not any(r["skipped"] for r in rows[:-1])
    out = runs["json_stdout"]
    assert "kept 4, dropped 3 of 7 prompts" in out
    assert "dropped for pass rate: 2 above 0.6" in out
    assert "skipped for length (prompt > 196 tokens): 1, dropped" in out
    assert "ETA" in out


def test_parquet_directory_round_trip(runs):
    import pyarrow.parquet as pq

    # 0.25 <= K/4 <= 0.6: K in {1, 2}; the skipped row (6) kept by --keep-skipped
    want = {i for i, k in enumerate(KS) if 0.25 <= k / SAMPLES <= 0.6} | {6}
    assert want == {1, 2, 5, 6}
    assert sorted(p.name for p in runs["pq_out"].iterdir()) == ["a.parquet", "b.parquet"]
    for name, first in (("a.parquet", 0), ("b.parquet", 4)):
        src, dst = pq.read_table(runs["pq"] / name), pq.read_table(runs["pq_out"] / name)
        assert dst.schema == src.schema  # every column, types and metadata
        rows = [i - first for i in sorted(want) if first <= i < first + src.num_rows]
        assert dst.to_pylist() == src.take(rows).to_pylist()
    report = _report(runs["pq_out"])
    assert report["totals"]["kept"] == 4 and report["totals"]["dropped_too_hard"] == 1
    assert report["totals"]["dropped_too_easy"] == 2 and report["totals"]["skipped_kept"] == 1
    assert [r["id"] for r in report["rows"]][:2] == ["a.parquet#0", "a.parquet#1"]
    assert len(load_rl_prompts(runs["pq_out"])) == 4
    assert "1 below 0.25" in runs["pq_stdout"] and "kept (--keep-skipped)" in runs["pq_stdout"]


# ---------------------------------------------------------------------- in process, no model
@pytest.fixture(scope="module")
def tool():
    return load_tool("filter_by_difficulty")


def _refused(tool, capsys, *args) -> str:
    assert tool.main([*map(str, args)]) == 2
    return capsys.readouterr().err


def test_refuses_to_touch_the_input(tool, runs, capsys):
    records, pq_dir = runs["records"], runs["pq"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (records, *pq_dir.iterdir())}
    base = ["--load", "unused", "--data"]
    err = _refused(tool, capsys, *base, records, "--output", records, "--overwrite-output")
    assert "is the input" in err
    err = _refused(tool, capsys, *base, pq_dir, "--output", pq_dir / "sub", "--overwrite-output")
    assert "is inside the input" in err
    err = _refused(tool, capsys, *base, pq_dir, "--output", pq_dir.parent, "--overwrite-output")
    assert "contains the input" in err
    # the report would land on the input: OUTPUT.report.json == --data
    report_clash = records.parent / "in.report.json"
    report_clash.write_text("[]")
    err = _refused(tool, capsys, *base, report_clash, "--output", records.parent / "in")
    assert "the report" in err and "is the input" in err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before


def test_refuses_an_existing_output(tool, runs, capsys):
    out = runs["json_out"]
    kept = out.read_bytes()
    err = _refused(tool, capsys, "--load", "unused", "--data", runs["records"], "--output", out)
    assert "already exists" in err and "--overwrite-output" in err
    assert out.read_bytes() == kept
    foreign = runs["root"] / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    err = _refused(tool, capsys, "--load", "unused", "--data", runs["pq"], "--output", foreign,
                   "--overwrite-output")
    assert "notes.txt" in err and (foreign / "notes.txt").read_text() == "mine"


def test_refuses_a_meta_json(tool, runs, capsys):
    meta = runs["root"] / "json" / "meta.json"
    meta.write_text(json.dumps({"rl": {"data_path": "rl.json"}}))
    err = _refused(tool, capsys, "--load", "unused", "--data", meta, "--output",
                   runs["root"] / "meta_out.json")
    assert "meta JSON" in err


def test_json_output_elsewhere_rebases_image_paths(tool, runs, tmp_path):
    prompts = load_rl_prompts(runs["records"])
    out = tmp_path / "deeper" / "kept.json"
    tool.write_output("json", runs["records"], out, prompts, [1, 6])
    got = load_rl_prompts(out)
    assert [p.id for p in got] == ["r1", "long"]
    assert [Path(p.images[0]).resolve() for p in got] == \
        [Path(prompts[i].images[0]).resolve() for i in (1, 6)]
    raw = json.loads(out.read_text())
    assert isinstance(raw[1]["image"], list) and raw[0]["extra"] == {"n": 1}


def test_parquet_file_round_trip(tool, runs, tmp_path):
    import pyarrow.parquet as pq

    src = runs["pq"] / "a.parquet"
    out = tmp_path / "kept.parquet"
    tool.write_output("parquet", src, out, load_rl_prompts(src), [0, 3])
    assert pq.read_table(out).to_pylist() == pq.read_table(src).take([0, 3]).to_pylist()
    assert pq.read_schema(out) == pq.read_schema(src)


# ---------------------------------------------------------------------- data parallel
@pytest.mark.slow
def test_two_data_parallel_ranks_agree(runs):
    out = runs["root"] / "dp" / "rl.hard.json"
    with socket.socket() as s:  # torchrun's static rendezvous needs a real port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _launch(*runs["common"], "--data", runs["records"], "--output", out,
                   launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(port)))
    stdout = _finish(proc, timeout=300)
    assert "2 data-parallel rank(s)" in stdout
    single, dp = _report(runs["json_out"]), _report(out)
    assert dp["rows"] == single["rows"] and dp["totals"] == single["totals"]
    assert dp["settings"]["data_parallel_size"] == 2
    # image paths re-based to the output's folder, records otherwise unchanged
    kept = json.loads(out.read_text())
    assert [r["image"] for r in kept] == ["../json/img/a.png"] * 4
    assert [r["id"] for r in kept] == ["r0", "r1", "r2", "r5"]
