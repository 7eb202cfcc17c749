"""Offline difficulty filter for RL prompts (DeepLatent, spec 2.9: "accuracy threshold 0.6";
Monet keeps the same 0-0.6 window): sample --samples completions per prompt with the model's RL
rollout policy and keep the prompts it solves at a pass rate <= --max-pass-rate.

    python tools/filter_by_difficulty.py --load ckpt/deeplatent7b-sft --data data/thyme_rl \\
        --output data/thyme_rl_hard --samples 8 --max-pass-rate 0.6 \\
        --temperature 0.5 --top-k 0 --max-new-tokens 2048 --seq-length 10240
    torchrun --nproc-per-node 8 tools/filter_by_difficulty.py --load CKPT --data D --output O

--load: a megatron_latent checkpoint or an HF directory (as tools/generate.py). --data: what
train_grpo.py reads (rl/data.py): a .parquet file or a directory of them, or a records JSON.
Prompts are built as the RL loop builds them (rl/step_data.PromptBuilder) and sampled with the
method's RL decode program; the sampling, length and pixel defaults are train_grpo.py's, so give
the RL run's values. A sample passes when its --rewards total (default: `accuracy`, the method's
own where it has one; a --judge re-scores the wrong ones) is >= --pass-threshold. A prompt is
kept when --min-pass-rate <= pass rate <= --max-pass-rate (both inclusive; no lower bound by
default). Prompts longer than --seq-length - --max-new-tokens are not sampled: counted and
dropped, or kept with --keep-skipped.

Writes the kept rows in the input's own format: parquet -> parquet (every column and the schema
kept; a directory -> a directory of the same file names), records JSON -> a JSON list of the
kept records unchanged (image paths re-based when --output is in another folder; a meta JSON:
filter each records file it lists). Also OUTPUT.report.json: per row index, id, passes, pass
rate, skipped, kept; the totals; a histogram of passes. --output is never the input (nor inside
it, nor containing it); an existing one is replaced only with --overwrite-output. Progress with
an ETA on stdout. Under torchrun each data-parallel rank samples a slice and rank 0 writes;
results are deterministic for a given --seed, --micro-batch-size and data-parallel size.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it

PROGRESS_EVERY_S = 10.0


def _rl_default(name: str):
    from megatron_latent.rl.loop import GRPOConfig

    return GRPOConfig.__dataclass_fields__[name].default


def parse_args(argv=None):
    from megatron_latent import checkpointing
    from megatron_latent.inference.loading import add_latent_args

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--load", "--ckpt", dest="load", required=True,
      help="megatron_latent checkpoint or HF Qwen2.5-VL dir")
    a("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    a("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    a("--spec", choices=["local", "te"], default="local", help="layer spec")
    a("--dtype", choices=sorted(checkpointing.DTYPES), default=None,
      help="parameter dtype (default: the checkpoint's)")
    a("--data", required=True, help="RL prompts: .parquet file or directory, or records JSON")
    a("--output", required=True, help="the kept rows, in the input's format")
    a("--overwrite-output", action="store_true",
      help="replace an existing --output (never the input)")
    a("--samples", type=int, default=8, help="completions per prompt")
    a("--max-pass-rate", type=float, default=0.6, help="keep pass rate <= this")
    a("--min-pass-rate", type=float, default=None,
      help="keep pass rate >= this (default: no bound; 0 also keeps the unsolved)")
    a("--pass-threshold", type=float, default=1.0, help="a sample passes when its reward >= this")
    a("--keep-skipped", action="store_true",
      help="keep prompts too long to sample (default: drop them)")
    a("--rewards", default="accuracy", help='what counts as correct: "name[:weight],..."')
    a("--reward-module", default=None, help="module or .py file registering rewards")
    a("--judge", default=None, help='"module:function" re-judging answers the rules score wrong')
    add_latent_args(p)  # --system, --answer-prefix, --latent-method/-mode/-steps/-threshold
    a("--temperature", type=float, default=_rl_default("temperature"))
    a("--top-p", type=float, default=_rl_default("top_p"))
    a("--top-k", type=int, default=_rl_default("top_k"), help="0: off")
    a("--max-new-tokens", type=int, default=_rl_default("max_new_tokens"))
    a("--seq-length", type=int, default=_rl_default("seq_length"), help="prompt + completion")
    a("--min-pixels", type=int, default=_rl_default("min_pixels"))
    a("--max-pixels", type=int, default=_rl_default("max_pixels"))
    a("--micro-batch-size", type=int, default=64, help="rollouts per generate call")
    a("--seed", type=int, default=_rl_default("seed"))
    a("--cuda-graphs", action="store_true", help="graphed decode steps (GPU, PP = 1)")
    args = p.parse_args(argv)
    for name in ("samples", "micro_batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.max_pass_rate <= 1.0:
        p.error(f"--max-pass-rate must be in [0, 1], got {args.max_pass_rate}")
    if args.min_pass_rate is not None and not 0.0 <= args.min_pass_rate <= args.max_pass_rate:
        p.error(f"--min-pass-rate must be in [0, --max-pass-rate], got {args.min_pass_rate}")
    if args.seq_length <= args.max_new_tokens:
        p.error(f"--seq-length {args.seq_length} leaves no room for a prompt with "
                f"--max-new-tokens {args.max_new_tokens}")
    return args


# ---------------------------------------------------------------------- paths and formats
def input_kind(data: Path) -> str:
    """How rl/data.load_rl_prompts reads `data`: "parquet-dir", "parquet" or "json"."""
    return "parquet-dir" if data.is_dir() else "parquet" if data.suffix == ".parquet" else "json"


def check_paths(data: Path, out: Path, overwrite: bool) -> Path:
    """Refuse an --output that is, holds or sits inside the input, or exists (without
    --overwrite-output, which replaces only a previous output). -> the report's path."""
    data, out = data.resolve(), out.resolve()
    report = out.with_name(out.name + ".report.json")
    for path, what in ((out, "--output"), (report, "the report")):
        if path == data or path.is_relative_to(data) or data.is_relative_to(path):
            rel = ("is" if path == data else "is inside" if path.is_relative_to(data)
                   else "contains")
            raise ValueError(f"{what} {path} {rel} the input --data {data}: choose another "
                             "--output (the input is never written)")
    want_dir = data.is_dir()
    if out.exists():
        if out.is_dir() != want_dir:
            raise FileExistsError(f"--output {out} exists and is a "
                                  f"{'directory' if out.is_dir() else 'file'}; the output of "
                                  f"--data {data} is a {'directory' if want_dir else 'file'}")
        foreign = [f.name for f in out.iterdir() if f.suffix != ".parquet"] if want_dir else []
        if not overwrite or foreign:
            why = (f"it holds what this tool does not write: {foreign[:5]}" if foreign else
                   "pass --overwrite-output to replace it")
            raise FileExistsError(f"--output {out} already exists; {why}")
    if report.exists() and (not overwrite or report.is_dir()):
        raise FileExistsError(f"{report} already exists (pass --overwrite-output to replace it)")
    return report


def read_records(data: Path, n_prompts: int) -> list:
    """The records JSON's raw list (one per prompt); ValueError for a meta JSON."""
    raw = json.loads(data.read_text(encoding="utf-8"))
    if not isinstance(raw, list) or len(raw) != n_prompts:
        raise ValueError(f"--data {data}: a meta JSON (it lists records files); filter each "
                         "records file it lists instead")
    return raw


def _rebased(record: dict, src: Path, dst: Path) -> dict:
    """`record` with relative image paths re-based from folder `src` to `dst` (rl/data.py reads
    them relative to the records file's folder)."""
    if src == dst:
        return record
    key = "image" if "image" in record else "images"
    move = (lambda p: p if os.path.isabs(p) else os.path.relpath(src / p, dst))
    value = record[key]
    return {**record, key: move(value) if isinstance(value, str) else [move(v) for v in value]}


def _write_parquet(src: Path, dst: Path, keep: set[int], rows_per_group: int = 64) -> None:
    """The rows of `src` whose index is in `keep`, streamed, with `src`'s schema (metadata too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(src) as pf, pq.ParquetWriter(dst, pf.schema_arrow) as writer:
        row, pending = 0, []
        for batch in pf.iter_batches(batch_size=8):
            take = [j for j in range(batch.num_rows) if row + j in keep]
            row += batch.num_rows
            if take:
                pending.append(batch.take(pa.array(take)))
            if sum(b.num_rows for b in pending) >= rows_per_group:
                writer.write_table(pa.Table.from_batches(pending, schema=pf.schema_arrow))
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema=pf.schema_arrow))


def write_output(kind: str, data: Path, out: Path, prompts, kept: list[int]) -> None:
    """The kept prompts (global indices) in the input's format, written atomically."""
    import tempfile

    from megatron_latent.fsutil import atomic_dir, write_text_atomic

    keep = set(kept)
    if kind == "json":
        raw = read_records(data, len(prompts))
        src, dst = data.resolve().parent, out.resolve().parent
        text = json.dumps([_rebased(raw[i], src, dst) for i in kept], ensure_ascii=False,
                          indent=2)
        write_text_atomic(out, text + "\n")
        return
    starts = prompts.starts  # ParquetPrompts: global index of each file's first row
    files = [(f.path, {i - starts[k] for i in keep if starts[k] <= i < starts[k + 1]})
             for k, f in enumerate(prompts.files)]
    if kind == "parquet-dir":
        with atomic_dir(out) as tmp:
            for path, rows in files:
                _write_parquet(path, tmp / path.name, rows)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        (path, rows), = files
        _write_parquet(path, Path(tmp), rows)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------- sampling and scoring
class Progress:
    """A line at most every PROGRESS_EVERY_S seconds (and at the end), with an ETA."""

    def __init__(self, enabled: bool, total: int, dp: int):
        self.enabled, self.total, self.dp = enabled, total, dp
        self.start = self.last = time.monotonic()
        self.shown = -1

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if (not self.enabled or done == self.shown
                or (now - self.last < PROGRESS_EVERY_S and done < self.total)):
            return
        self.last, self.shown, spent = now, done, now - self.start
        eta = f"{spent / done * (self.total - done):.0f} s" if done else "?"
        where = f" (rank 0's share; {self.dp} ranks)" if self.dp > 1 else ""
        print(f"[filter] {done}/{self.total} prompts{where} "
              f"({100 * done / max(self.total, 1):.0f}%), {spent:.0f} s, ETA {eta}", flush=True)


def score_rows(indices, prompts, builder, generator, scoring, a, dp_rank: int,
               progress) -> list[dict]:
    """One row per index: {"index", "id", "passes" (None when skipped for length), "skipped"}.
    Prompts go to the generator `--micro-batch-size` rollouts at a time, a prompt's samples
    side by side; each window's samples are scored together, prompt after prompt."""
    from megatron_latent.rl.rewards import score_completions

    S, mbs = a.samples, a.micro_batch_size
    rows, window, calls = [], [], 0

    def flush():
        nonlocal calls
        rollouts = [p for _, _, p in window for _ in range(S)]
        comps = []
        for k in range(0, len(rollouts), mbs):
            comps += generator.generate(rollouts[k:k + mbs], builder.sampling(calls, dp_rank))
            calls += 1
        recs = [rec for _, rec, _ in window for _ in range(S)]
        total, _ = score_completions(
            [builder.completion_text(c) for c in comps], [r.reference for r in recs],
            scoring.spec, [f"{r.id}/{k % S}" for k, r in enumerate(recs)], scoring.known,
            judge=scoring.judge, questions=[r.question for r in recs] if scoring.judge else None)
        passes = (total >= a.pass_threshold - 1e-6).view(len(window), S).sum(1).tolist()
        rows.extend({"index": i, "id": rec.id, "passes": int(n), "skipped": False}
                    for (i, rec, _), n in zip(window, passes))
        window.clear()
        progress(len(rows))

    for i in indices:
        rec = prompts[i]  # a parquet row's image bytes are read here
        built, _, _, skipped = builder.build([rec], allow_empty=True)
        if skipped:
            rows.append({"index": i, "id": rec.id, "passes": None, "skipped": True})
            continue
        window.append((i, rec, built[0]))
        if len(window) * S >= mbs:
            flush()
    if window:
        flush()
    progress(len(rows))
    return rows


def decide(rows: list[dict], a) -> dict:
    """Adds "pass_rate" and "kept" to each row -> the totals."""
    eps = 1e-9  # rates are k / samples; the bounds are inclusive
    low = -math.inf if a.min_pass_rate is None else a.min_pass_rate
    easy = hard = skipped = 0
    hist = [0] * (a.samples + 1)
    for r in rows:
        if r["skipped"]:
            r["pass_rate"], r["kept"] = None, a.keep_skipped
            skipped += 1
            continue
        rate = r["pass_rate"] = r["passes"] / a.samples
        hist[r["passes"]] += 1
        easy += rate > a.max_pass_rate + eps
        hard += rate < low - eps
        r["kept"] = low - eps <= rate <= a.max_pass_rate + eps
    kept = sum(r["kept"] for r in rows)
    return {"rows": len(rows), "kept": kept, "dropped": len(rows) - kept,
            "dropped_too_easy": easy, "dropped_too_hard": hard,
            "skipped_for_length": skipped, "skipped_kept": skipped if a.keep_skipped else 0,
            "passes_histogram": {str(k): n for k, n in enumerate(hist)}}


def summary(totals: dict, a, out: Path) -> str:
    t, limit = totals, a.seq_length - a.max_new_tokens
    low = ("" if a.min_pass_rate is None
           else f", {t['dropped_too_hard']} below {a.min_pass_rate}")
    skipped = ("kept (--keep-skipped)" if a.keep_skipped
               else "dropped (--keep-skipped keeps them)")
    return (f"kept {t['kept']}, dropped {t['dropped']} of {t['rows']} prompts -> {out}\n"
            f"dropped for pass rate: {t['dropped_too_easy']} above {a.max_pass_rate}{low}\n"
            f"skipped for length (prompt > {limit} tokens): {t['skipped_for_length']}, {skipped}\n"
            f"passes out of {a.samples}: "
            + ", ".join(f"{k}: {n}" for k, n in t["passes_histogram"].items()))


# ---------------------------------------------------------------------- main
def _rollout_config(a):
    """What PromptBuilder reads, as train_grpo.py would set it."""
    from megatron_latent.rl.loop import GRPOConfig

    return GRPOConfig(data_path=a.data, seq_length=a.seq_length, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                      min_pixels=a.min_pixels, max_pixels=a.max_pixels, seed=a.seed,
                      system_prompt=a.system, answer_prefix=a.answer_prefix)


def _prompt_builder(a, mcfg, method, processor):
    """rl/step_data.PromptBuilder with the method's tokens and prompt layout (as run_grpo)."""
    from megatron_latent import checkpointing
    from megatron_latent.rl.step_data import PromptBuilder

    tok_dir = Path(a.load) / "hf" if checkpointing.is_checkpoint(a.load) else Path(a.load)
    builder = PromptBuilder(str(tok_dir), mcfg, _rollout_config(a))
    method.add_tokens(builder.tokenizer, mcfg.vocab_size)
    ids = [builder.tokenizer.convert_tokens_to_ids(t) for t in method.tokens]
    if ids != [processor.tokenizer.convert_tokens_to_ids(t) for t in method.tokens]:
        raise RuntimeError(f"the method's token ids differ between the two tokenizers: {ids}")
    builder.images_first = method.prompt_images_first
    return builder


def _scoring(a, method):
    from megatron_latent.rl.collect import Scoring
    from megatron_latent.rl.rewards import load_judge, parse_reward_spec, with_method_rewards

    known = with_method_rewards(method)
    spec = parse_reward_spec(a.rewards, known)
    if a.judge and "accuracy" not in dict(spec):
        raise ValueError(f"--judge re-scores the 'accuracy' reward, which --rewards {a.rewards!r} "
                         "does not have")
    return Scoring(spec, known, load_judge(a.judge) if a.judge else None)


def run(a) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_latent import parallel
    from megatron_latent.fsutil import write_text_atomic
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.loading import is_output_rank, load_for_generation
    from megatron_latent.rl.data import load_rl_prompts
    from megatron_latent.rl.rewards import import_reward_module

    data, out = Path(a.data), Path(a.output)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: not found")
    report_path = check_paths(data, out, a.overwrite_output)
    kind = input_kind(data)
    prompts = load_rl_prompts(data)  # text only; DataError names file, record, field
    if kind == "json":
        read_records(data, len(prompts))  # a meta JSON fails now, not after sampling
    if a.reward_module:
        import_reward_module(a.reward_module)
    parallel.initialize(parallel.ParallelConfig(a.tp, a.pp), seed=a.seed)
    try:
        model, processor, mcfg, method = load_for_generation(
            a.load, tp=a.tp, pp=a.pp, spec=a.spec, dtype=a.dtype, latent_method=a.latent_method)
        method = method.for_rl()
        scoring = _scoring(a, method)
        builder = _prompt_builder(a, mcfg, method, processor)
        generator = Generator(model, rule=method.rl_decode_program(
            a.latent_mode, a.latent_steps, a.latent_threshold), pad_id=builder.pad_id,
            cuda_graphs=a.cuda_graphs, max_context=a.seq_length)
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = range(rank, len(prompts), dp)  # strided: long and short rows spread evenly
        writer = is_output_rank()
        if writer:
            print(f"[filter] {len(prompts)} prompts x {a.samples} samples, method "
                  f"{method.name}, {dp} data-parallel rank(s)", flush=True)
        rows = score_rows(mine, prompts, builder, generator, scoring, a, rank,
                          Progress(writer, len(mine), dp))
        if dp > 1:
            parts = [None] * dp
            dist.all_gather_object(parts, rows, group=ps.get_data_parallel_group())
            rows = [r for part in parts for r in part]
    finally:
        parallel.destroy()
    if not writer:
        return 0
    rows.sort(key=lambda r: r["index"])
    totals = decide(rows, a)
    write_output(kind, data, out, prompts, [r["index"] for r in rows if r["kept"]])
    settings = {k: getattr(a, k) for k in (
        "load", "data", "output", "samples", "max_pass_rate", "min_pass_rate", "pass_threshold",
        "keep_skipped", "rewards", "judge", "temperature", "top_p", "top_k", "max_new_tokens",
        "seq_length", "min_pixels", "max_pixels", "micro_batch_size", "seed", "latent_mode",
        "latent_steps", "answer_prefix", "system")}
    report = {"settings": {**settings, "latent_method": method.name,
                           "data_parallel_size": dp},
              "totals": totals, "rows": rows}
    write_text_atomic(report_path, json.dumps(report, indent=1) + "\n")
    print(summary(totals, a, out), flush=True)
    if not totals["kept"]:
        print(f"warning: no prompt kept; {out} has no rows (train_grpo.py refuses it)",
              flush=True)
    print(f"report: {report_path}", flush=True)
    return 0


def main(argv=None) -> int:
    from megatron_latent.rl.rewards import RewardError

    a = parse_args(argv)
    try:
        return run(a)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)  # bad paths, data (DataError), method or rewards
        return 2


if __name__ == "__main__":
    sys.exit(main())
