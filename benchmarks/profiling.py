"""torch.profiler summary shared by the benchmarks: where one call spends its GPU time.

Prints (1) GPU busy time: the union of kernel intervals against the wall time of the call (a low
share means the host, not the GPU, sets the pace), (2) host-device syncs and kernel launches,
(3) the top kernels by their own GPU time, (4) the top CPU ops, (5) the longest GPU idle gaps
and, for each, where in the Python code the host was when it launched the kernel that ended the
gap (the host code that sets the pace there); optionally saves a Chrome trace (gzip) for
chrome://tracing or Perfetto.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")


def _busy_us(kernels) -> float:
    """Union of [start, end) intervals of GPU kernels, in microseconds."""
    spans = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy


def _frame(e) -> str:
    """The innermost frame of a CPU op's Python stack that is ours or megatron's, not torch's."""
    for f in getattr(e, "stack", None) or []:
        if ("megatron" in f or "benchmarks" in f) and "torch/" not in f:
            return f.split("site-packages/")[-1]
    return e.name


def gaps_table(events, kernels, *, min_us: float = 20.0, rows: int = 15) -> list[str]:
    """GPU idle gaps longer than `min_us`, summed by the Python frame whose launch ended each gap
    (the last launch call before the kernel after the gap, then the innermost op with a Python
    stack around that call); lines of text, longest total first."""
    import bisect

    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    launches = sorted((e for e in cpu if e.name.startswith(("cudaLaunch", "cuLaunch",
                                                             "cudaGraphLaunch", "cudaMemcpy",
                                                             "cudaMemset"))),
                      key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in launches]
    ops = sorted((e for e in cpu if getattr(e, "stack", None)), key=lambda e: e.time_range.start)
    op_starts = [e.time_range.start for e in ops]

    def where(kernel) -> str:
        i = bisect.bisect_right(starts, kernel.time_range.start) - 1
        if i < 0:
            return kernel.name[:60]
        call = launches[i]
        j = bisect.bisect_right(op_starts, call.time_range.start) - 1
        for e in reversed(ops[max(0, j - 2000):j + 1]):  # innermost enclosing op first
            if e.time_range.end >= call.time_range.end and e.thread == call.thread:
                return _frame(e)
        return call.name

    end, total, count = None, {}, {}
    for k in sorted(kernels, key=lambda k: k.time_range.start):
        if end is not None and k.time_range.start - end > min_us:
            key = where(k)
            total[key] = total.get(key, 0.0) + (k.time_range.start - end)
            count[key] = count.get(key, 0) + 1
        end = k.time_range.end if end is None else max(end, k.time_range.end)
    return [f"{t / 1e3:8.2f} ms in {count[key]:4d} gaps before kernels launched at {key}"
            for key, t in sorted(total.items(), key=lambda kv: -kv[1])[:rows]]


def profile_call(name: str, fn, *, trace_dir: str | None = None, rows: int = 30,
                 show: bool = True) -> None:
    """Run `fn` once to warm up, then once under the profiler, and print the summary."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=True) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6
    if not show:
        return
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    syncs = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in SYNC_CALLS:
            syncs[e.name] = syncs.get(e.name, 0) + 1
    busy = _busy_us(kernels)
    print(f"# profile of one {name} call: wall {wall_us / 1e3:.1f} ms (under the profiler), GPU "
          f"busy {busy / 1e3:.1f} ms ({100 * busy / wall_us:.0f}%), {len(kernels)} kernels, "
          f"host syncs/copies {syncs or 0}")
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90))
    print(f"# top CPU ops of the {name} call (self CPU time)")
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=90))
    print(f"# GPU idle gaps > 20 us of the {name} call, by the host code that ended them")
    try:  # diagnostics only: never lose the rest of the profile to it
        print("\n".join(gaps_table(events, kernels)))
    except Exception as e:  # noqa: BLE001
        print(f"(gap analysis failed: {type(e).__name__}: {e})")
    if trace_dir:
        out = Path(trace_dir)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"trace_{name}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        print(f"# trace: {raw}.gz")
