"""Command-line flags shared by the training scripts (Megatron-LM's names)."""

from __future__ import annotations

import argparse


def add_common_args(p: argparse.ArgumentParser, *, lr: float, decay: str) -> None:
    a = p.add_argument
    a("--data-path", required=True, help="records JSON list or meta JSON")
    a("--hf-dir", help="HF Qwen2.5-VL checkpoint for the initial weights and tokenizer")
    a("--pretrained-checkpoint", help="megatron_latent checkpoint whose weights start a fresh run "
      "(e.g. the SFT run for RL) when --load holds no checkpoint")
    a("--load", help="checkpoint dir to resume (usually the same as --save)")
    a("--save", help="checkpoint dir")
    a("--save-interval", type=int, default=0)
    a("--keep-last", type=int, default=None, help="keep only the newest N iterations")
    a("--tensor-model-parallel-size", type=int, default=1)
    a("--pipeline-model-parallel-size", type=int, default=1)
    a("--transformer-impl", choices=["transformer_engine", "local"], default="local")
    a("--bf16", action="store_true")
    a("--seq-length", type=int, default=4096)
    a("--train-iters", type=int, required=True)
    a("--lr", type=float, default=lr)
    a("--min-lr", type=float, default=0.0)
    a("--vision-lr", type=float, default=None, help="LR of the vision tower (if trained)")
    a("--merger-lr", type=float, default=None, help="LR of the patch merger (if trained)")
    a("--lr-warmup-iters", type=int, default=0)
    a("--lr-decay-style", choices=["cosine", "linear", "constant"], default=decay)
    a("--weight-decay", type=float, default=0.0)
    a("--adam-beta1", type=float, default=0.9)
    a("--adam-beta2", type=float, default=0.95)
    a("--clip-grad", type=float, default=1.0)
    a("--use-distributed-optimizer", action="store_true")
    a("--use-precision-aware-optimizer", action="store_true",
      help="TE FusedAdam keeps the fp32 masters and writes bf16 params in its kernel (TE, "
      "with --use-distributed-optimizer)")
    a("--train-vision", action="store_true", help="train the vision tower (frozen by default)")
    a("--train-merger", action="store_true", help="train the patch merger (frozen by default)")
    a("--min-pixels", type=int, default=128 * 28 * 28)
    a("--fp8-format", choices=["hybrid", "e4m3"], default=None, help="FP8 LLM linears (TE)")
    a("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"],
      default="tensorwise")
    a("--vision-fp8", action="store_true", help="the vision tower in FP8 too (default bf16)")
    a("--recompute-granularity", choices=["selective", "full"], default=None)
    a("--recompute-method", choices=["uniform", "block"], default=None)
    a("--recompute-num-layers", type=int, default=None)
    a("--no-fused-kernels", action="store_true", help="turn TE-path kernel fusions off")
    a("--cross-entropy-fusion-impl", choices=["triton", "native", "te"], default="triton",
      help="fused CE kernel: ours in Triton (default), megatron's native one, or TE's "
           "(Megatron-LM rejects TE's for stability)")
    a("--vision-graphs", type=int, default=4,
      help="CUDA graphs of the frozen vision tower kept, one per image layout (0: off)")
    a("--seed", type=int, default=1234)
    for what in ("data-path", "global-batch-size", "seed"):
        a(f"--override-{what}", action="store_true", help=f"resume although the checkpoint "
          f"recorded another --{what} (logged; refused otherwise)")
    a("--allow-images-outside-folder", action="store_true",
      help="let records name images outside their image folder (absolute or '..' paths)")
    a("--wandb-project", default="megatron_latent")
    a("--wandb-exp-name", default=None)
    a("--wandb-mode", default=None, help="offline (default), online or disabled")
    a("--log-dir", default=None)


def optim_from_args(args):
    from megatron_latent.training.build import OptimSettings

    return OptimSettings(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                         adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                         clip_grad=args.clip_grad, vision_lr=args.vision_lr,
                         merger_lr=args.merger_lr,
                         use_distributed_optimizer=args.use_distributed_optimizer,
                         precision_aware=args.use_precision_aware_optimizer)


def common_config(args) -> dict:
    """The config fields every training loop takes, from the common flags."""
    return dict(
        data_path=args.data_path, hf_dir=args.hf_dir,
        pretrained_checkpoint=args.pretrained_checkpoint, load=args.load, save=args.save,
        save_interval=args.save_interval, keep_last=args.keep_last,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        spec="te" if args.transformer_impl == "transformer_engine" else "local", bf16=args.bf16,
        seq_length=args.seq_length, train_iters=args.train_iters,
        lr_warmup_iters=args.lr_warmup_iters, lr_decay_style=args.lr_decay_style,
        optim=optim_from_args(args), freeze_vision=not args.train_vision,
        freeze_merger=not args.train_merger, min_pixels=args.min_pixels, seed=args.seed,
        wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
        wandb_mode=args.wandb_mode, log_dir=args.log_dir, model_overrides=perf_overrides(args),
        resume_overrides=tuple(k for k, flag in (("data_path", args.override_data_path),
                                                 ("batch", args.override_global_batch_size),
                                                 ("seed", args.override_seed)) if flag),
        allow_images_outside_folder=args.allow_images_outside_folder)


def perf_overrides(args) -> dict:
    """Qwen25VLConfig fields for precision, recompute and fusions (docs/performance.md)."""
    out = dict(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe, vision_fp8=args.vision_fp8,
               recompute_granularity=args.recompute_granularity,
               recompute_method=args.recompute_method,
               recompute_num_layers=args.recompute_num_layers, vision_graphs=args.vision_graphs,
               cross_entropy_fusion_impl=args.cross_entropy_fusion_impl)
    if args.no_fused_kernels:
        out["fused_kernels"] = False
    return out
