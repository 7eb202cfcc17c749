"""LVR SFT training-step throughput: our Megatron model vs the seeds' HF-transformers path, same
GPU, same random weights, same batch, one run.

    python benchmarks/bench_sft.py [--shape 7b-4l] [--spec te] [--precision bf16|fp8]
    torchrun --nproc-per-node 2 benchmarks/bench_sft.py --shape 7b --tp 2   # ours only
    python benchmarks/bench_sft.py --shape tiny --spec local --steps 1 --warmup 0 \\
        --seq-length 512 --image 112                                         # CPU smoke run
    python benchmarks/bench_sft.py --shape 7b-4l --method lvr hylar --skip-hf \\
        --num-micro-batches 8                    # LVR vs HyLaR (canvas encoder), one process
    python benchmarks/bench_sft.py --shape 7b-4l --spec local --method lvr deeplatent \\
        --skip-hf --num-micro-batches 8          # LVR vs DeepLatent stage 2, one process

Shapes: `7b-4l` (default): Qwen2.5-VL-7B text dims with 4 LLM layers and the full 32-block
vision tower; `7b`: all 28 layers (ours only unless `--hf`; for 2-4 GPUs with `--tp`);
`tiny`: for a CPU smoke run.

One step = `--num-micro-batches` micro-batches of `--micro-batch-size` samples of
`--seq-length` tokens (gradient accumulation), then the optimizer step. Each sample: one
`--image` x `--image` image (448: 1024 patches, 256 merged tokens) right after the start, random
text, and in the middle `<|lvr_start|>`, `--latent-tokens` `<|lvr|>` positions (teacher-forced
with 8 of the image's merged tokens), `<|lvr_end|>`, then more random text. Loss (both paths):
CE over the second half of the sequence (targets `<|lvr|>` excluded) + lambda * MSE(final-norm
hidden state at t, visual token injected at t+1), each a mean over the whole step.

Ours (micro-batches read from pinned host memory, as in training; HF gets them on the GPU):
megatron-core DDP (fp32 grad buffers) + megatron's Float16 optimizer (Adam, fp32 main
params) on bf16 params, `train_step` through the megatron-core schedule, LVR latent method;
`--use-precision-aware-optimizer`: megatron's distributed optimizer with TE's FusedAdam keeping
the fp32 master weights itself and writing the bf16 params in the Adam kernel.
HF: `Qwen2_5_VLForConditionalGeneration` (sdpa attention, bf16 params) with the LVR injection
written against its modules (as the seeds do), in one or more `--hf-recipe`s, each its own row
and ratio column of the same run:
  fastest: `torch.optim.AdamW(fused=True)` straight on the bf16 weights and grads, no activation
    checkpointing: the quickest HF step on one GPU (cheaper than what the seeds run);
  seeds: what the seeds' LVR stage-1 script runs, less ZeRO's CPU offload: reentrant gradient
    checkpointing of every decoder layer, and fp32 master weights and moments with the bf16
    grads upcast each step (DeepSpeed's bf16 optimizer). The frozen tower runs forward only, as
    under the seeds' transformers 4.51 (see the comment on disable_input_require_grads).
Both clip the grad norm at 1.0. The vision tower and merger are frozen in both paths (the LVR
default) unless `--train-vision`. The seeds run 8 micro-batches per step (grad-accum 8):
`--num-micro-batches 8` reproduces that.

Metrics, per path, from the mean wall time of `--steps` back-to-back steps after `--warmup` steps,
waited for once at the end (a training loop's steady state; ours as its loop runs them, step n+1
launched before step n's logs are read; neither path waits for the GPU inside a step):
  tokens/s = dp * mbs * num_micro * seq_length / step_time   (ALL tokens: text, image, latent)
  model TFLOP/s per GPU = F / step_time / n_gpus, with
    F = 6 * N_llm * T  +  6 * L * h * s * T                                      (LLM)
      + c * (N_vit * P + N_merger * P / 4)  +  (c / 2) * 4 * h_v * sum_layers sum_windows w^2   (ViT)
    T = tokens of the step, s = seq_length, L/h = LLM layers/hidden size (h = heads * head_dim),
    N_llm = LLM parameters without the input embedding (decoder layers + final norm + output
    layer), 6 * L * h * s * T = causal attention (12 * L * h * s * T halved);
    P = image patches of the step, N_vit = patch embedding + vision blocks, N_merger = the patch
    merger (it runs on P / 4 merged tokens), w = tokens of an attention window (64 patches for
    a 112-pixel window, all P_img patches of an image in the full-attention blocks), h_v = the
    vision hidden size; c = 6 when the vision tower trains; c = 2 when it is frozen: then nothing
    in it or upstream of it needs a gradient (pixels are data, the latent targets are detached),
    so it runs forward only — no activation-gradient (2NP) nor weight-gradient (2NP) backward.
    Activation recompute is not counted (model FLOPs, not hardware FLOPs).
  peak GiB = torch.cuda.max_memory_allocated() over the timed steps (reset before each path;
    weights, grads and optimizer state included); max over ranks.
  ratio vs HF = per-GPU tokens/s of the path / HF's (one GPU) = HF step time / our step time
    at tp = 1.

HyLaR (`--method lvr hylar`: both timed in this process, same shape, back to back, then the
ratio; `--method hylar` alone also works): HyLaR built through the registry
(`method_class("hylar").create`) with its canvas encoder beside the model (frozen SigLIP held
outside the module tree -> learnable query compressor -> projector; the side modules in DDP and
the optimizer at HyLaR's canvas LR), and the same micro-batches as LVR's but for the latent
span: its `--canvas-tokens` slots are `<|canvas|>` slots (the same token ids, so the same
input_ids when `--latent-tokens` = `--canvas-tokens`, the default when hylar runs), no
`latent_index`, and one `--canvas-image` reasoning image per sample in
`canvas_pixel_values [n, 3, S, S]` (fp32, as SigLIP's processor gives them). The SigLIP is
`--siglip` (so400m: so400m-patch14-384's vision tower, random weights, written offline to
`--canvas-encoder` or a temporary folder; tiny with `--shape tiny`). HyLaR's tokens/s counts the
same tokens as LVR's; its TFLOP/s counts the same model FLOPs (LLM + Qwen vision), not the
canvas path's; `canvas path cost = 1 - tokens/s HyLaR / tokens/s LVR`. On the GPU a standalone
breakdown of the canvas path per step (SigLIP forward; compressor + projector forward and
backward) is printed and saved too.

DeepLatent (`--method lvr deeplatent`): stage 2 as benchmarks/sft_deeplatent.py builds it (one
`--deeplatent-grid`^2 latent block a sample in the middle, a teacher-state cache of random
states written to `--deeplatent-dir` or a temporary folder); its step includes the context pass
and the cache read; its TFLOP/s counts the training pass's model FLOPs only.

Correctness (untimed): the loss of both paths at the shared initial weights (forward only) is
printed as "loss ours X / HF Y"; with `--dtype fp32` they must agree to 1e-4 relative (the
script exits 1 otherwise); in bf16 they differ at ~1e-2.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from profiling import profile_call  # noqa: E402
from sft_hf import (HF_RECIPES, LAMBDA, MasterAdamW, hf_loss, hf_step_totals,  # noqa: E402
                    hf_train_step)

FP32_RTOL = 1e-4
FLOPS_FORMULA = ("F = 6*N_llm*T + 6*L*h*s*T + c*(N_vit*P + N_merger*P/4) + (c/2)*4*h_v*sum(w^2); "
                 "c = 2 (frozen ViT: forward only) or 6 (trained ViT)")


def sft_shapes() -> dict:
    from bench_generate import SHAPES

    seven = SHAPES["7b"]
    return {"7b-4l": {**seven, "text": {**seven["text"], "num_hidden_layers": 4}},
            "7b": seven, "3b": SHAPES["3b"], "tiny": SHAPES["tiny"]}


# ------------------------------------------------------------------------------------ batch
def make_micro_batches(shape: dict, *, seq_length: int, mbs: int, num_micro: int, image: int,
                       latent_tokens: int, dtype, device, text=None, lvr_at: int | None = None,
                       seed: int = 1000) -> list[dict]:
    """Deterministic synthetic LVR micro-batches in the layout of data/collate.py (no padding):
    random text (or `text(generator, n)`'s tokens), `<|lvr_start|>` at `lvr_at` (default: the
    middle)."""
    import torch

    from megatron_latent.models.qwen25vl.rope_index import rope_index

    ids = shape["ids"]
    if image % 28:
        raise SystemExit(f"--image {image} must be a multiple of 28 (patch 14 x merge 2)")
    side = image // 14
    n_patch, n_img = side * side, side * side // 4
    if latent_tokens > n_img:
        raise SystemExit(f"--latent-tokens {latent_tokens} > the image's {n_img} merged tokens")
    s = seq_length
    a = max(s // 2 if lvr_at is None else lvr_at, n_img + 3)  # after the image: the answer
    if a + latent_tokens + 2 >= s:
        raise SystemExit(f"--seq-length {s} too short for a {n_img}-token image and "
                         f"{latent_tokens} latent tokens")
    high = min(ids.values()) - 16  # random text stays clear of the special ids
    out = []
    for m in range(num_micro):
        g = torch.Generator().manual_seed(seed + m)
        rows, labels, masks, lat = [], [], [], []
        for r in range(mbs):
            seq = torch.randint(0, high, (s,), generator=g) if text is None else text(g, s)
            seq[0], seq[1 + n_img] = ids["vision_start"], ids["vision_end"]
            seq[1:1 + n_img] = ids["image"]
            seq[a], seq[a + 1 + latent_tokens] = ids["lvr_start"], ids["lvr_end"]
            seq[a + 1:a + 1 + latent_tokens] = ids["lvr"]
            lab = torch.cat([seq[1:], seq[:1]])  # labels[t] = token t+1 (last one unsupervised)
            mask = torch.zeros(s)
            mask[a - 1:s - 1] = 1.0
            mask[lab == ids["lvr"]] = 0.0
            rows.append(seq), labels.append(lab), masks.append(mask)
            pick = torch.randperm(n_img, generator=g)[:latent_tokens].sort().values
            lat.append(pick + r * n_img)
        input_ids = torch.stack(rows)
        grid = torch.tensor([[1, side, side]] * mbs)
        position_ids, _ = rope_index(input_ids, grid, image_token_id=ids["image"],
                                     spatial_merge_size=2)
        mb = {"input_ids": input_ids, "labels": torch.stack(labels),
              "loss_mask": torch.stack(masks), "position_ids": position_ids,
              "pixel_values": torch.randn(mbs * n_patch, 3 * 2 * 14 * 14, generator=g).to(dtype),
              "image_grid_thw": grid, "latent_mask": input_ids == ids["lvr"],
              "latent_index": torch.cat(lat)}
        out.append({k: v.to(device) for k, v in mb.items()})
    return out


# ------------------------------------------------------------------------------------ FLOPs
def count_params(cfg_hf) -> dict:
    """Parameter counts by part, from a meta-device HF model (no memory, exact)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration._from_config(cfg_hf)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    lm = m.model.language_model
    llm = n(lm) - n(lm.embed_tokens) + (0 if cfg_hf.tie_word_embeddings else n(m.lm_head))
    if cfg_hf.tie_word_embeddings:  # the output layer still costs 2*V*h per token
        llm += n(lm.embed_tokens)
    merger = n(m.model.visual.merger)
    return {"llm": llm, "embedding": n(lm.embed_tokens), "vit": n(m.model.visual) - merger,
            "merger": merger}


def window_sum_sq(side: int, window_size: int) -> int:
    """sum over the attention windows of one image of (patches in the window)^2."""
    grid, unit = side // 2, window_size // 14 // 2  # merged units
    sizes = [min(unit, grid - i) for i in range(0, grid, unit)]
    return sum((a * b * 4) ** 2 for a in sizes for b in sizes)


def step_flops(shape: dict, params: dict, *, tokens: int, seq_length: int, images: int,
               image: int, train_vision: bool) -> dict:
    text, vis = shape["text"], shape["vision"]
    L, h = text["num_hidden_layers"], text["hidden_size"]
    side = image // 14
    p_img = side * side
    P = images * p_img
    llm = 6 * params["llm"] * tokens + 6 * L * h * seq_length * tokens
    c = 6 if train_vision else 2
    n_full = len(vis["fullatt_block_indexes"])
    per_image = (n_full * p_img ** 2
                 + (vis["depth"] - n_full) * window_sum_sq(side, vis["window_size"]))
    vit = c * (params["vit"] * P + params["merger"] * P / 4) + (c / 2) * 4 * vis["hidden_size"] \
        * per_image * images
    return {"llm": llm, "vision": vit, "total": llm + vit}


# ------------------------------------------------------------------------------------ timing
def time_steps(step, warmup: int, steps: int, cuda: bool, finish=lambda: None) -> dict:
    """Mean wall time of `steps` back-to-back steps, one wait for the GPU at the end (a
    training loop's steady state: a step that does not wait for the GPU overlaps its host
    work with the previous step's kernels). `finish` reads whatever a lagging step left
    pending. Per-step times from CUDA events between steps (GPU side)."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    finish()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
    t = time.perf_counter()
    for i in range(steps):
        step()
        if cuda:
            marks[i + 1].record()
    finish()
    sync()
    wall = time.perf_counter() - t
    each = ([a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])] if cuda
            else [wall / steps] * steps)
    out = {"step_s": wall / steps, "step_s_all": each}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class Lagged:
    """Our training loop's pattern (training/trainer.py): launch step n+1, then read step n's
    logs."""

    def __init__(self, launch):
        self.launch, self.pending = launch, None

    def __call__(self):
        launched = self.launch()
        self.finish()
        self.pending = launched

    def finish(self):
        if self.pending is not None:
            self.pending.result()
            self.pending = None


class PhaseTimer:
    """CUDA events around optimizer.step (no waiting, so the timing does not change the step):
    the GPU time from the end of the backward to the end of the optimizer's kernels (grad
    copy, clip, Adam, param copy). Read after the timed steps have been waited for."""

    def __init__(self, optimizer, cuda: bool):
        import torch

        self.cuda, self.marks = cuda, []
        inner = optimizer.step

        def step(*a, **kw):
            if not self.cuda:
                return inner(*a, **kw)
            pair = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            pair[0].record()
            out = inner(*a, **kw)
            pair[1].record()
            self.marks.append(pair)
            return out

        optimizer.step = step

    def mean(self, last: int) -> float:
        done = [a.elapsed_time(b) / 1e3 for a, b in self.marks[-last:]]
        return sum(done) / max(1, len(done))


def free_memory(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def config_overrides(args, precision: str) -> dict:
    """Our config's overrides for one --precision and --recompute."""
    over = {}
    if precision == "fp8":
        over.update(fp8="hybrid", fp8_recipe=args.fp8_recipe)
    if args.recompute == "selective":
        over.update(recompute_granularity="selective")
    elif args.recompute == "full":
        over.update(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    return over


# ------------------------------------------------------------------------------------ main
def main() -> None:
    shapes = sft_shapes()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(shapes), default="7b-4l")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--num-micro-batches", type=int, default=2)
    ap.add_argument("--image", type=int, default=448, help="image side in pixels (one a sample)")
    ap.add_argument("--latent-tokens", type=int, default=None,
                    help="LVR's <|lvr|> tokens a sample (default 8; --canvas-tokens when hylar "
                         "runs too, so both runs have the same latent slots)")
    ap.add_argument("--method", choices=["lvr", "hylar", "deeplatent"], nargs="+",
                    default=["lvr"],
                    help="ours: the latent method(s) timed, in this order, same shape and batch")
    ap.add_argument("--canvas-tokens", type=int, default=16,
                    help="HyLaR: canvas slots per reasoning image (one reasoning image a sample)")
    ap.add_argument("--canvas-image", type=int, default=None,
                    help="HyLaR: reasoning image side (default: the SigLIP's image_size)")
    ap.add_argument("--siglip", choices=["so400m", "tiny"], default=None,
                    help="HyLaR: the frozen SigLIP's shape, random weights (default so400m; tiny "
                         "for --shape tiny)")
    ap.add_argument("--canvas-encoder", default=None,
                    help="HyLaR: the SigLIP dir (written there if it holds no model yet; "
                         "default: a temporary folder)")
    ap.add_argument("--deeplatent-grid", type=int, default=16,
                    help="DeepLatent: the block's grid side a sample (sft_deeplatent.py)")
    ap.add_argument("--deeplatent-dir", default=None,
                    help="DeepLatent: where the teacher cache is written (default: a temp dir)")
    ap.add_argument("--spec", choices=["te", "local"], default="te")
    ap.add_argument("--precision", choices=["bf16", "fp8"], nargs="+", default=["bf16"],
                    help="ours, one row each in this run: fp8 = fp8='hybrid' + --fp8-recipe "
                         "(TE spec, bf16 params)")
    ap.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise"],
                    default="tensorwise")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="parameter dtype of both paths (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                    help="ours (HF's checkpointing is part of --hf-recipe)")
    ap.add_argument("--use-precision-aware-optimizer", action="store_true",
                    help="ours: TE FusedAdam holding the fp32 masters (it needs, and so turns "
                         "on, the distributed optimizer: the row changes both)")
    ap.add_argument("--tp", type=int, default=1, help="ours; run with torchrun for tp > 1")
    ap.add_argument("--sp", action="store_true", help="ours: sequence parallel (tp > 1)")
    ap.add_argument("--cross-entropy-fusion-impl", choices=["triton", "native", "te"],
                    default="triton",
                    help="ours: fused CE kernel (ours in Triton, megatron's native, or TE's)")
    ap.add_argument("--vision-graphs", type=int, default=4,
                    help="ours: CUDA graphs of the frozen vision tower (0: eager)")
    ap.add_argument("--train-vision", action="store_true",
                    help="train the vision tower and merger (default: frozen, the LVR default)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-recipe", choices=list(HF_RECIPES), nargs="+",
                    default=list(HF_RECIPES),
                    help="HF rows of this run (see the module doc): fastest = AdamW on the bf16 "
                         "weights, no checkpointing; seeds = reentrant checkpointing + fp32 "
                         "master weights, as the seeds' LVR script")
    ap.add_argument("--hf", action="store_true",
                    help="force the HF path where it is skipped by default (--shape 7b, tp > 1)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--profile-dir", default=None, help="with --profile: save Chrome traces here")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, print the top CUDA kernels of one step of each path")
    ap.add_argument("--profile-stacks", action="store_true",
                    help="with --profile: record Python stacks (slows the host; names the code "
                         "behind each GPU idle gap)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if len(set(args.method)) != len(args.method):
        ap.error("--method: each method once")
    if args.latent_tokens is None:
        args.latent_tokens = args.canvas_tokens if "hylar" in args.method else 8
    if args.siglip is None:
        args.siglip = "tiny" if args.shape == "tiny" else "so400m"

    import torch
    import torch.distributed as dist

    from bench_generate import hf_config
    from megatron_latent import parallel
    from megatron_latent.conversion.hf_load import StateDictReader, load_hf_weights
    from megatron_latent.latent.lvr import LVR
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                                unwrap)
    from megatron_latent.training.step import eval_losses, launch_step, train_step

    cuda = torch.cuda.is_available()  # CPU: a smoke run of the script only (--shape tiny)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if "fp8" in args.precision and (dtype != torch.bfloat16 or args.spec != "te"):
        ap.error("--precision fp8 needs --spec te and bf16 params")
    if args.sp and args.tp == 1:
        ap.error("--sp needs --tp > 1")
    if dtype == torch.float32 and cuda:  # the fp32 check means fp32 GEMMs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    parallel.initialize(parallel.ParallelConfig(args.tp, sequence_parallel=args.sp), seed=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // args.tp
    rank0 = rank == 0
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = shapes[args.shape]
    ids = shape["ids"]
    cfg_hf = hf_config(shape)
    hidden = shape["text"]["hidden_size"]
    run_hf = not args.skip_hf and (args.hf or (args.shape != "7b" and args.tp == 1))
    hf_note = ("" if run_hf else " (skipped: --skip-hf)" if args.skip_hf else
               " (skipped by default for this shape/tp; --hf forces it)")

    def log(*a):
        if rank0:
            print(*a, flush=True)

    def our_config(precision: str) -> Qwen25VLConfig:
        return Qwen25VLConfig.from_hf(cfg_hf.to_dict(), spec=args.spec, params_dtype=dtype,
                                      tensor_model_parallel_size=args.tp,
                                      sequence_parallel=args.sp,
                                      vision_graphs=args.vision_graphs,
                                      cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
                                      **config_overrides(args, precision))

    if args.sp and args.seq_length % args.tp:
        ap.error("--seq-length must be a multiple of --tp with --sp")
    micro_batches = make_micro_batches(shape, seq_length=args.seq_length,
                                       mbs=args.micro_batch_size,
                                       num_micro=args.num_micro_batches, image=args.image,
                                       latent_tokens=args.latent_tokens, dtype=dtype, device=dev)
    canvas = None
    if "hylar" in args.method:  # the frozen SigLIP on local disk, its batches
        import tempfile

        from sft_hylar import SIGLIP_PRESETS, canvas_forward_flops, write_siglip

        enc_dir = Path(args.canvas_encoder or tempfile.mkdtemp(prefix="bench_siglip_"))
        if rank0:
            t0 = time.perf_counter()
            write_siglip(enc_dir, args.siglip)
            log(f"# SigLIP {args.siglip} ({SIGLIP_PRESETS[args.siglip]}), random weights, in "
                f"{enc_dir} ({time.perf_counter() - t0:.1f} s)")
        dist.barrier()
        canvas_image = args.canvas_image or SIGLIP_PRESETS[args.siglip]["image_size"]
        canvas = {"dir": enc_dir, "image": canvas_image}
    tokens = dp * args.micro_batch_size * args.num_micro_batches * args.seq_length
    images = dp * args.micro_batch_size * args.num_micro_batches
    params = count_params(cfg_hf)
    flops = step_flops(shape, params, tokens=tokens, seq_length=args.seq_length, images=images,
                       image=args.image, train_vision=args.train_vision)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    log(f"# {gpu}; shape {args.shape} ({shape['text']['num_hidden_layers']} LLM layers, "
        f"{shape['vision']['depth']} vision blocks); spec {args.spec}; params {dtype_name}; "
        f"precision {'/'.join(args.precision)}"
        f"{f' (fp8 recipe {args.fp8_recipe})' if 'fp8' in args.precision else ''}; "
        f"recompute {args.recompute}; tp {args.tp}{' +sp' if args.sp else ''}, dp {dp}; "
        f"vision {'trained' if args.train_vision else 'frozen'}")
    log(f"# step: {args.num_micro_batches} micro-batches x {args.micro_batch_size} x "
        f"{args.seq_length} tokens (x dp {dp}) = {tokens} tokens, all counted (text, "
        f"{images} images of {(args.image // 14) ** 2} patches / {(args.image // 28) ** 2} "
        f"merged tokens, {args.latent_tokens} latent tokens each); {args.warmup} warm-up + "
        f"{args.steps} timed steps")
    log(f"# params: LLM without input embedding {params['llm'] / 1e9:.3f} B, input embedding "
        f"{params['embedding'] / 1e9:.3f} B, ViT {params['vit'] / 1e9:.3f} B, merger "
        f"{params['merger'] / 1e9:.3f} B; model FLOPs/step {flops['total'] / 1e12:.2f} T "
        f"(LLM {flops['llm'] / 1e12:.2f}, vision {flops['vision'] / 1e12:.2f})")
    log(f"# model FLOPs: {FLOPS_FORMULA}; TFLOP/s = F / step time / GPUs (recompute not counted)")
    if canvas is not None:
        canvas["flops"] = canvas_forward_flops(args.siglip, images)
        log(f"# methods {', '.join(args.method)}: LVR {args.latent_tokens} <|lvr|> tokens a "
            f"sample; HyLaR {args.canvas_tokens} <|canvas|> slots a sample (one "
            f"{canvas['image']}x{canvas['image']} reasoning image each, {images} a step; frozen "
            f"SigLIP forward {canvas['flops'] / 1e12:.2f} TFLOP/step, not in TFLOP/s)")
    log("# ours: megatron DDP (fp32 grads) + "
        + ("distributed optimizer, TE FusedAdam holding the fp32 masters"
           if args.use_precision_aware_optimizer else "Float16 Adam with fp32 main params")
        + f"{' (fp32: plain Adam)' if dtype == torch.float32 else ''}; HF: sdpa, recipes "
        + ", ".join(f"{r} ({'reentrant checkpointing, ' if HF_RECIPES[r][0] else ''}"
                    f"AdamW(fused) on {'fp32 masters' if HF_RECIPES[r][1] else 'the weights'})"
                    for r in args.hf_recipe) + hf_note)

    results, losses = {}, {}
    # ---- HF first: its random init is the shared weights (kept on CPU for ours)
    sd_cpu = None
    if run_hf:
        from transformers import Qwen2_5_VLForConditionalGeneration

        torch.manual_seed(0)
        with dev:
            hf = Qwen2_5_VLForConditionalGeneration._from_config(
                cfg_hf, dtype=dtype, attn_implementation="sdpa")
        sd_cpu = {k: v.detach().to("cpu", copy=True) for k, v in hf.state_dict().items()}
        if rank0:
            if not args.train_vision:
                hf.model.visual.requires_grad_(False)
            hf.train()
            losses["HF"] = hf_loss(hf, micro_batches, ids, hidden)
            trainable = [p for p in hf.parameters() if p.requires_grad]
            hf_totals = hf_step_totals(micro_batches, hidden)
            adam = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=cuda)
            for recipe in args.hf_recipe:
                name = f"HF {recipe}"
                checkpointing, masters = HF_RECIPES[recipe]
                if checkpointing:  # the seeds' TrainingArguments: gradient_checkpointing, reentrant
                    hf.gradient_checkpointing_enable({"use_reentrant": True})
                    # transformers 5 also hooks every sub-model's input embedding here, the
                    # vision patch embedding included, so the frozen tower would run backward;
                    # the seeds' transformers 4.51 adds no hook without PEFT: drop them
                    hf.disable_input_require_grads()
                else:
                    hf.gradient_checkpointing_disable()
                opt = (MasterAdamW(trainable, **adam) if masters
                       else torch.optim.AdamW(trainable, **adam))
                free_memory(cuda)
                hf_phases = PhaseTimer(opt, cuda)
                r = results[name] = time_steps(
                    lambda: hf_train_step(hf, opt, trainable, micro_batches, ids, hf_totals),
                    args.warmup, args.steps, cuda)
                r["optimizer_s"], r["gpus"] = hf_phases.mean(args.steps), 1
                if args.profile and cuda:
                    profile_call(name.replace(" ", "_"),
                                 lambda: hf_train_step(hf, opt, trainable, micro_batches, ids,
                                                       hf_totals), trace_dir=args.profile_dir,
                                 stacks=args.profile_stacks)
                opt = hf_phases = None
                free_memory(cuda)
            del trainable
        del hf
        free_memory(cuda)
        dist.barrier()

    # ---- ours
    if cuda:
        log(f"# memory still allocated before ours: {torch.cuda.memory_allocated() / 2**30:.2f} "
            "GiB")
    # ours reads each micro-batch from pinned host memory, as the training loop does (the copy
    # to the GPU is inside the timed step); the HF loop is given them on the GPU
    def pinned(batches):
        return [{k: v.cpu().pin_memory() if cuda else v for k, v in mb.items()} for mb in batches]

    methods = {}
    for m in args.method:
        if m == "lvr":
            methods[m] = (LVR(lvr_id=ids["lvr"], start_id=ids["lvr_start"],
                              end_id=ids["lvr_end"], hidden_size=hidden, loss_lambda=LAMBDA),
                          pinned(micro_batches))
        elif m == "deeplatent":  # sft_deeplatent.py: its batches and teacher cache
            import sft_deeplatent

            dl_method, dl_batches, note = sft_deeplatent.setup(shape, args, dtype, cuda,
                                                               args.deeplatent_dir)
            log(f"# {note}")
            methods[m] = (dl_method, dl_batches)
        else:
            from sft_hylar import build_hylar, hylar_micro_batches

            hy_batches = (micro_batches if args.latent_tokens == args.canvas_tokens else
                          make_micro_batches(shape, seq_length=args.seq_length,
                                             mbs=args.micro_batch_size,
                                             num_micro=args.num_micro_batches, image=args.image,
                                             latent_tokens=args.canvas_tokens, dtype=dtype,
                                             device=dev))
            methods[m] = (build_hylar(ids, hidden, canvas["dir"], args.canvas_tokens),
                          pinned(hylar_micro_batches(hy_batches, canvas_image=canvas["image"],
                                                     canvas_tokens=args.canvas_tokens, ids=ids)))
    combos = [(m, p) for m in args.method for p in args.precision]
    breakdown = {}
    for method_name, precision in combos:
        method, host_batches = methods[method_name]
        parts = ([method_name] if len(args.method) > 1 else []) + \
            ([precision] if len(args.precision) > 1 else [])
        name = " ".join(["ours", *parts])
        pa = args.use_precision_aware_optimizer
        side = method if method_name in ("hylar", "deeplatent") else None
        model = build_model(our_config(precision), None, freeze_vision=not args.train_vision,
                            freeze_merger=not args.train_vision, use_distributed_optimizer=pa,
                            latent_method=side)
        if sd_cpu is not None:  # the same weights as HF (before the optimizer copies them)
            load_hf_weights(unwrap(model[0]), StateDictReader(sd_cpu, "HF random init"))
        optimizer = build_optimizer(model, OptimSettings(lr=1e-5, use_distributed_optimizer=pa,
                                                         precision_aware=pa),
                                    lr_overrides=method.optimizer_overrides())
        losses[name] = eval_losses(model, host_batches, method)
        free_memory(cuda)
        phases = PhaseTimer(optimizer, cuda)
        lagged = Lagged(lambda: launch_step(model, optimizer, host_batches, method))
        r = results[name] = time_steps(lagged, args.warmup, args.steps, cuda, lagged.finish)
        r["optimizer_s"], r["gpus"], r["precision"] = phases.mean(args.steps), world, precision
        r["method"] = method_name
        if method_name == "hylar":
            side_params = sum(p.numel() for p in unwrap(model[0]).latent_modules.parameters())
            r["canvas_side_params"] = side_params
            if cuda:
                from sft_hylar import canvas_breakdown

                breakdown[name] = canvas_breakdown(model[0], host_batches)
                log(f"# {name}: canvas path alone, per step ({breakdown[name]['images']} "
                    f"images): SigLIP forward {breakdown[name]['siglip_fwd_ms']:.1f} ms "
                    f"({breakdown[name]['siglip_dtype']}, attn "
                    f"{breakdown[name]['siglip_attn']}), compressor + projector fwd+bwd "
                    f"{breakdown[name]['compressor_proj_fwd_bwd_ms']:.1f} ms (params "
                    f"{breakdown[name]['side_param_dtype']}, {side_params / 1e6:.1f} M, "
                    f"compute {breakdown[name]['compute_dtype']}); SigLIP graphs "
                    f"{breakdown[name]['siglip_graphs']}")
                r["canvas_breakdown"] = breakdown[name]
        if args.profile and cuda:  # every rank steps (collectives); rank 0 prints
            profile_call(name.replace(" ", "_"),
                         lambda: train_step(model, optimizer, host_batches, method),
                         trace_dir=args.profile_dir if rank0 else None, show=rank0,
                         stacks=args.profile_stacks)
        if cuda:
            peak = torch.tensor([r["peak_gib"]], device=dev)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            r["peak_gib"] = peak.item()
        model = optimizer = phases = None  # free before the next precision
        free_memory(cuda)
    sd_cpu = None

    # ---- report
    ok = True
    hf_rows = [n for n in results if n.startswith("HF")]
    ours = [n for n in results if n not in hf_rows]
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
        if dtype == torch.float32 and rel > FP32_RTOL:
            ok = False
            log(f"ERROR: fp32 losses differ by {rel:.2e} > {FP32_RTOL:.0e} relative")
    rows = []
    for name in ours + hf_rows:
        r = results[name]
        mine = name in ours
        r.update(path=name, tokens_s=tokens / r["step_s"] if mine else
                 args.micro_batch_size * args.num_micro_batches * args.seq_length / r["step_s"])
        path_flops = flops["total"] if mine else flops["total"] / dp
        r["tflops_per_gpu"] = path_flops / r["step_s"] / r["gpus"] / 1e12
        r["tokens_s_per_gpu"] = r["tokens_s"] / r["gpus"]
        r["loss0"] = losses.get(name if mine else "HF", {}).get("loss")
        rows.append(r)
    for r in rows:
        r["ratio_vs"] = {h: r["tokens_s_per_gpu"] / results[h]["tokens_s_per_gpu"]
                         for h in hf_rows}
    if len(ours) > 1:
        base = results[ours[0]]
        for name in ours[1:]:
            results[name]["ratio_vs_first"] = base["step_s"] / results[name]["step_s"]
            log(f"# {name} vs {ours[0]}: {results[name]['ratio_vs_first']:.3f}x tokens/s")
    canvas_cost = {}
    if len(args.method) > 1:  # HyLaR vs LVR at each precision
        by = {(results[n]["method"], results[n]["precision"]): n for n in ours}
        for precision in args.precision:
            lvr_row, hy_row = by.get(("lvr", precision)), by.get(("hylar", precision))
            if lvr_row is None or hy_row is None:
                continue
            ratio = results[hy_row]["tokens_s"] / results[lvr_row]["tokens_s"]
            canvas_cost[precision] = {"hylar_over_lvr": ratio, "cost": 1 - ratio,
                                      "lvr_step_ms": 1e3 * results[lvr_row]["step_s"],
                                      "hylar_step_ms": 1e3 * results[hy_row]["step_s"]}
            log(f"# canvas path ({precision}): HyLaR / LVR tokens/s = {ratio:.4f}, cost "
                f"{100 * (1 - ratio):.1f}% ({1e3 * results[hy_row]['step_s']:.1f} vs "
                f"{1e3 * results[lvr_row]['step_s']:.1f} ms a step)")
    log("\n| path | tokens/s | TFLOP/s | step ms | of which optimizer ms | peak GiB |"
        + "".join(f" vs {h} |" for h in hf_rows))
    log("|---|---|---|---|---|---|" + "---|" * len(hf_rows))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a"
        log(f"| {r['path']} | {r['tokens_s']:,.0f} | {r['tflops_per_gpu']:.4g} "
            f"| {1e3 * r['step_s']:.1f} | {1e3 * r['optimizer_s']:.1f} | {peak} |"
            + "".join(f" {r['ratio_vs'][h]:.2f}x |" for h in hf_rows))
    log(f"\n# tokens/s: all tokens of the step (text + image + latent) / mean step time; "
        f"TFLOP/s: model FLOPs per GPU, {FLOPS_FORMULA}; peak: torch.cuda.max_memory_allocated "
        f"(max over ranks; n/a on CPU); vs HF ...: per-GPU tokens/s over that HF row's (HF on "
        f"1 GPU); HF recomputes under 'seeds' but its FLOPs are counted once (model FLOPs)")
    if rank0 and args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"gpu": gpu, "args": vars(args), "dtype": dtype_name, "tokens_per_step": tokens,
             "model_flops_per_step": flops, "params": params, "formula": FLOPS_FORMULA,
             "losses": losses, "rows": rows, "canvas_cost": canvas_cost,
             "canvas_flops_per_step": canvas and canvas.get("flops"),
             "canvas_encoder": canvas and str(canvas["dir"])}, indent=1))
    parallel.destroy()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
