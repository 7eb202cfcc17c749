"""The end of a bench_sft.py run: the initial-loss check, the per-path rows (tokens/s, TFLOP/s,
ratios), HyLaR's canvas-path cost and the markdown table (the metrics are defined in
bench_sft.py's doc). `log` is the caller's print (rank 0 only)."""

from __future__ import annotations

from sft_hf import LAMBDA

FP32_RTOL = 1e-4


def split_paths(results: dict) -> tuple[list[str], list[str]]:
    """-> (our row names, HF row names), each in the order they ran."""
    hf_rows = [n for n in results if n.startswith("HF")]
    return [n for n in results if n not in hf_rows], hf_rows


def log_losses(results: dict, losses: dict, ours: list[str], dtype_name: str, log) -> bool:
    """Print each of our paths' initial loss beside HF's; -> False when fp32 losses disagree."""
    ok = True
    for name in ours:
        # HF's loss is LVR's: HyLaR's rows have no HF counterpart
        lo = losses[name]
        lh = losses.get("HF") if results[name]["method"] == "lvr" else None
        if lh is None:
            log(f"loss {name} {lo['loss']:.7f} / HF n/a ({dtype_name}, initial weights; "
                f"CE {lo['lm loss']:.7f}, " + ", ".join(f"{k} {v:.7f}" for k, v in lo.items()
                                                      if k not in ("loss", "lm loss")) + ")")
            continue
        rel = abs(lo["loss"] - lh["loss"]) / abs(lh["loss"])
        log(f"loss {name} {lo['loss']:.7f} / HF {lh['loss']:.7f} ({dtype_name}, initial weights, "
            f"forward only; rel diff {rel:.2e}; CE {lo['lm loss']:.7f} / {lh['lm loss']:.7f}, "
            f"latent MSE {lo['latent mse']:.7f} / {lh['latent mse']:.7f}, lambda {LAMBDA})")
        if dtype_name == "fp32" and rel > FP32_RTOL:
            ok = False
            log(f"ERROR: fp32 losses differ by {rel:.2e} > {FP32_RTOL:.0e} relative")
    return ok


def table_rows(results: dict, losses: dict, ours: list[str], hf_rows: list[str], *,
               tokens: int, hf_tokens: int, flops_total: float, dp: int) -> list[dict]:
    """Complete each result (in place) with its throughput and ratios; -> ours, then HF's.
    `tokens`: our step's, over all dp ranks; `hf_tokens`: HF's step's (one GPU)."""
    rows = []
    for name in ours + hf_rows:
        r = results[name]
        mine = name in ours
        r.update(path=name, tokens_s=(tokens if mine else hf_tokens) / r["step_s"])
        # HF runs one dp rank's share of our step on its one GPU
        path_flops = flops_total if mine else flops_total / dp
        r["tflops_per_gpu"] = path_flops / r["step_s"] / r["gpus"] / 1e12
        r["tokens_s_per_gpu"] = r["tokens_s"] / r["gpus"]
        r["loss0"] = losses.get(name if mine else "HF", {}).get("loss")
        rows.append(r)
    for r in rows:
        r["ratio_vs"] = {h: r["tokens_s_per_gpu"] / results[h]["tokens_s_per_gpu"]
                         for h in hf_rows}
    return rows


def compare_to_first(results: dict, ours: list[str], log) -> None:
    """Each of our later rows' speed-up over the first (the methods/precisions of one run)."""
    base = results[ours[0]]
    for name in ours[1:]:
        results[name]["ratio_vs_first"] = base["step_s"] / results[name]["step_s"]
        log(f"# {name} vs {ours[0]}: {results[name]['ratio_vs_first']:.3f}x tokens/s")


def canvas_costs(results: dict, ours: list[str], precisions: list[str], log) -> dict:
    """HyLaR vs LVR at each precision both ran at: -> {precision: its canvas path's cost}."""
    by = {(results[n]["method"], results[n]["precision"]): n for n in ours}
    costs = {}
    for precision in precisions:
        lvr_row, hy_row = by.get(("lvr", precision)), by.get(("hylar", precision))
        if lvr_row is None or hy_row is None:
            continue
        lvr_s, hy_s = results[lvr_row]["step_s"], results[hy_row]["step_s"]
        ratio = results[hy_row]["tokens_s"] / results[lvr_row]["tokens_s"]
        costs[precision] = {"hylar_over_lvr": ratio, "cost": 1 - ratio,
                            "lvr_step_ms": 1e3 * lvr_s, "hylar_step_ms": 1e3 * hy_s}
        log(f"# canvas path ({precision}): HyLaR / LVR tokens/s = {ratio:.4f}, cost "
            f"{100 * (1 - ratio):.1f}% ({1e3 * hy_s:.1f} vs {1e3 * lvr_s:.1f} ms a step)")
    return costs


def log_table(rows: list[dict], hf_rows: list[str], log) -> None:
    log("\n| path | tokens/s | TFLOP/s | step ms | of which optimizer ms | peak GiB |"
        + "".join(f" vs {h} |" for h in hf_rows))
    log("|---|---|---|---|---|---|" + "---|" * len(hf_rows))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a"
        log(f"| {r['path']} | {r['tokens_s']:,.0f} | {r['tflops_per_gpu']:.4g} "
            f"| {1e3 * r['step_s']:.1f} | {1e3 * r['optimizer_s']:.1f} | {peak} |"
            + "".join(f" {r['ratio_vs'][h]:.2f}x |" for h in hf_rows))


def log_legend(flops_formula: str, log) -> None:
    log(f"\n# tokens/s: all tokens of the step (text + image + latent) / mean step time; "
        f"TFLOP/s: model FLOPs per GPU, {flops_formula}; peak: torch.cuda.max_memory_allocated "
        f"(max over ranks; n/a on CPU); vs HF ...: per-GPU tokens/s over that HF row's (HF on "
        f"1 GPU); HF recomputes under 'seeds' but its FLOPs are counted once (model FLOPs)")


def canvas_breakdown_line(name: str, breakdown: dict, side_params: int) -> str:
    """HyLaR's canvas path timed alone (sft_hylar.canvas_breakdown), as one comment line."""
    b = breakdown
    return (f"# {name}: canvas path alone, per step ({b['images']} images): SigLIP forward "
            f"{b['siglip_fwd_ms']:.1f} ms ({b['siglip_dtype']}, attn {b['siglip_attn']}), "
            f"compressor + projector fwd+bwd {b['compressor_proj_fwd_bwd_ms']:.1f} ms (params "
            f"{b['side_param_dtype']}, {side_params / 1e6:.1f} M, compute {b['compute_dtype']}); "
            f"SigLIP graphs {b['siglip_graphs']}")
