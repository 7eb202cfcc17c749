"""One co-located GRPO step against its bounds, on one GPU (or TP ranks under torchrun), after
a few hundred SFT steps so the policy is a trained one.

    python benchmarks/bench_grpo_step.py --shape 3b --cuda-graphs [--sft-steps 300]
        [--rollout-precision params fp8] [--json-out F]
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py --shape 7b --tp 2 --cuda-graphs
    python benchmarks/bench_grpo_step.py --shape tiny --spec local --sft-steps 3 \\
        --sft-timed 1 --steps 1 --prompts 2 --group 2 --micro-batch 2 --new-tokens 16 \\
        --image 112 --latent-steps 4 --text-tokens 8 --sft-seq-length 64  # CPU smoke run

The model learns a synthetic language first (grpo_bench_data.MarkovText: a random sparse Markov
chain) with LVR's SFT step (`--sft-steps`; the last `--sft-timed` timed: the SFT tokens/s of
this shape). Prompts: one image + `--text-tokens` of that language + `<|lvr_start|>`;
`--latent-steps` latent steps, `--new-tokens` in all, sampled at T = 0.9 (no stop token:
fixed work). Batch = `--prompts` x `--group` rollouts.

Train/rollout mismatch, per rollout precision, on the random-init model and on the trained
one: d = log p_train - log p_rollout over the sampled text tokens; mean |d|, max |d|, k3
KL(rollout || train), share of tokens whose ratio lies outside [0.8, 1.2], and the TIS weights
min(e^d, cap) (mean, share at the cap).

Per GRPO step (timings of the last of `--steps`; LVR's GRPO loss, one PPO epoch, the frozen
reference on the GPU), each phase against its own bound:
  rollout: generated tokens/s; decode step time ((full - prefill-only) / (new - 1)) against the
    HBM bound (LLM weights as stored for the rollout + the KV cache at mid-generation, / HBM
    bandwidth); FP8 vs bf16 tokens/s;
  train: real tokens (prompt + completion) / train time, against the SFT step's tokens/s;
  reference scoring: its time against the train phase's;
  optimizer end -> next rollout's first token; the whole step's time and model TFLOP/s
  (rollout and reference: 2 N_llm T + the frozen ViT's forward; train: bench_sft's formula).
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

TARGETS = {"train_over_sft": 0.80, "reference_over_train": 0.35, "decode_share": 0.60,
           "fp8_speedup": 1.30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="3b", choices=["3b", "7b-4l", "7b", "tiny"])
    ap.add_argument("--spec", choices=["te", "local"], default="local")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8, help="rollouts per micro-batch")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--latent-steps", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--rollout-precision", nargs="+", choices=["params", "fp8"],
                    default=["params", "fp8"])
    ap.add_argument("--tis-cap", type=float, default=2.0)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--sft-timed", type=int, default=10, help="the last SFT steps, timed")
    ap.add_argument("--sft-lr", type=float, default=1e-4)
    ap.add_argument("--sft-seq-length", type=int, default=512)
    ap.add_argument("--sft-micro-batches", type=int, default=8)
    ap.add_argument("--sft-distinct", type=int, default=24,
                    help="distinct SFT steps of data, cycled")
    ap.add_argument("--language-vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps per precision")
    ap.add_argument("--profile", action="store_true",
                    help="print the top kernels of a prefill-only rollout, the reference "
                         "scoring and the train phase")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if not 0 < args.sft_timed < args.sft_steps:
        ap.error("--sft-timed must be in [1, --sft-steps)")

    import torch
    import torch.distributed as dist

    from bench_generate import HBM_TBPS, hf_config, make_prompts
    from bench_sft import Lagged, count_params, make_micro_batches, sft_shapes, step_flops
    from bench_sft import time_steps
    from grpo_bench_data import MarkovText, mismatch
    from sft_hf import LAMBDA
    from megatron_latent import parallel
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.latent.decoding import LatentRule
    from megatron_latent.latent.lvr import LVR
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.rl.losses import GRPOLoss
    from megatron_latent.rl.objective import RLObjective, TokenScorer
    from megatron_latent.rl.rollout import rollout_micro_batches
    from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                                unwrap)
    from megatron_latent.training.step import forward_outputs, launch_step, train_step

    parallel.initialize(parallel.ParallelConfig(args.tp), seed=0)
    rank0 = dist.get_rank() == 0
    cuda = torch.cuda.is_available()  # CPU: a smoke run of the script only (--shape tiny)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = sft_shapes()[args.shape]
    ids, hidden = shape["ids"], shape["text"]["hidden_size"]
    cfg_hf = hf_config(shape)
    cfg = Qwen25VLConfig.from_hf(cfg_hf.to_dict(), tensor_model_parallel_size=args.tp,
                                 spec=args.spec, params_dtype=dtype,
                                 vision_graphs=4 if cuda else 0)

    def log(*a):
        if rank0:
            print(*a, flush=True)

    def sync_time():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    t_start = time.perf_counter()
    model = build_model(cfg, None, freeze_vision=True, freeze_merger=True)  # random init
    optimizer = build_optimizer(model, OptimSettings(lr=args.sft_lr))
    policy = unwrap(model[0])
    lvr = LVR(lvr_id=ids["lvr"], start_id=ids["lvr_start"], end_id=ids["lvr_end"],
              hidden_size=hidden, loss_lambda=LAMBDA)
    language = MarkovText(args.language_vocab, seed=0)
    rule = LatentRule(ids["lvr_start"], ids["lvr"], ids["lvr_end"], "steps", args.latent_steps)
    prompts = make_prompts(shape, args.prompts, args.text_tokens, args.image, dev,
                           text=language)
    rollouts = [p for p in prompts for _ in range(args.group)]
    gens = {p: Generator(policy, rule=rule, cuda_graphs=args.cuda_graphs, weight_precision=p)
            for p in args.rollout_precision}
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    log(f"# {gpu} x{dist.get_world_size()}, TP={args.tp}; shape {args.shape}; spec {args.spec};"
        f" {len(rollouts)} rollouts ({args.prompts} prompts x {args.group}), "
        f"{len(prompts[0].input_ids)}-token prompts, {args.new_tokens} new tokens "
        f"({args.latent_steps} latent), T=0.9; cuda graphs {args.cuda_graphs}; language: "
        f"{language}")

    def rollout_batches(comps):
        longest = max(len(p.input_ids) + len(c.tokens) for p, c in zip(rollouts, comps))
        step = 8 * args.tp
        adv = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(len(comps)))
        return rollout_micro_batches(rollouts, comps, adv, cfg=cfg, pad_id=0,
                                     micro_batch_size=args.micro_batch,
                                     pad_to=-(-longest // step) * step,
                                     exclude_ids=(rule.start_id,))

    def measure_mismatch(label: str) -> dict:
        out = {}
        for prec, gen in gens.items():
            policy.eval()
            comps = gen.generate(rollouts, SamplingParams(max_new_tokens=args.new_tokens,
                                                          temperature=0.9, seed=0))
            gen.release()
            policy.train()
            mbs = rollout_batches(comps)
            scored = forward_outputs(model, mbs, TokenScorer(0.9))
            out[prec] = mismatch(scored, mbs, args.tis_cap)
            log(f"mismatch {label} {prec} ({time.perf_counter() - t_start:.0f} s): " + ", ".join(f"{k} {v:.3g}"
                                                          for k, v in out[prec].items()))
        return out

    log(f"# model and optimizer built ({time.perf_counter() - t_start:.0f} s)")
    results = {"args": vars(args), "gpu": gpu, "language": str(language)}
    results["mismatch_random_init"] = measure_mismatch("random-init")

    # ---- SFT on the synthetic language (the last --sft-timed steps timed)
    sft_batches = []
    for k in range(args.sft_distinct):
        mbs = make_micro_batches(shape, seq_length=args.sft_seq_length, mbs=1,
                                 num_micro=args.sft_micro_batches, image=args.image,
                                 latent_tokens=args.latent_steps, dtype=dtype, device="cpu",
                                 text=language, lvr_at=3 + (args.image // 28) ** 2
                                 + args.text_tokens, seed=1000 + 100 * k)
        sft_batches.append([{k2: v.pin_memory() if cuda else v for k2, v in mb.items()}
                            for mb in mbs])
    log(f"# SFT data ready ({time.perf_counter() - t_start:.0f} s)")
    untimed, t_sft = args.sft_steps - args.sft_timed, time.perf_counter()
    for k in range(untimed):
        out = train_step(model, optimizer, sft_batches[k % args.sft_distinct], lvr)
        first = out if k == 0 else first
        if (k + 1) % 25 == 0 or k + 1 == untimed:
            rate = (time.perf_counter() - t_sft) / (k + 1)
            log(f"# sft step {k + 1}/{args.sft_steps}: CE {out['lm loss']:.3f}, "
                f"{rate:.2f} s/step, ETA {rate * (args.sft_steps - k - 1):.0f} s")
    count = iter(range(untimed, 10 ** 9))
    lagged = Lagged(lambda: launch_step(model, optimizer,
                                        sft_batches[next(count) % args.sft_distinct], lvr))
    t = time_steps(lagged, 0, args.sft_timed, cuda, lagged.finish)
    last = train_step(model, optimizer, sft_batches[1 % args.sft_distinct], lvr)
    losses = [first["lm loss"], last["lm loss"]]
    sft_tokens = args.sft_micro_batches * args.sft_seq_length
    results["sft"] = {"tokens_s": sft_tokens / t["step_s"], "step_s": t["step_s"],
                      "lm_loss_first": losses[0], "lm_loss_last": losses[1],
                      "entropy_rate": language.entropy_rate(), "steps": args.sft_steps}
    log(f"sft: {args.sft_steps} steps of {sft_tokens} tokens, CE {losses[0]:.3f} -> "
        f"{losses[1]:.3f} (the language's entropy rate {language.entropy_rate():.3f} nats; "
        f"text positions after the image); timed {sft_tokens / t['step_s']:,.0f} tokens/s")
    results["mismatch_trained"] = measure_mismatch("trained")

    # ---- GRPO steps
    for group in optimizer.param_groups:
        group["lr"] = 1e-6
    reference = build_model(cfg, None, wrap_ddp=False)
    reference[0].load_state_dict(policy.state_dict())
    for p in reference[0].parameters():
        p.requires_grad_(False)
    params = count_params(cfg_hf)

    def one_step(prec: str, seed: int) -> dict:
        gen = gens[prec]
        t = {"t0": sync_time()}
        policy.eval()
        comps = gen.generate(rollouts, SamplingParams(max_new_tokens=args.new_tokens,
                                                      temperature=0.9, seed=seed))
        gen.release()
        t["rollout"] = sync_time()
        policy.train()
        mbs = rollout_batches(comps)
        for mb in mbs:  # TIS with FP8 rollouts (the loop's default), one PPO epoch
            if prec == "fp8":
                mb["old_logprobs"], mb["tis_cap"] = None, args.tis_cap
        t["built"] = sync_time()
        for mb, lp in zip(mbs, forward_outputs(reference, mbs, TokenScorer(0.9))):
            mb["ref_logprobs"] = lp
        t["reference"] = sync_time()
        t["out"] = train_step(model, optimizer, mbs, RLObjective(GRPOLoss(), temperature=0.9))
        t["train"] = sync_time()
        policy.eval()
        gen.generate(rollouts, SamplingParams(max_new_tokens=1))
        t["first_token"] = sync_time()
        gen.release()
        t["n_gen"] = sum(len(c.tokens) for c in comps)
        t["n_train"] = sum(len(p.input_ids) + len(c.tokens) for p, c in zip(rollouts, comps))
        t["seq"] = mbs[0]["input_ids"].shape[1]
        t["mbs"] = mbs
        return t

    results["grpo"] = {}
    for prec in args.rollout_precision:
        t = [one_step(prec, k) for k in range(args.steps)][-1]
        roll, ref = t["rollout"] - t["t0"], t["reference"] - t["built"]
        train, first_tok = t["train"] - t["reference"], t["first_token"] - t["train"]
        total = t["train"] - t["t0"]
        f = step_flops(shape, params, tokens=t["n_train"], seq_length=t["seq"],
                       images=len(rollouts), image=args.image, train_vision=False)
        forward = f["llm"] / 3 + f["vision"]  # a forward-only pass over the same tokens
        r = {"rollout_s": roll, "rollout_tokens_s": t["n_gen"] / roll, "reference_s": ref,
             "train_s": train, "train_tokens_s": t["n_train"] / train,
             "optimizer_end_to_first_token_s": first_tok, "step_s": total,
             "step_tflops": (2 * forward + f["total"]) / total / dist.get_world_size() / 1e12,
             "ratio": t["out"]["ratio"], "rollout gap": t["out"].get("rollout gap")}
        r.update(decode_bound(gens[prec], policy, rollouts, args, cfg, prec, HBM_TBPS, gpu))
        if prec == args.rollout_precision[0]:  # SFT steps of the train phase's layout
            r["sft_same_layout_tokens_s"] = sft_same_layout(
                shape, args, t["seq"], model, optimizer, lvr, dtype, cuda, language,
                train_step, make_micro_batches, time_steps)
        if args.profile and cuda:
            from profiling import profile_call

            policy.eval()
            profile_call(f"prefill_{prec}", lambda: gens[prec].generate(
                rollouts, SamplingParams(max_new_tokens=1)))
            gens[prec].release()
            policy.train()
            profile_call("reference", lambda: forward_outputs(reference, t["mbs"],
                                                              TokenScorer(0.9)))
        results["grpo"][prec] = r
        log(f"grpo {prec}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()
                                         if isinstance(v, float)))
    report(results, log)
    if rank0 and args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    parallel.destroy()


def sft_same_layout(shape, args, seq, model, optimizer, lvr, dtype, cuda, language,
                    train_step, make_micro_batches, time_steps) -> float:
    """Tokens/s of LVR SFT steps with the train phase's layout: micro-batches of
    `--micro-batch` sequences of the padded rollout length, as many as the rollouts fill."""
    n_micro = args.prompts * args.group // args.micro_batch
    mbs = make_micro_batches(shape, seq_length=seq, mbs=args.micro_batch, num_micro=n_micro,
                             image=args.image, latent_tokens=args.latent_steps, dtype=dtype,
                             device="cpu", text=language, lvr_at=3 + (args.image // 28) ** 2
                             + args.text_tokens, seed=7)
    mbs = [{k: v.pin_memory() if cuda else v for k, v in mb.items()} for mb in mbs]
    for group in optimizer.param_groups:  # timing only: leave the weights as they are
        group["lr"], lr = 0.0, group["lr"]
    t = time_steps(lambda: train_step(model, optimizer, mbs, lvr), 1, 2, cuda)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return args.micro_batch * n_micro * seq / t["step_s"]


def decode_bound(gen, policy, rollouts, args, cfg, prec, hbm_tbps, gpu) -> dict:
    """The rollout's decode step time and its share of the HBM bound: medians of 2 warm calls
    of the full rollout and of a prefill-only one."""
    from bench_generate import timed
    from megatron_latent.inference.fp8_weights import decoder_linears
    from megatron_latent.inference.sampling import SamplingParams

    policy.eval()
    full = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.9, seed=0)
    one = SamplingParams(max_new_tokens=1, temperature=0.9, seed=0)
    gen.generate(rollouts, full)
    gen.generate(rollouts, one)
    t_full, _ = timed(lambda: gen.generate(rollouts, full), repeat=2)
    t_pre, _ = timed(lambda: gen.generate(rollouts, one), repeat=2)
    gen.release()
    policy.train()
    lm = policy.language_model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                       if not n.startswith("embedding."))
    if cfg.tie_word_embeddings:  # the output layer reads the embedding
        weight_bytes += lm.embedding.word_embeddings.weight.numel() * 2
    if prec == "fp8":  # e4m3 linears: one byte a weight instead of the parameter's
        weight_bytes -= sum(m.weight.numel() * (m.weight.element_size() - 1)
                            for m in decoder_linears(policy))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_query_groups // cfg.tensor_model_parallel_size
    kv = len(rollouts) * (len(rollouts[0].input_ids) + args.new_tokens / 2) * \
        cfg.num_layers * 2 * groups * head_dim * 2
    step_ms = 1e3 * (t_full - t_pre) / (args.new_tokens - 1)
    out = {"decode_step_ms": step_ms, "prefill_s": t_pre, "weight_gb": weight_bytes / 1e9}
    tbps = next((v for k, v in hbm_tbps.items() if k in gpu), None)
    if tbps:
        out["hbm_bound_ms"] = 1e3 * (weight_bytes + kv) / (tbps * 1e12)
        out["decode_share"] = out["hbm_bound_ms"] / step_ms
    return out


def report(results: dict, log) -> None:
    sft, grpo = results["sft"], results["grpo"]
    base = grpo.get("params")
    checks = []
    if base:
        checks += [("train phase tokens/s / SFT tokens/s (same layout)", base["train_tokens_s"]
                    / base["sft_same_layout_tokens_s"], ">=", TARGETS["train_over_sft"]),
                   ("reference scoring / train phase (time)", base["reference_s"] /
                    base["train_s"], "<=", TARGETS["reference_over_train"])]
        if "decode_share" in base:
            checks.append(("bf16 decode step / HBM bound", base["decode_share"], ">=",
                           TARGETS["decode_share"]))
    if base and "fp8" in grpo:
        checks.append(("fp8 / bf16 rollout tokens/s", grpo["fp8"]["rollout_tokens_s"] /
                       base["rollout_tokens_s"], ">=", TARGETS["fp8_speedup"]))
    log("\n| check | measured | target | met |\n|---|---|---|---|")
    results["checks"] = []
    for name, value, op, target in checks:
        met = value >= target if op == ">=" else value <= target
        results["checks"].append({"check": name, "value": value, "target": f"{op} {target}",
                                  "met": met})
        log(f"| {name} | {value:.3f} | {op} {target} | {'yes' if met else 'NO'} |")
    log("\n| precision | rollout tok/s | decode ms | HBM bound ms | share | reference s | "
        "train s | train tok/s | opt end -> 1st token s | step s | step TFLOP/s |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for prec, r in grpo.items():
        log(f"| {prec} | {r['rollout_tokens_s']:,.0f} | {r['decode_step_ms']:.2f} | "
            f"{r.get('hbm_bound_ms', float('nan')):.2f} | "
            f"{100 * r.get('decode_share', float('nan')):.0f}% | {r['reference_s']:.2f} | "
            f"{r['train_s']:.2f} | {r['train_tokens_s']:,.0f} | "
            f"{r['optimizer_end_to_first_token_s']:.2f} | {r['step_s']:.2f} | "
            f"{r['step_tflops']:.1f} |")
    if base:
        log(f"SFT steps in the train phase's layout: {base['sft_same_layout_tokens_s']:,.0f} "
            f"tokens/s (all tokens); the small SFT steps of the training run: "
            f"{sft['tokens_s']:,.0f}")
    for label in ("random_init", "trained"):
        log(f"\n| mismatch ({label}) | mean abs d | max abs d | k3 KL | share outside clip | "
            "TIS weight mean | TIS at cap |\n|---|---|---|---|---|---|---|")
        for prec, m in results[f"mismatch_{label}"].items():
            log(f"| {prec} | {m['gap']:.2e} | {m['gap_max']:.2e} | {m['kl']:.2e} | "
                f"{m['share_outside_clip']:.2%} | {m['tis_mean']:.4f} | {m['tis_at_cap']:.2%} |")


if __name__ == "__main__":
    main()
