"""Tiny forward/backward demo of the Megatron Qwen2.5-VL on real photos (CPU or GPU).

    torchrun --nproc-per-node 2 pretrain_scripts/pretrain_demo.py --tensor-model-parallel-size 2

With no --hf-dir it builds a tiny random Qwen2.5-VL checkpoint first. It trains a few steps on a
two-sample batch (three photos from scikit-image) and logs loss, step time and ETA.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="HF Qwen2.5-VL checkpoint (default: a tiny random one)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--spec", choices=["local", "te"], default="local")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--wandb-mode", default=None, help="offline (default), online or disabled")
    return p.parse_args(argv)


def main(argv=None):
    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor

    from megatron_latent import parallel
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.testing.samples import two_sample_micro_batch
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl
    from megatron_latent.training.build import OptimSettings, build_model, build_optimizer
    from megatron_latent.training.run_logger import RunLogger
    from megatron_latent.training.step import train_step

    args = parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    parallel.initialize(parallel.ParallelConfig(tp, pp), seed=args.seed)
    hf_dir, tmp = args.hf_dir, None
    if hf_dir is None:
        tmp = tempfile.mkdtemp(prefix="tiny_qwen25vl_") if dist.get_rank() == 0 else None
        box = [tmp]
        dist.broadcast_object_list(box)
        hf_dir = tmp = box[0]  # every rank knows it (all of them clean up together)
        if dist.get_rank() == 0:
            make_tiny_qwen25vl(Path(hf_dir) / "ckpt", preset="tiny-a", seed=0)
        dist.barrier()
        hf_dir = str(Path(hf_dir) / "ckpt")
    cfg = Qwen25VLConfig.from_hf(hf_dir, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, spec=args.spec,
                                 params_dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = build_model(cfg, hf_dir)
    optimizer = build_optimizer(model, OptimSettings(lr=args.lr))
    mb = two_sample_micro_batch(AutoProcessor.from_pretrained(hf_dir), cfg)
    log = RunLogger(args.train_iters, run_name="demo", config=vars(args), wandb_mode=args.wandb_mode)
    for step in range(1, args.train_iters + 1):
        out = train_step(model, optimizer, [mb])
        log.log(step, {"loss": out["loss"], "grad_norm": float(out["grad_norm"])})
    log.finish()
    if tmp is not None:  # the demo's own tiny checkpoint (rank 0 made it)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
