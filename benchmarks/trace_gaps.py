"""GPU idle time of a saved profiler trace, by the Python code that ended each gap.

    python benchmarks/trace_gaps.py trace_ours.json.gz [--min-us 20] [--rows 25] [--depth 3]

Reads a Chrome trace written by `bench_sft.py --profile --profile-stacks --profile-dir D` (or any
torch.profiler trace recorded with_stack). For every gap between GPU operations longer than
--min-us, finds the runtime call that launched the operation ending the gap, and the innermost
megatron / megatron_latent / TE / benchmark frames around that call: where the host was when the
GPU ran dry. Stack recording slows the host, so gap lengths are upper bounds.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# frames are named relative to sys.path: a benchmark script's own ones as "bench_*.py(...)"
OURS = ("megatron", "bench", "transformer_engine", "transformers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=20.0)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit(f"{args.trace}: no GPU events (was CUDA profiled?)")
    launch = {e["args"].get("correlation"): e for e in events
              if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    frames = sorted((e for e in events if e.get("cat") == "python_function"),
                    key=lambda e: e["ts"])
    if not frames:
        print("(no Python stacks in this trace: gaps are named by the launch call only)")
    starts = [e["ts"] for e in frames]

    def where(call) -> str:
        i = bisect.bisect_right(starts, call["ts"])
        around = [e["name"] for e in frames[max(0, i - 20000):i]
                  if e["tid"] == call["tid"] and e["ts"] + e.get("dur", 0) >= call["ts"]]
        ours = [n.split("/")[-1][:50] for n in around if any(k in n for k in OURS)]
        return " > ".join(ours[-args.depth:]) or call["name"]

    end, idle, count = None, collections.Counter(), collections.Counter()
    for e in gpu:
        if end is not None and e["ts"] - end > args.min_us:
            call = launch.get(e.get("args", {}).get("correlation"))
            key = where(call) if call else f"(unlinked) {e['name'][:50]}"
            idle[key] += e["ts"] - end
            count[key] += 1
        end = e["ts"] + e.get("dur", 0) if end is None else max(end, e["ts"] + e.get("dur", 0))
    span = end - gpu[0]["ts"]
    print(f"GPU span {span / 1e3:.1f} ms, idle in gaps > {args.min_us:g} us: "
          f"{sum(idle.values()) / 1e3:.1f} ms in {sum(count.values())} gaps")
    for key, us in idle.most_common(args.rows):
        print(f"{us / 1e3:8.2f} ms {count[key]:5d}  {key}")


if __name__ == "__main__":
    main()
