"""torch.profiler summary shared by the benchmarks: where one call spends its GPU time.

Prints (1) GPU busy time: the union of kernel intervals against the wall time of the call (a low
share means the host, not the GPU, sets the pace), (2) host-device syncs and kernel launches,
(3) the top kernels by their own GPU time, (4) the top CPU ops; optionally saves a Chrome trace
(gzip) for chrome://tracing or Perfetto, which `trace_gaps.py` reads to name the host code
behind each GPU idle gap.
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


def profile_call(name: str, fn, *, trace_dir: str | None = None, rows: int = 30,
                 show: bool = True, stacks: bool = False) -> None:
    """Run `fn` once to warm up, then once under the profiler, and print the summary. `stacks`
    records Python stacks (trace_gaps.py then names our code) at the price of slowing the host,
    which lengthens the very gaps it explains: the busy share is read without it."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=stacks) as prof:
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
    if trace_dir:
        out = Path(trace_dir)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"trace_{name}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        print(f"# trace: {raw}.gz (idle gaps by code: benchmarks/trace_gaps.py {raw.name}.gz)")
