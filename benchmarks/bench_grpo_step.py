"""One co-located GRPO step on a 7B-shaped random model: rollout, reference scoring, training,
and the next rollout's first token, on the same GPUs with one copy of the policy weights.

    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py --tp 2 [--prompts 8 --group 8]

Prompts as in bench_generate.py (one 448x448 image + 64 text tokens + <|lvr_start|>; 8 latent
steps, 128 new tokens, sampled at T=0.9). Reports rollout tokens/s (generated tokens / rollout
wall time), train tokens/s (real tokens of all rollouts / train-step wall time), reference
scoring time, the time from the end of the optimizer step to the next rollout's first token,
and the mean |log p_train - log p_rollout| of the sampled tokens at step 0 (bf16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--latent-steps", type=int, default=8)
    ap.add_argument("--spec", choices=["te", "local"], default="te")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--steps", type=int, default=2, help="timings are those of the last step")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from bench_generate import SHAPES, hf_config, make_prompts
    from megatron_latent import parallel
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.latent.decoding import LatentRule
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.rl.losses import GRPOLoss
    from megatron_latent.rl.objective import RLObjective, TokenScorer
    from megatron_latent.rl.rollout import rollout_micro_batches
    from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                                unwrap)
    from megatron_latent.training.step import forward_outputs, train_step

    parallel.initialize(parallel.ParallelConfig(args.tp), seed=0)
    rank0 = dist.get_rank() == 0
    shape = SHAPES[args.shape]
    cfg = Qwen25VLConfig.from_hf(hf_config(shape).to_dict(), tensor_model_parallel_size=args.tp,
                                 spec=args.spec, params_dtype=torch.bfloat16)
    model = build_model(cfg, None)  # random init: timing only
    optimizer = build_optimizer(model, OptimSettings(lr=1e-6))
    reference = build_model(cfg, None, wrap_ddp=False)
    reference[0].load_state_dict(unwrap(model[0]).state_dict())
    for p in reference[0].parameters():
        p.requires_grad_(False)
    ids = shape["ids"]
    rule = LatentRule(ids["lvr_start"], ids["lvr"], ids["lvr_end"], "steps", args.latent_steps)
    policy = unwrap(model[0])
    gen = Generator(policy, rule=rule, cuda_graphs=args.cuda_graphs)
    cuda = torch.cuda.is_available()  # CPU: a smoke run of the script only (--shape tiny)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    prompts = make_prompts(shape, args.prompts, 64, 448, dev)
    rollouts = [p for p in prompts for _ in range(args.group)]
    objective = RLObjective(GRPOLoss(), temperature=0.9)

    def sync_time():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def one_step(step: int) -> dict:
        t = {"t0": sync_time()}
        policy.eval()
        comps = gen.generate(rollouts, SamplingParams(max_new_tokens=args.new_tokens,
                                                      temperature=0.9, seed=step))
        gen.release()
        t["rollout"] = sync_time()
        policy.train()
        adv = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(step))
        longest = max(len(p.input_ids) + len(c.tokens) for p, c in zip(rollouts, comps))
        mbs = rollout_micro_batches(rollouts, comps, adv, cfg=cfg, pad_id=0,
                                    micro_batch_size=args.micro_batch,
                                    pad_to=-(-longest // (8 * args.tp)) * 8 * args.tp,
                                    exclude_ids=(rule.start_id,))
        t["built"] = sync_time()
        for mb, lp in zip(mbs, forward_outputs(reference, mbs, TokenScorer(0.9))):
            mb["ref_logprobs"] = lp
        t["reference"] = sync_time()
        if step == 0:  # the policy is still the reference: rollout vs train log-probs
            scored = forward_outputs(model, mbs, TokenScorer(0.9))
            t["diffs"] = torch.cat([(lp.float().cpu() - mb["old_logprobs"])
                                    [mb["loss_mask"].bool()] for mb, lp in zip(mbs, scored)])
        t["t4"] = sync_time()
        t["out"] = train_step(model, optimizer, mbs, objective)
        t["train"] = sync_time()
        policy.eval()
        gen.generate(rollouts, SamplingParams(max_new_tokens=1))
        t["first_token"] = sync_time()
        t["n_gen"] = sum(len(c.tokens) for c in comps)
        t["n_train"] = sum(len(p.input_ids) + len(c.tokens) for p, c in zip(rollouts, comps))
        return t

    runs = [one_step(k) for k in range(args.steps)]
    t, diffs, out = runs[-1], runs[0]["diffs"], runs[-1]["out"]
    t0, t1, t2, t3, t4, t5, t6 = (t["t0"], t["rollout"], t["built"], t["reference"], t["t4"],
                                  t["train"], t["first_token"])
    n_gen, n_train = t["n_gen"], t["n_train"]
    if rank0:
        print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'} x{dist.get_world_size()}, TP={args.tp}, "
              f"shape {args.shape}, spec {args.spec}, {len(rollouts)} rollouts "
              f"({args.prompts} prompts x {args.group}), {args.new_tokens} new tokens "
              f"({args.latent_steps} latent), cuda graphs {args.cuda_graphs}; "
              f"timings of step {args.steps} of {args.steps}")
        print(f"rollout: {t1 - t0:.2f} s, {n_gen / (t1 - t0):,.0f} generated tokens/s")
        print(f"reference scoring: {t3 - t2:.2f} s")
        print(f"train step: {t5 - t4:.2f} s, {n_train / (t5 - t4):,.0f} tokens/s "
              f"(ratio {out['ratio']:.4f}, clip fraction {out['clip fraction']:.4f})")
        print(f"optimizer step end -> next rollout's first token: {t6 - t5:.2f} s")
        print(f"step 0 |log p_train - log p_rollout| over {diffs.numel()} sampled tokens: "
              f"mean {diffs.abs().mean():.2e}, max {diffs.abs().max():.2e}")
    parallel.destroy()


if __name__ == "__main__":
    main()
