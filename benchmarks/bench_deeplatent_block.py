"""DeepLatent latent thought time per block (issue #21): the time from the start of a `<latent>`
event to the logits of the first token after `</latent>`, with the block appended in two chunk
forwards (the generator's chunk path) against the same tokens and vectors fed one per step.

    python benchmarks/bench_deeplatent_block.py --shape 7b --batch 1 8 \\
        --json-out benchmarks/results/2026-12-03/deeplatent_block.json
    python benchmarks/bench_deeplatent_block.py --shape tiny --batch 1 2 --repeat 2   # CPU smoke

Model: Qwen2.5-VL at the `--shape` (7b: all 28 LLM layers, hidden 3,584, the 32-block vision
tower), random weights, bf16, megatron-core's local spec (no TE), with DeepLatent's stage-2
side modules (`registry.build("deeplatent", ..., {"stage": 2, "max_blocks": 1})`: one block a
row, so a `<latent>` sampled after the block starts nothing). The scale head is overwritten
(zero weights, biases one-hot at class `--grid` - 1), so its argmax grid is `--grid` x `--grid`
(16 x 16 = 256 latents) whatever the random weights give. Each prompt: one `--image`-pixel
image, `--text-tokens` question ids, and `<latent>` as the answer prefix, so the event fires on
the prefill's output. Greedy.

What one event runs (latent/deeplatent_decode.py, inference/generator.py):
  chunk 1: the 3 placeholders (scale, qmod, imod) in one forward;
  grid:    the scale head's argmax (H, W) and the LatentFormer's H*W latents (one batched call
           per group of rows with the same grid and image layout);
  chunk 2: H*W latents + `</latent>` in one forward, at image-like positions, then the LM head
           where it is used (before `</latent>` and at the last input: the records' log-probs
           and the rows' last logits);
each chunk forward a CUDA graph replay (per batch and padded size: 3 and 16*16 + 1) where the
decode steps are graphed, unless --no-chunk-graphs;
then one-token decoding resumes: the first token after `</latent>` is sampled from those logits
and its own decode step (`next step`) runs.

Reported per batch size (median and min over `--repeat` warm calls, after `--warmup`):
- thought ms, ends only (`thought_ends_only`): the event, synchronised before and after and
  nowhere inside (CUDA; host time included): chunk 1 + grid + chunk 2, i.e. to the logits the
  first post-block token is sampled from;
- thought ms, parts timed (`thought`): the same with its parts timed too (chunk forwards alone,
  the LM heads, the grid), a sync at each part's boundary (this serialises the host work the
  chunk path overlaps with the GPU, so it reads higher);
- thought + next step ms: plus the first post-block decode iteration (sample it and its
  forward: a CUDA graph replay);
- e2e diff ms: generate(max_new_tokens = 3 + H*W + 2) minus generate of a program that never
  fires (max_blocks = 0, max_new_tokens = 1), both ending with one decode iteration: a
  cross-check of `thought ms` without the probes;
- one-per-step ms: the `Replay` program (testing/generation.py) feeding the same ids and
  vectors one per decode step (graphed), generate(3 + H*W + 2) minus generate(1) of the same
  program: 3 + H*W + 1 decode steps, to the same logits; TPLT = that / (H*W).
`--profile-dir DIR` (GPU): one more generate call per batch size under the torch profiler, its
Chrome trace saved there (.json.gz) and summarised into the JSON (`profile`: per part its host
time and the GPU work it launched, the CUDA runtime calls, the top kernels and host ops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import SHAPES, hf_config, make_prompts  # noqa: E402


class StubTokenizer:
    """Enough of a tokenizer for `registry.build` to add DeepLatent's six tokens at the first
    free ids (151665.. at the 7B shape, as on Qwen2.5-VL's tokenizer)."""

    def __init__(self, first_free: int):
        self.n, self.added = first_free, {}

    def __len__(self):
        return self.n + len(self.added)

    def get_vocab(self):
        return dict(self.added)

    def add_tokens(self, tokens, special_tokens=False):
        for t in tokens:
            self.added[t] = len(self)

    def convert_tokens_to_ids(self, t):
        return self.added.get(t)

    def encode(self, t, add_special_tokens=False):
        return [self.added[t]]


class Probe:
    """Timers patched into the generator's chunk path (this benchmark only): each fired event's
    total, its chunk appends, their forwards and LM-head parts, the grid, and the decode
    iteration right after it. CUDA is synchronised at each boundary (the chunk path already
    syncs the host several times per event)."""

    def __init__(self, sync):
        self.sync, self.on = sync, False
        self.events, self.cur, self.await_step = [], None, False
        # parts: time the parts too (a sync at each of their boundaries); off: the event's two
        # ends only. labels: profiler ranges (dl:...) around the same parts, no syncs
        self.parts, self.labels = True, False

    def now(self):
        self.sync()
        return time.perf_counter()

    def label(self, name, fn, *a, **kw):
        import torch

        with torch.profiler.record_function(name):
            return fn(*a, **kw)

    def install(self):
        import torch

        from megatron_latent.inference.generator import Generator
        from megatron_latent.latent.deeplatent_decode import DeepLatentProgram

        probe = self
        events, append, grid = Generator._events, Generator._append, DeepLatentProgram._grid
        forward, loop_of, logits_of = Generator._chunk_forward, Generator._loop, Generator._logits_of

        def _events(gen, loop, params, j, logits_log):
            if probe.labels:  # synchronised at both ends, as the timed event
                probe.sync()
                with torch.profiler.record_function("dl:events"):
                    j2 = events(gen, loop, params, j, logits_log)
                    probe.sync()
                return j2
            if not probe.on:
                return events(gen, loop, params, j, logits_log)
            probe.cur = {"chunks": [], "forwards": [], "lm_head": 0.0, "grid": 0.0}
            t0 = probe.now()
            j2 = events(gen, loop, params, j, logits_log)
            t1 = probe.now()
            if j2 > j:
                probe.cur.update(total=t1 - t0, columns=j2 - j)
                probe.events.append(probe.cur)
                probe.await_step = True
            probe.cur = None
            return j2

        def _append(gen, *a, **kw):
            if probe.labels:
                return probe.label("dl:append", append, gen, *a, **kw)
            if probe.cur is None or not probe.parts:
                return append(gen, *a, **kw)
            probe.cur["forwards"].append(0.0)
            t0 = probe.now()
            out = append(gen, *a, **kw)
            probe.cur["chunks"].append(probe.now() - t0)
            return out

        def _forward(gen, *a, **kw):  # eager or a CUDA graph replay
            if probe.labels:
                return probe.label("dl:forward", forward, gen, *a, **kw)
            if probe.cur is None or not probe.cur["forwards"]:
                return forward(gen, *a, **kw)
            t0 = probe.now()
            out = forward(gen, *a, **kw)
            probe.cur["forwards"][-1] += probe.now() - t0
            return out

        def _logits_of(gen, hidden):
            if probe.labels:
                return probe.label("dl:lm_head", logits_of, gen, hidden)
            if probe.cur is None or not probe.parts:
                return logits_of(gen, hidden)
            t0 = probe.now()
            out = logits_of(gen, hidden)
            probe.cur["lm_head"] += probe.now() - t0
            return out

        def _grid(program, state, out, rows):
            if probe.labels:
                return probe.label("dl:grid", grid, program, state, out, rows)
            if probe.cur is None or not probe.parts:
                return grid(program, state, out, rows)
            t0 = probe.now()
            req = grid(program, state, out, rows)
            probe.cur["grid"] += probe.now() - t0
            return req

        def _loop(gen, *a, **kw):
            loop, step = loop_of(gen, *a, **kw)

            def timed():
                if not (probe.on and probe.await_step):
                    return step()
                t0 = probe.now()
                step()
                probe.events[-1]["next_step"] = probe.now() - t0
                probe.await_step = False
            return loop, timed

        Generator._events, Generator._append, Generator._logits_of = _events, _append, _logits_of
        Generator._loop, Generator._chunk_forward, DeepLatentProgram._grid = _loop, _forward, _grid


def summarize_trace(path) -> dict:
    """Where one event's time went, from a Chrome trace of a generate call with the probe's
    `dl:` ranges (the longest `dl:events` range: the event that fired, synchronised at both
    ends): per part its host time and the GPU work it launched (kernels, their summed time, the
    union of their busy intervals), the CUDA runtime calls (launches, syncs, copies), the top
    kernels and the top-level host ops outside the chunk forwards."""
    from collections import defaultdict

    evs = json.loads(Path(path).read_text())
    evs = evs["traceEvents"] if isinstance(evs, dict) else evs
    ann = [e for e in evs if e.get("cat") == "user_annotation"
           and str(e.get("name", "")).startswith("dl:")]
    kernels = [e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in evs if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launched = {e["args"]["correlation"]: e["ts"] for e in runtime
                if "correlation" in e.get("args", {})}
    fired = max((e for e in ann if e["name"] == "dl:events"), key=lambda e: e["dur"])
    t0, t1 = fired["ts"], fired["ts"] + fired["dur"]

    def gpu(a, b):
        ks = sorted((k for k in kernels if a <= launched.get(k.get("args", {}).get(
            "correlation"), -1) <= b), key=lambda k: k["ts"])
        busy, end = 0.0, -1e30
        for k in ks:
            s0, s1 = k["ts"], k["ts"] + k["dur"]
            busy += max(0.0, s1 - max(s0, end))
            end = max(end, s1)
        return {"kernels": len(ks), "kernel_ms": sum(k["dur"] for k in ks) / 1e3,
                "busy_ms": busy / 1e3,
                "gpu_span_ms": (end - ks[0]["ts"]) / 1e3 if ks else 0.0}

    out = {"event_ms": fired["dur"] / 1e3, "event_gpu": gpu(t0, t1), "parts": []}
    for e in sorted(ann, key=lambda e: e["ts"]):
        if e is not fired and t0 <= e["ts"] <= t1:
            out["parts"].append({"name": e["name"], "at_ms": round((e["ts"] - t0) / 1e3, 3),
                                 "host_ms": round(e["dur"] / 1e3, 3),
                                 **{k: round(v, 3) for k, v in gpu(e["ts"], e["ts"] + e["dur"])
                                    .items()}})
    calls = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if t0 <= e["ts"] <= t1:
            calls[e["name"]][0] += 1
            calls[e["name"]][1] += e["dur"] / 1e3
    out["runtime_calls"] = {k: [n, round(ms, 3)] for k, (n, ms) in
                            sorted(calls.items(), key=lambda x: -x[1][1])}
    top = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        if t0 <= launched.get(k.get("args", {}).get("correlation"), -1) <= t1:
            top[k["name"][:90]][0] += 1
            top[k["name"][:90]][1] += k["dur"] / 1e3
    out["top_kernels"] = [[k, n, round(ms, 3)] for k, (n, ms) in
                          sorted(top.items(), key=lambda x: -x[1][1])[:25]]
    fwd = [(e["ts"], e["ts"] + e["dur"]) for e in ann if e["name"] == "dl:forward"
           and t0 <= e["ts"] <= t1]
    ops = sorted((e for e in evs if e.get("cat") == "cpu_op" and t0 <= e["ts"] <= t1
                  and not any(a <= e["ts"] <= b for a, b in fwd)),
                 key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    host = defaultdict(lambda: [0, 0.0])
    stack_end, tid = -1e30, None
    for e in ops:  # top-level ops only (not inside another op of the same thread)
        if e["tid"] != tid:
            stack_end, tid = -1e30, e["tid"]
        if e["ts"] >= stack_end:
            host[e["name"]][0] += 1
            host[e["name"]][1] += e["dur"] / 1e3
            stack_end = e["ts"] + e["dur"]
    out["host_ops_outside_forwards"] = {
        "count": sum(n for n, _ in host.values()),
        "ms": round(sum(ms for _, ms in host.values()), 3),
        "top": [[k, n, round(ms, 3)] for k, (n, ms) in
                sorted(host.items(), key=lambda x: -x[1][1])[:30]]}
    return out


def profile_event(gen, prompts, params, probe, out_dir, tag) -> dict:
    """One generate call under the torch profiler (CPU + CUDA), the probe's ranges on; the
    trace is saved (gzip) and summarised (`summarize_trace`)."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    probe.labels = True
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen.generate(prompts, params)
            torch.cuda.synchronize()
    finally:
        probe.labels = False
    path = Path(out_dir) / f"trace_deeplatent_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    summary = summarize_trace(path)
    with open(path, "rb") as f, gzip.open(f"{path}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    path.unlink()
    return summary


def stats(xs):
    return {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs),
            "max_ms": 1e3 * max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--grid", type=int, default=16, help="forced grid side (H = W)")
    ap.add_argument("--text-tokens", type=int, default=24)
    ap.add_argument("--image", type=int, default=448, help="image side in pixels (x14 patches)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--replay-repeat", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true", help="eager one-token decode steps")
    ap.add_argument("--no-chunk-graphs", action="store_true",
                    help="eager chunk forwards (default: CUDA graphs where decode steps have them)")
    ap.add_argument("--skip-replay", action="store_true")
    ap.add_argument("--profile-dir", default=None,
                    help="(GPU) profile one generate call per batch size: a Chrome trace "
                         "(.json.gz) here and a summary of the event in the JSON and the log")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    import torch

    from megatron_latent import parallel
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.latent import registry
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel
    from megatron_latent.testing.generation import Replay

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    graphs = cuda and not args.no_graphs
    shape = SHAPES[args.shape]
    parallel.initialize(parallel.ParallelConfig(), seed=0)
    t_build = time.perf_counter()
    cfg = Qwen25VLConfig.from_hf(hf_config(shape).to_dict(), spec="local",
                                 params_dtype=torch.bfloat16)
    tok = StubTokenizer(shape["ids"]["lvr_start"])  # the first free id
    method = registry.build("deeplatent", tok, cfg, {"stage": 2, "max_blocks": 1})
    modules = method.build_modules(cfg, pre_process=True, post_process=True)
    torch.manual_seed(0)
    model = Qwen25VLModel(cfg, latent_modules=modules).to(dev).eval()
    head = model.latent_modules.scale_head
    with torch.no_grad():  # argmax -> class grid - 1 -> H = W = grid
        for lin in (head.h, head.w):
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[args.grid - 1] = 1.0
    program = method.decode_program()
    idle = method.decode_program()
    idle.max_blocks = 0  # never fires; same spare cache slots
    t_build = time.perf_counter() - t_build
    n_lat = args.grid * args.grid
    n_block = 3 + n_lat + 1  # placeholders, latents, </latent>
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    start_id = program.start_id
    n_params = sum(p.numel() for p in model.parameters())
    side = sum(p.numel() for p in model.latent_modules.parameters())
    prompt_len = len(make_prompts(shape, 1, args.text_tokens, args.image, dev, start_id)[0]
                     .input_ids)
    print(f"# {gpu}; shape {args.shape} ({cfg.num_layers} LLM layers, hidden {cfg.hidden_size}); "
          f"spec local, bf16; params {n_params / 1e9:.2f} B (side modules {side / 1e6:.1f} M); "
          f"built in {t_build:.1f} s", flush=True)
    print(f"# scale head forced: zero weights, biases one-hot at class {args.grid - 1} -> every "
          f"block {args.grid}x{args.grid} = {n_lat} latents; block = 3 placeholders + {n_lat} "
          f"latents + </latent> = {n_block} tokens; prompt {prompt_len} tokens (one "
          f"{args.image}px image, {args.text_tokens} text ids, <latent>); decode steps "
          f"{'CUDA graphs' if graphs else 'eager'}; chunk forwards "
          f"{'CUDA graphs' if graphs and not args.no_chunk_graphs else 'eager'}", flush=True)

    probe = Probe(sync)
    probe.install()

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    rows = []
    result = {"gpu": gpu, "args": vars(args), "date": "2026-12-03", "spec": "local",
              "dtype": "bf16", "prompt_tokens": prompt_len, "block_tokens": n_block,
              "latents": n_lat, "scale_head_forced": f"zero weights, bias one-hot at "
              f"{args.grid - 1} (argmax H = W = {args.grid})", "rows": rows}

    def save():
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=1))

    for b in args.batch:
        prompts = make_prompts(shape, b, args.text_tokens, args.image, dev, start_id)
        n_new = n_block + 1  # the block, the first token after it (its forward runs too)
        full, one = SamplingParams(max_new_tokens=n_new), SamplingParams(max_new_tokens=1)
        cg = not args.no_chunk_graphs
        gen = Generator(model, rule=program, cuda_graphs=graphs, check_every=1, chunk_graphs=cg)
        gen_idle = Generator(model, rule=idle, cuda_graphs=graphs, check_every=1,
                             chunk_graphs=cg)
        row = {"batch": b}
        # ---- the chunk path
        for _ in range(args.warmup):
            out = gen.generate(prompts, full)
            gen_idle.generate(prompts, one)
        lat = [len(c.latent_positions) for c in out]
        assert all(n == n_lat for n in lat), f"expected {n_lat} latents a row, got {lat}"
        assert all(c.tokens[n_block - 1] == program.end_id for c in out)
        # the event synchronised at its two ends only (no syncs inside: the host work of
        # the chunk path overlaps the GPU as it does in generation)
        probe.events.clear()
        probe.parts = False
        for _ in range(args.repeat):
            probe.on = True
            gen.generate(prompts, full)
            probe.on = False
        ends = list(probe.events)
        assert len(ends) == args.repeat, ends
        probe.parts = True
        # the same with its parts timed (a sync at each of their boundaries)
        probe.events.clear()
        t_full, t_idle = [], []
        for _ in range(args.repeat):
            probe.on = True
            t, out = timed(lambda: gen.generate(prompts, full))
            probe.on = False
            t_full.append(t)
            t_idle.append(timed(lambda: gen_idle.generate(prompts, one))[0])
        ev = probe.events
        assert len(ev) == args.repeat and all(len(e["chunks"]) == 2 for e in ev), ev
        # two passes without probes (no syncs inside): the end-to-end cross-check
        t_full_np, t_idle_np = [], []
        for _ in range(args.repeat):
            t_full_np.append(timed(lambda: gen.generate(prompts, full))[0])
            t_idle_np.append(timed(lambda: gen_idle.generate(prompts, one))[0])
        row.update(
            thought_ends_only=stats([e["total"] for e in ends]),
            thought_ends_only_plus_next_step=stats([e["total"] + e["next_step"] for e in ends]),
            thought=stats([e["total"] for e in ev]),
            thought_plus_next_step=stats([e["total"] + e["next_step"] for e in ev]),
            chunk1=stats([e["chunks"][0] for e in ev]),
            chunk1_forward=stats([e["forwards"][0] for e in ev]),
            grid_latentformer=stats([e["grid"] for e in ev]),
            chunk2=stats([e["chunks"][1] for e in ev]),
            chunk2_forward=stats([e["forwards"][1] for e in ev]),
            chunk_lm_heads=stats([e["lm_head"] for e in ev]),
            next_step=stats([e["next_step"] for e in ev]),
            generate_block=stats(t_full_np), generate_idle=stats(t_idle_np),
            e2e_diff_ms=1e3 * (statistics.median(t_full_np) - statistics.median(t_idle_np)),
            e2e_diff_min_ms=1e3 * (min(t_full_np) - min(t_idle_np)),
        )
        first_after = [c.tokens[n_block] for c in out]
        if args.profile_dir and cuda:
            row["profile"] = profile_event(gen, prompts, full, probe, args.profile_dir, f"b{b}")
            print(f"# profile b{b}: " + json.dumps(row["profile"]), flush=True)
        # ---- the same block fed one token / vector per decode step
        if not args.skip_replay:
            replay = Replay(out, program.latent_id, program.end_id, program.never_sample,
                            cfg.hidden_size)
            for k in ("tok", "scripted", "feed", "vec", "off"):  # on the device: graph-safe
                setattr(replay, k, getattr(replay, k).to(dev))
            gen_r = Generator(model, rule=replay, cuda_graphs=graphs, check_every=1)
            try:
                for _ in range(args.warmup):
                    rep = gen_r.generate(prompts, full)
                    gen_r.generate(prompts, one)
            except Exception as e:  # noqa: BLE001 (a graph problem: report, then eager)
                print(f"# replay with graphs failed ({type(e).__name__}: {e}); eager", flush=True)
                gen_r = Generator(model, rule=replay, cuda_graphs=False, check_every=1)
                rep = gen_r.generate(prompts, full)
                row["replay_graphs"] = False
            same = all(r.tokens[:n_block] == c.tokens[:n_block] and
                       r.latent_positions == c.latent_positions for r, c in zip(rep, out))
            t_r, t_r1 = [], []
            for _ in range(args.replay_repeat):
                t_r.append(timed(lambda: gen_r.generate(prompts, full))[0])
                t_r1.append(timed(lambda: gen_r.generate(prompts, one))[0])
            d = [a - c for a, c in zip(t_r, t_r1)]
            row.update(one_per_step=stats(d), replay_generate=stats(t_r),
                       replay_prefill=stats(t_r1),
                       one_per_step_tplt_ms=1e3 * statistics.median(d) / n_lat,
                       one_per_step_step_ms=1e3 * statistics.median(d) / n_block,
                       replay_same_block=same,
                       replay_same_first_token=[r.tokens[n_block] for r in rep] == first_after)
            row["speedup_vs_one_per_step"] = (row["one_per_step"]["median_ms"]
                                              / row["thought"]["median_ms"])
            del gen_r, replay
        row["thought_tplt_ms"] = row["thought"]["median_ms"] / n_lat
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else
                              {kk: round(vv, 3) for kk, vv in v.items()} if isinstance(v, dict)
                              else v) for k, v in row.items() if k != "profile"}), flush=True)
        save()
        del gen, gen_idle
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    save()

    def f(r, k, key="median_ms"):
        return f"{r[k][key]:.2f}" if k in r else "-"

    print(f"\n| batch | thought ms, ends only (median / min) | thought ms, parts timed "
          f"(median / min) | + next step | chunk 1 (fwd) | grid + "
          f"LatentFormer | chunk 2 (fwd / LM heads) | e2e diff | one-per-step ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | **{f(r, 'thought_ends_only')}** / "
              f"{f(r, 'thought_ends_only', 'min_ms')} | {f(r, 'thought')} / "
              f"{f(r, 'thought', 'min_ms')} "
              f"| {f(r, 'thought_plus_next_step')} | {f(r, 'chunk1')} ({f(r, 'chunk1_forward')}) "
              f"| {f(r, 'grid_latentformer')} | {f(r, 'chunk2')} ({f(r, 'chunk2_forward')} / "
              f"{f(r, 'chunk_lm_heads')}) | {r['e2e_diff_ms']:.2f} | {f(r, 'one_per_step')} "
              f"| {r.get('speedup_vs_one_per_step', float('nan')):.1f}x |")


if __name__ == "__main__":
    main()
