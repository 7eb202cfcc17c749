"""LVR stage 2: co-located GRPO on megatron-core (rollout and training share the GPUs and the
weights).

    torchrun --nproc-per-node 8 pretrain_scripts/train_grpo.py \\
        --hf-dir ckpt/lvr7b-sft-hf --data-path data/meta_rl.json \\
        --tensor-model-parallel-size 2 --prompts-per-step 32 --group-size 8 \\
        --micro-batch-size 8 --max-new-tokens 512 --seq-length 4096 --bf16 \\
        --train-iters 500 --lr 5e-6 --save ckpt/lvr7b-grpo --load ckpt/lvr7b-grpo

Same checkpoint, resume and logging flags as pretrain_sft.py; the latent method is the
--pretrained-checkpoint's (recorded in it), and so is its RL recipe: the policy loss (LVR: GRPO;
HyLaR: DePO, its --depo-* flags), and the defaults of the clip, KL, rewards and group filter
below (docs/rl.md). Per step it logs reward (and each reward term), the policy terms, KL, clip
fractions, response length, latent-span rate, the filter's tries and kept share, rollout and
train seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def parse_args(argv=None):
    from megatron_latent.latent import registry
    from megatron_latent.training.cli import add_common_args

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=5e-6, decay="constant")
    p.set_defaults(weight_decay=0.1)  # the seed's stage 2, and GRPOConfig's (docs/rl.md)
    a = p.add_argument
    a("--reference", default=None, help="frozen reference (HF dir or checkpoint); default --hf-dir")
    a("--prompts-per-step", type=int, default=4, help="prompts per step over all DP ranks")
    a("--group-size", type=int, default=8, help="rollouts per prompt")
    a("--micro-batch-size", type=int, default=4, help="rollouts per micro-batch")
    a("--max-new-tokens", type=int, default=512)
    a("--temperature", type=float, default=0.9)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=50)
    registry.add_args(p, default=None)  # default: the --pretrained-checkpoint's method
    a("--latent-mode", default=None, help="default: the method's (LVR steps, HyLaR forced)")
    a("--latent-steps", type=int, default=None,
      help="latent steps or their cap (default: the method's: LVR 8, HyLaR 32)")
    a("--answer-prefix", default="", help='text after the assistant header, e.g. "<|lvr_start|>"')
    a("--system-prompt", default="You are a helpful assistant.")
    a("--rewards", default=None,
      help="name:weight,... (default: the method's: LVR accuracy:1,format:1; HyLaR "
           "accuracy:0.9,format:0.1)")
    a("--reward-module", default=None,
      help="module or .py file imported first; it registers your rewards (register_reward)")
    a("--judge", default=None,
      help="MODULE:FUNCTION or FILE.py:FUNCTION, a local judge re-scoring answers the rules "
           "find wrong (batched: list[JudgeItem] -> list[bool | None])")
    a("--eps-clip", type=float, default=None, help="lower clip (default: the method's, 0.2)")
    a("--eps-clip-high", type=float, default=None,
      help="upper clip (default: --eps-clip if given, else the method's: LVR 0.2, HyLaR 0.28)")
    a("--kl-beta", type=float, default=None, help="default: the method's (LVR 0.04, HyLaR 0.05)")
    a("--filter-low", type=float, default=None,
      help="keep groups whose mean --filter-reward is above this (HyLaR: 0.1; LVR: off)")
    a("--filter-high", type=float, default=None, help="... and below this (HyLaR: 0.9)")
    a("--filter-reward", default="accuracy")
    a("--max-refill-tries", type=int, default=20,
      help="generations per step at most while the filter keeps too few groups")
    a("--ppo-epochs", type=int, default=1)
    a("--rollout-correction", choices=("none", "recompute", "tis"), default=None,
      help="train/rollout mismatch: none (the rollout's log-probs are the old policy), "
           "recompute (a training forward gives them), tis (truncated importance sampling "
           "between the training and rollout policies); default tis with --rollout-precision "
           "fp8, else none (docs/rl.md)")
    a("--rollout-precision", choices=("params", "fp8"), default="params",
      help="params: rollouts in the parameters' dtype; fp8: the LLM decoder's linears on FP8 "
           "copies of the weights, per-channel/per-token scales (docs/rl.md)")
    a("--tis-cap", type=float, default=2.0, help="truncation of the tis weights")
    a("--offload-reference", action="store_true", help="keep the reference on the host")
    a("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs")
    a("--max-pixels", type=int, default=2560 * 28 * 28)
    return p.parse_args(argv)


def config_from_args(args):
    from megatron_latent.latent import registry
    from megatron_latent.rl.loop import GRPOConfig
    from megatron_latent.training.cli import common_config

    hparams = registry.flagged_hparams(args, args.latent_method)
    return GRPOConfig(
        **common_config(args), reference=args.reference, prompts_per_step=args.prompts_per_step,
        group_size=args.group_size, micro_batch_size=args.micro_batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, latent_method=args.latent_method, latent_hparams=hparams,
        latent_mode=args.latent_mode,
        latent_steps=args.latent_steps, answer_prefix=args.answer_prefix,
        system_prompt=args.system_prompt or None, rewards=args.rewards,
        reward_module=args.reward_module, judge=args.judge,
        eps_low=args.eps_clip,
        eps_high=args.eps_clip_high if args.eps_clip_high is not None else args.eps_clip,
        kl_beta=args.kl_beta, filter_low=args.filter_low, filter_high=args.filter_high,
        filter_reward=args.filter_reward, max_refill_tries=args.max_refill_tries,
        ppo_epochs=args.ppo_epochs, rollout_correction=args.rollout_correction,
        tis_cap=args.tis_cap, rollout_precision=args.rollout_precision,
        offload_reference=args.offload_reference, cuda_graphs=args.cuda_graphs,
        max_pixels=args.max_pixels)


def main(argv=None):
    from megatron_latent import parallel
    from megatron_latent.rl.loop import run_grpo

    run_grpo(config_from_args(parse_args(argv)))
    parallel.destroy()


if __name__ == "__main__":
    main()
