"""Supervised stage of any latent method on megatron-core (`--latent-method`: lvr, hylar, none;
each method's own flags below).

    torchrun --nproc-per-node 8 pretrain_scripts/pretrain_sft.py --latent-method lvr \\
        --hf-dir Qwen2.5-VL-7B-Instruct --data-path data/meta_data_lvr_sft_stage1.json \\
        --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 64 \\
        --seq-length 8192 --train-iters 2500 --lr 1e-5 --lr-warmup-iters 50 --bf16 \\
        --save ckpt/lvr7b --load ckpt/lvr7b --save-interval 250

Flags follow Megatron-LM's names. `--load` on a directory with a checkpoint resumes exactly
(model, optimizer, scheduler, RNG, data position) with the method it recorded; on a converted
checkpoint it starts from its weights. With neither, `--hf-dir` gives the initial weights.
HyLaR: `--latent-method hylar --canvas-encoder SIGLIP_DIR` on Zebra-CoT-style parquet data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def parse_args(argv=None, default_method: str | None = None):
    from megatron_latent.latent import registry
    from megatron_latent.training.cli import add_common_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=1e-5, decay="cosine")
    registry.add_args(p, default=default_method)
    a = p.add_argument
    a("--valid-data-path")
    a("--eval-interval", type=int, default=0)
    a("--eval-iters", type=int, default=1)
    a("--eval-latent-probes", action="store_true",
      help="at each evaluation also log the cheap latent probes (homogeneity, grounding, "
           "scale of the teacher-forced latents; tools/latent_probe.py has all of them)")
    a("--sequence-parallel", action="store_true")
    a("--micro-batch-size", type=int, default=1)
    a("--global-batch-size", type=int, default=1)
    a("--max-pixels", type=int, default=5120 * 28 * 28)
    a("--skip-bad-samples", action="store_true", help="skip (and count) bad records instead of failing")
    a("--pack-sequences", action="store_true",
      help="THD packing: each micro-batch's samples in one row, no padding (TE spec)")
    return p.parse_args(argv)


def config_from_args(args):
    from megatron_latent.latent import registry
    from megatron_latent.training.cli import common_config
    from megatron_latent.training.trainer import TrainConfig

    hparams = registry.hparams_from_args(args.latent_method, args) if args.latent_method else {}
    return TrainConfig(
        **common_config(args), valid_data_path=args.valid_data_path,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        eval_latent_probes=args.eval_latent_probes,
        sequence_parallel=args.sequence_parallel, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, latent_method=args.latent_method,
        latent_hparams=hparams,
        max_pixels=args.max_pixels, skip_bad_samples=args.skip_bad_samples,
        pack_sequences=args.pack_sequences)


def main(argv=None, default_method: str | None = None):
    from megatron_latent import parallel
    from megatron_latent.training.trainer import train

    train(config_from_args(parse_args(argv, default_method)))
    parallel.destroy()


if __name__ == "__main__":
    main()
