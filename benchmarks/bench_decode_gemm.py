"""How fast the decode step's weight GEMMs can stream the weights, by implementation.

    python benchmarks/bench_decode_gemm.py [--batch 1 8 64] [--json-out F]

A decode step at small batch is a string of skinny GEMMs [m, k] x [k, n] with m = batch: each
reads its whole weight once, so its time is bounded by weight bytes / HBM bandwidth. For the
Qwen2.5-VL-7B LLM's GEMMs (QKV, attention output, MLP fc1 and fc2, output layer; TP = 1) this
prints, per implementation and batch, the time per call and the share of the H200's 4.8 TB/s it
reaches:
  te     Transformer Engine's Linear (what our TE-spec decode runs today)
  torch  torch.nn.functional.linear (cuBLAS through torch)
  fp8    torch._scaled_mm with the weight in float8_e4m3 (half the bytes; per-tensor scales),
         the activation cast included; m is padded to 16 as the kernel wants
  ours   decode_gemm.gemm (megatron_latent/ops/decode_gemm.py), what a decode step runs:
         our split-K skinny GEMM with the tiling it picks, or cuBLAS where it picks none;
         `--sweep` first times a grid of our kernel's tilings and prints the best per shape
Each call is timed as a CUDA graph of 50 back-to-back calls (no launch gaps), median of 5.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

HBM_BYTES_S = 4.8e12
SHAPES = {"qkv": (3584, 4608), "proj": (3584, 3584), "fc1": (3584, 37888),
          "fc2": (18944, 3584), "output": (3584, 152064)}


def graph_time(fn, calls: int = 50, reps: int = 5) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def implementations(k: int, n: int, m: int):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = {"torch": (lambda: torch.nn.functional.linear(x, w), 2 * n * k)}
    try:
        import transformer_engine.pytorch as te

        lin = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda").eval()
        with torch.no_grad():
            lin.weight.copy_(w)

        def run_te():
            with torch.no_grad():
                return lin(x)

        out["te"] = (run_te, 2 * n * k)
    except ImportError:
        pass
    if hasattr(torch, "_scaled_mm"):
        w8 = (w / w.abs().max() * 448).to(torch.float8_e4m3fn)
        w_scale = (w.abs().max() / 448).float().reshape(())
        mp = max(16, -(-m // 16) * 16)
        xp = torch.zeros(mp, k, device="cuda", dtype=torch.bfloat16)
        xp[:m] = x
        one = torch.ones((), device="cuda")

        def run_fp8():
            x8 = xp.to(torch.float8_e4m3fn)
            return torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=w_scale,
                                    out_dtype=torch.bfloat16)

        out["fp8"] = (run_fp8, n * k)
    from megatron_latent.ops import decode_gemm

    if decode_gemm.triton is not None:  # what a decode step runs: ours where picked, else cuBLAS
        out["ours"] = (lambda: decode_gemm.gemm(x, w), 2 * n * k)
    return out


def sweep(k: int, n: int, m: int):
    """(tiling, seconds) of each tiling in a grid, fastest first."""
    from megatron_latent.ops import decode_gemm

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, w).float()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timed = []
    for block_n in (32, 64, 128):
        for block_k in (64, 128):
            for programs in (2 * sms, 4 * sms, 8 * sms):
                splits = max(1, round(programs / (n // block_n)))
                for stages in (3, 4, 6):
                    t = decode_gemm.Tiling(block_n, block_k, splits, stages)
                    if not decode_gemm.fits(x, w, t):
                        continue
                    try:
                        err = (decode_gemm.linear(x, w, t).float() - ref).abs().max().item()
                    except decode_gemm.triton.runtime.errors.OutOfResources:
                        continue  # too many stages of too large tiles for shared memory
                    if err > 0.05 * ref.abs().max().item():
                        raise AssertionError(f"{t} at {m}x{k}x{n}: error {err}")
                    timed.append((t, graph_time(lambda: decode_gemm.linear(x, w, t), calls=20)))
    return sorted(timed, key=lambda r: r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--json-out")
    ap.add_argument("--sweep", action="store_true", help="time a grid of Triton tilings")
    args = ap.parse_args()
    best = []
    if args.sweep:
        print("| gemm | batch | best tiling | us/call | share of HBM | 2nd | 3rd |")
        print("|---|---|---|---|---|---|---|")
        for m in args.batch:
            for name, (k, n) in SHAPES.items():
                timed = sweep(k, n, m)
                (t, s), rest = timed[0], timed[1:3]
                best.append(dict(gemm=name, batch=m, tiling=vars(t), us=s * 1e6,
                                 share=2 * n * k / s / HBM_BYTES_S))
                print(f"| {name} | {m} | {t} | {s * 1e6:.1f} | {best[-1]['share']:.0%} | "
                      + " | ".join(f"{u * 1e6:.1f}" for _, u in rest) + " |", flush=True)
    rows = []
    print(f"# {torch.cuda.get_device_name()}; share of {HBM_BYTES_S / 1e12:.1f} TB/s")
    print("| gemm | k x n | batch | impl | us/call | weight TB/s | share of HBM |")
    print("|---|---|---|---|---|---|---|")
    for m in args.batch:
        for name, (k, n) in SHAPES.items():
            for impl, (fn, nbytes) in implementations(k, n, m).items():
                t = graph_time(fn)
                row = dict(gemm=name, k=k, n=n, batch=m, impl=impl, us=t * 1e6,
                           tb_s=nbytes / t / 1e12, share=nbytes / t / HBM_BYTES_S)
                rows.append(row)
                print(f"| {name} | {k}x{n} | {m} | {impl} | {row['us']:.1f} | "
                      f"{row['tb_s']:.2f} | {row['share']:.0%} |", flush=True)
    # per decode step: 28 layers of qkv/proj/fc1/fc2 plus one output layer
    for m in args.batch:
        for impl in sorted({r["impl"] for r in rows}):
            mine = {r["gemm"]: r["us"] for r in rows if r["batch"] == m and r["impl"] == impl}
            if len(mine) == len(SHAPES):
                step = 28 * (mine["qkv"] + mine["proj"] + mine["fc1"] + mine["fc2"]) \
                    + mine["output"]
                print(f"# batch {m} {impl}: GEMMs of one 7B decode step {step / 1e3:.2f} ms")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows, "sweep": best}, f,
                      indent=1)


if __name__ == "__main__":
    main()
