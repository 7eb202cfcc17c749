"""LVR stage-1 SFT on megatron-core (latent steps regress the box's visual tokens).

    torchrun --nproc-per-node 8 pretrain_scripts/pretrain_lvr.py \\
        --hf-dir Qwen2.5-VL-7B-Instruct --data-path data/meta_data_lvr_sft_stage1.json \\
        --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 64 \\
        --seq-length 8192 --train-iters 2500 --lr 1e-5 --lr-warmup-iters 50 --bf16 \\
        --save ckpt/lvr7b --load ckpt/lvr7b --save-interval 250

Flags follow Megatron-LM's names. `--load` on a directory with a checkpoint resumes exactly
(model, optimizer, scheduler, RNG, data position); on a converted checkpoint it starts from its
weights. With neither, `--hf-dir` gives the initial weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-path", required=True, help="LVR JSON list or meta JSON")
    a("--valid-data-path")
    a("--hf-dir", help="HF Qwen2.5-VL checkpoint for the initial weights and tokenizer")
    a("--load", help="megatron_latent checkpoint dir to resume or start from")
    a("--save", help="checkpoint dir")
    a("--save-interval", type=int, default=0)
    a("--keep-last", type=int, default=None, help="keep only the newest N iterations")
    a("--eval-interval", type=int, default=0)
    a("--eval-iters", type=int, default=1)
    a("--tensor-model-parallel-size", type=int, default=1)
    a("--pipeline-model-parallel-size", type=int, default=1)
    a("--sequence-parallel", action="store_true")
    a("--transformer-impl", choices=["transformer_engine", "local"], default="local")
    a("--bf16", action="store_true")
    a("--micro-batch-size", type=int, default=1)
    a("--global-batch-size", type=int, default=1)
    a("--seq-length", type=int, default=4096)
    a("--train-iters", type=int, required=True)
    a("--lr", type=float, default=1e-5)
    a("--min-lr", type=float, default=0.0)
    a("--vision-lr", type=float, default=None, help="LR of the vision tower (if trained)")
    a("--merger-lr", type=float, default=None, help="LR of the patch merger (if trained)")
    a("--lr-warmup-iters", type=int, default=0)
    a("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    a("--weight-decay", type=float, default=0.0)
    a("--adam-beta1", type=float, default=0.9)
    a("--adam-beta2", type=float, default=0.95)
    a("--clip-grad", type=float, default=1.0)
    a("--use-distributed-optimizer", action="store_true")
    a("--train-vision", action="store_true", help="train the vision tower (frozen by default)")
    a("--train-merger", action="store_true", help="train the patch merger (frozen by default)")
    a("--lvr-loss-lambda", type=float, default=0.1)
    a("--min-pixels", type=int, default=128 * 28 * 28)
    a("--max-pixels", type=int, default=5120 * 28 * 28)
    a("--skip-bad-samples", action="store_true", help="skip (and count) bad records instead of failing")
    a("--seed", type=int, default=1234)
    a("--wandb-project", default="megatron_latent")
    a("--wandb-exp-name", default=None)
    a("--wandb-mode", default=None, help="offline (default), online or disabled")
    a("--log-dir", default=None)
    return p.parse_args(argv)


def config_from_args(args):
    from megatron_latent.training.build import OptimSettings
    from megatron_latent.training.trainer import TrainConfig

    optim = OptimSettings(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                          adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                          clip_grad=args.clip_grad, vision_lr=args.vision_lr,
                          merger_lr=args.merger_lr,
                          use_distributed_optimizer=args.use_distributed_optimizer)
    return TrainConfig(
        data_path=args.data_path, valid_data_path=args.valid_data_path, hf_dir=args.hf_dir,
        load=args.load, save=args.save, save_interval=args.save_interval,
        keep_last=args.keep_last, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        spec="te" if args.transformer_impl == "transformer_engine" else "local", bf16=args.bf16,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, train_iters=args.train_iters,
        lr_warmup_iters=args.lr_warmup_iters, lr_decay_style=args.lr_decay_style, optim=optim,
        freeze_vision=not args.train_vision, freeze_merger=not args.train_merger,
        lvr_lambda=args.lvr_loss_lambda, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        skip_bad_samples=args.skip_bad_samples, seed=args.seed,
        wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
        wandb_mode=args.wandb_mode, log_dir=args.log_dir)


def main(argv=None):
    from megatron_latent import parallel
    from megatron_latent.training.trainer import train

    train(config_from_args(parse_args(argv)))
    parallel.destroy()


if __name__ == "__main__":
    main()
