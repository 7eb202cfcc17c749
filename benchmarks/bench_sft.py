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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from profiling import profile_call  # noqa: E402
from sft_hf import (HF_RECIPES, LAMBDA, MasterAdamW, hf_loss, hf_step_totals,  # noqa: E402
                    hf_train_step)
from sft_report import (canvas_breakdown_line, canvas_costs, compare_to_first,  # noqa: E402
                        log_legend, log_losses, log_table, split_paths, table_rows)

FLOPS_FORMULA = ("F = 6*N_llm*T + 6*L*h*s*T + c*(N_vit*P + N_merger*P/4) + (c/2)*4*h_v*sum(w^2); "
                 "c = 2 (frozen ViT: forward only) or 6 (trained ViT)")


def sft_shapes() -> dict:
    from bench_generate import SHAPES

    seven = SHAPES["7b"]
    return {"7b-4l": {**seven, "text": {**seven["text"], "num_hidden_layers": 4}},
            "7b": seven, "3b": SHAPES["3b"], "tiny": SHAPES["tiny"]}


# ------------------------------------------------------------------------------------ batch
def lvr_layout(*, image: int, latent_tokens: int, seq_length: int,
               lvr_at: int | None) -> tuple[int, int]:
    """-> (image side in patches, position of `<|lvr_start|>`), or exit on a layout that does
    not fit."""
    if image % 28:
        raise SystemExit(f"--image {image} must be a multiple of 28 (patch 14 x merge 2)")
    side = image // 14
    n_img = side * side // 4
    if latent_tokens > n_img:
        raise SystemExit(f"--latent-tokens {latent_tokens} > the image's {n_img} merged tokens")
    s = seq_length
    a = max(s // 2 if lvr_at is None else lvr_at, n_img + 3)  # after the image: the answer
    if a + latent_tokens + 2 >= s:
        raise SystemExit(f"--seq-length {s} too short for a {n_img}-token image and "
                         f"{latent_tokens} latent tokens")
    return side, a


def lvr_sample(g, ids: dict, *, seq_length: int, n_img: int, lvr_at: int, latent_tokens: int,
               text) -> tuple:
    """One sample, drawn from `g`: -> (input ids, labels, loss mask, the merged image tokens
    its latent span is taught)."""
    import torch

    s, a = seq_length, lvr_at
    high = min(ids.values()) - 16  # random text stays clear of the special ids
    seq = torch.randint(0, high, (s,), generator=g) if text is None else text(g, s)
    seq[0], seq[1 + n_img] = ids["vision_start"], ids["vision_end"]
    seq[1:1 + n_img] = ids["image"]
    seq[a], seq[a + 1 + latent_tokens] = ids["lvr_start"], ids["lvr_end"]
    seq[a + 1:a + 1 + latent_tokens] = ids["lvr"]
    lab = torch.cat([seq[1:], seq[:1]])  # labels[t] = token t+1 (last one unsupervised)
    mask = torch.zeros(s)
    mask[a - 1:s - 1] = 1.0
    mask[lab == ids["lvr"]] = 0.0
    pick = torch.randperm(n_img, generator=g)[:latent_tokens].sort().values
    return seq, lab, mask, pick


def make_micro_batches(shape: dict, *, seq_length: int, mbs: int, num_micro: int, image: int,
                       latent_tokens: int, dtype, device, text=None, lvr_at: int | None = None,
                       seed: int = 1000) -> list[dict]:
    """Deterministic synthetic LVR micro-batches in the layout of data/collate.py (no padding):
    random text (or `text(generator, n)`'s tokens), `<|lvr_start|>` at `lvr_at` (default: the
    middle)."""
    import torch

    from megatron_latent.models.qwen25vl.rope_index import rope_index

    ids = shape["ids"]
    side, a = lvr_layout(image=image, latent_tokens=latent_tokens, seq_length=seq_length,
                         lvr_at=lvr_at)
    n_patch, n_img = side * side, side * side // 4
    out = []
    for m in range(num_micro):
        g = torch.Generator().manual_seed(seed + m)
        samples = [lvr_sample(g, ids, seq_length=seq_length, n_img=n_img, lvr_at=a,
                              latent_tokens=latent_tokens, text=text) for _ in range(mbs)]
        rows, labels, masks, picks = zip(*samples)
        input_ids = torch.stack(rows)
        grid = torch.tensor([[1, side, side]] * mbs)
        position_ids, _ = rope_index(input_ids, grid, image_token_id=ids["image"],
                                     spatial_merge_size=2)
        mb = {"input_ids": input_ids, "labels": torch.stack(labels),
              "loss_mask": torch.stack(masks), "position_ids": position_ids,
              "pixel_values": torch.randn(mbs * n_patch, 3 * 2 * 14 * 14, generator=g).to(dtype),
              "image_grid_thw": grid, "latent_mask": input_ids == ids["lvr"],
              # latent_index counts merged image tokens over the micro-batch's images
              "latent_index": torch.cat([p + r * n_img for r, p in enumerate(picks)])}
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


# ------------------------------------------------------------------------------------ flags
def add_batch_flags(ap, shapes: dict) -> None:
    ap.add_argument("--shape", choices=sorted(shapes), default="7b-4l")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--num-micro-batches", type=int, default=2)
    ap.add_argument("--image", type=int, default=448, help="image side in pixels (one a sample)")
    ap.add_argument("--latent-tokens", type=int, default=None,
                    help="LVR's <|lvr|> tokens a sample (default 8; --canvas-tokens when hylar "
                         "runs too, so both runs have the same latent slots)")


def add_method_flags(ap) -> None:
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


def add_model_flags(ap) -> None:
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


def add_run_flags(ap) -> None:
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


def param_dtype_name(args, cuda: bool) -> str:
    return args.dtype or ("bf16" if cuda else "fp32")


def flag_problems(args, cuda: bool):
    """The flag combinations this benchmark cannot run, as argparse error messages."""
    if args.steps < 1:
        yield "--steps must be >= 1"
    if len(set(args.method)) != len(args.method):
        yield "--method: each method once"
    if "fp8" in args.precision and (param_dtype_name(args, cuda) != "bf16" or args.spec != "te"):
        yield "--precision fp8 needs --spec te and bf16 params"
    if args.sp and args.tp == 1:
        yield "--sp needs --tp > 1"
    if args.sp and args.seq_length % args.tp:
        yield "--seq-length must be a multiple of --tp with --sp"


def parse_args(shapes: dict) -> argparse.Namespace:
    """The command line, checked, with the defaults that depend on other flags filled in (the
    JSON output records them)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_flags(ap, shapes)
    add_method_flags(ap)
    add_model_flags(ap)
    add_run_flags(ap)
    args = ap.parse_args()
    import torch  # only now: --help stays quick

    for problem in flag_problems(args, torch.cuda.is_available()):
        ap.error(problem)
    if args.latent_tokens is None:
        args.latent_tokens = args.canvas_tokens if "hylar" in args.method else 8
    if args.siglip is None:
        args.siglip = "tiny" if args.shape == "tiny" else "so400m"
    return args


# ------------------------------------------------------------------------------------ setup
@dataclass
class Bench:
    """What every phase of the run reads: the flags, this process's place in the job, the
    shared micro-batches and the step's counts."""
    args: argparse.Namespace
    shape: dict
    cfg_hf: object  # the HF config both paths are built from
    cuda: bool  # False: a CPU smoke run of the script only (--shape tiny)
    dtype: object  # the parameters' torch dtype
    dtype_name: str
    rank0: bool
    world: int
    dev: object
    gpu: str
    # built by start() once the process has its place in the job
    micro_batches: list[dict] | None = None  # on `dev`, as HF is given them
    canvas: dict | None = None  # HyLaR's frozen SigLIP: dir, image side, forward FLOPs a step
    params: dict | None = None  # count_params
    flops: dict | None = None  # step_flops

    @property
    def ids(self) -> dict:
        return self.shape["ids"]

    @property
    def hidden(self) -> int:
        return self.shape["text"]["hidden_size"]

    @property
    def dp(self) -> int:
        return self.world // self.args.tp

    @property
    def images(self) -> int:  # one a sample, over all dp ranks
        return self.dp * self.args.micro_batch_size * self.args.num_micro_batches

    @property
    def tokens(self) -> int:  # all of them, over all dp ranks
        return self.images * self.args.seq_length

    @property
    def run_hf(self) -> bool:
        a = self.args
        return not a.skip_hf and (a.hf or (a.shape != "7b" and a.tp == 1))

    def log(self, *a) -> None:
        if self.rank0:
            print(*a, flush=True)

    def synthetic_batches(self, latent_tokens: int) -> list[dict]:
        a = self.args
        return make_micro_batches(self.shape, seq_length=a.seq_length, mbs=a.micro_batch_size,
                                  num_micro=a.num_micro_batches, image=a.image,
                                  latent_tokens=latent_tokens, dtype=self.dtype, device=self.dev)


def canvas_encoder(b: Bench) -> dict:
    """HyLaR's frozen SigLIP, written to local disk by rank 0: -> its dir, reasoning image side
    and forward FLOPs a step."""
    import tempfile

    import torch.distributed as dist
    from sft_hylar import SIGLIP_PRESETS, canvas_forward_flops, write_siglip

    a = b.args
    enc_dir = Path(a.canvas_encoder or tempfile.mkdtemp(prefix="bench_siglip_"))
    if b.rank0:
        t0 = time.perf_counter()
        write_siglip(enc_dir, a.siglip)
        b.log(f"# SigLIP {a.siglip} ({SIGLIP_PRESETS[a.siglip]}), random weights, in "
              f"{enc_dir} ({time.perf_counter() - t0:.1f} s)")
    dist.barrier()
    return {"dir": enc_dir, "image": a.canvas_image or SIGLIP_PRESETS[a.siglip]["image_size"],
            "flops": canvas_forward_flops(a.siglip, b.images)}


def start(args, shape: dict) -> Bench:
    """Initialize torch.distributed, then build what both paths share."""
    import torch
    import torch.distributed as dist

    from bench_generate import hf_config
    from megatron_latent import parallel

    cuda = torch.cuda.is_available()
    dtype_name = param_dtype_name(args, cuda)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if dtype == torch.float32 and cuda:  # the fp32 check means fp32 GEMMs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    parallel.initialize(parallel.ParallelConfig(args.tp, sequence_parallel=args.sp), seed=0)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    b = Bench(args=args, shape=shape, cfg_hf=hf_config(shape), cuda=cuda, dtype=dtype,
              dtype_name=dtype_name, rank0=dist.get_rank() == 0, world=dist.get_world_size(),
              dev=dev, gpu=torch.cuda.get_device_name() if cuda else "cpu")
    b.micro_batches = b.synthetic_batches(args.latent_tokens)
    if "hylar" in args.method:
        b.canvas = canvas_encoder(b)
    b.params = count_params(b.cfg_hf)
    b.flops = step_flops(shape, b.params, tokens=b.tokens, seq_length=args.seq_length,
                         images=b.images, image=args.image, train_vision=args.train_vision)
    return b


def log_run(b: Bench) -> None:
    """The run's setup, as `#` comment lines above the results."""
    a, shape, params, flops = b.args, b.shape, b.params, b.flops
    log = b.log
    log(f"# {b.gpu}; shape {a.shape} ({shape['text']['num_hidden_layers']} LLM layers, "
        f"{shape['vision']['depth']} vision blocks); spec {a.spec}; params {b.dtype_name}; "
        f"precision {'/'.join(a.precision)}"
        f"{f' (fp8 recipe {a.fp8_recipe})' if 'fp8' in a.precision else ''}; "
        f"recompute {a.recompute}; tp {a.tp}{' +sp' if a.sp else ''}, dp {b.dp}; "
        f"vision {'trained' if a.train_vision else 'frozen'}")
    log(f"# step: {a.num_micro_batches} micro-batches x {a.micro_batch_size} x "
        f"{a.seq_length} tokens (x dp {b.dp}) = {b.tokens} tokens, all counted (text, "
        f"{b.images} images of {(a.image // 14) ** 2} patches / {(a.image // 28) ** 2} "
        f"merged tokens, {a.latent_tokens} latent tokens each); {a.warmup} warm-up + "
        f"{a.steps} timed steps")
    log(f"# params: LLM without input embedding {params['llm'] / 1e9:.3f} B, input embedding "
        f"{params['embedding'] / 1e9:.3f} B, ViT {params['vit'] / 1e9:.3f} B, merger "
        f"{params['merger'] / 1e9:.3f} B; model FLOPs/step {flops['total'] / 1e12:.2f} T "
        f"(LLM {flops['llm'] / 1e12:.2f}, vision {flops['vision'] / 1e12:.2f})")
    log(f"# model FLOPs: {FLOPS_FORMULA}; TFLOP/s = F / step time / GPUs (recompute not counted)")
    if b.canvas is not None:
        log(f"# methods {', '.join(a.method)}: LVR {a.latent_tokens} <|lvr|> tokens a "
            f"sample; HyLaR {a.canvas_tokens} <|canvas|> slots a sample (one "
            f"{b.canvas['image']}x{b.canvas['image']} reasoning image each, {b.images} a step; "
            f"frozen SigLIP forward {b.canvas['flops'] / 1e12:.2f} TFLOP/step, not in TFLOP/s)")
    log(f"# ours: {our_optimizer_text(b)}; HF: sdpa, recipes {hf_recipes_text(b)}")


def our_optimizer_text(b: Bench) -> str:
    return ("megatron DDP (fp32 grads) + "
            + ("distributed optimizer, TE FusedAdam holding the fp32 masters"
               if b.args.use_precision_aware_optimizer else "Float16 Adam with fp32 main params")
            + (" (fp32: plain Adam)" if b.dtype_name == "fp32" else ""))


def hf_recipes_text(b: Bench) -> str:
    a = b.args
    skipped = ("" if b.run_hf else " (skipped: --skip-hf)" if a.skip_hf else
               " (skipped by default for this shape/tp; --hf forces it)")
    return ", ".join(f"{r} ({'reentrant checkpointing, ' if HF_RECIPES[r][0] else ''}"
                     f"AdamW(fused) on {'fp32 masters' if HF_RECIPES[r][1] else 'the weights'})"
                     for r in a.hf_recipe) + skipped


# ------------------------------------------------------------------------------------ paths
def time_path(b: Bench, step, optimizer, finish=lambda: None) -> dict:
    """time_steps of one path, with the GPU time of its optimizer steps."""
    free_memory(b.cuda)
    phases = PhaseTimer(optimizer, b.cuda)
    r = time_steps(step, b.args.warmup, b.args.steps, b.cuda, finish)
    r["optimizer_s"] = phases.mean(b.args.steps)
    return r


def profile_path(b: Bench, name: str, step) -> None:
    """With --profile: the top CUDA kernels of one more step (every rank steps: collectives;
    rank 0 prints and saves the trace)."""
    if b.args.profile and b.cuda:
        profile_call(name.replace(" ", "_"), step,
                     trace_dir=b.args.profile_dir if b.rank0 else None, show=b.rank0,
                     stacks=b.args.profile_stacks)


# ------------------------------------------------------------------------------------ HF
def run_hf(b: Bench, results: dict, losses: dict) -> dict:
    """HF's initial loss and its recipes' rows (rank 0; every rank builds the model for its
    weights): -> its random initial weights on the CPU, for ours to load."""
    import torch
    import torch.distributed as dist
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with b.dev:
        hf = Qwen2_5_VLForConditionalGeneration._from_config(
            b.cfg_hf, dtype=b.dtype, attn_implementation="sdpa")
    weights = {k: v.detach().to("cpu", copy=True) for k, v in hf.state_dict().items()}
    if b.rank0:
        time_hf_recipes(b, hf, results, losses)
    del hf
    free_memory(b.cuda)
    dist.barrier()
    return weights


def time_hf_recipes(b: Bench, hf, results: dict, losses: dict) -> None:
    """HF's initial loss, then one timed row per --hf-recipe, all on the one model."""
    import torch

    if not b.args.train_vision:
        hf.model.visual.requires_grad_(False)
    hf.train()
    losses["HF"] = hf_loss(hf, b.micro_batches, b.ids, b.hidden)
    trainable = [p for p in hf.parameters() if p.requires_grad]
    totals = hf_step_totals(b.micro_batches, b.hidden)
    adam = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=b.cuda)
    for recipe in b.args.hf_recipe:
        name = f"HF {recipe}"
        checkpointing, masters = HF_RECIPES[recipe]
        set_hf_checkpointing(hf, checkpointing)
        opt = (MasterAdamW(trainable, **adam) if masters
               else torch.optim.AdamW(trainable, **adam))

        def step():
            hf_train_step(hf, opt, trainable, b.micro_batches, b.ids, totals)

        r = results[name] = time_path(b, step, opt)
        r["gpus"] = 1
        profile_path(b, name, step)
        opt = step = None  # free before the next recipe builds its optimizer
        free_memory(b.cuda)


def set_hf_checkpointing(hf, on: bool) -> None:
    if not on:
        hf.gradient_checkpointing_disable()
        return
    # the seeds' TrainingArguments: gradient_checkpointing, reentrant
    hf.gradient_checkpointing_enable({"use_reentrant": True})
    # transformers 5 also hooks every sub-model's input embedding here, the vision patch
    # embedding included, so the frozen tower would run backward; the seeds' transformers
    # 4.51 adds no hook without PEFT: drop them
    hf.disable_input_require_grads()


# ------------------------------------------------------------------------------------ ours
def pinned(batches: list[dict], cuda: bool) -> list[dict]:
    # ours reads each micro-batch from pinned host memory, as the training loop does (the copy
    # to the GPU is inside the timed step); the HF loop is given them on the GPU
    return [{k: v.cpu().pin_memory() if cuda else v for k, v in mb.items()} for mb in batches]


def lvr_method(b: Bench) -> tuple:
    from megatron_latent.latent.lvr import LVR

    ids = b.ids
    return (LVR(lvr_id=ids["lvr"], start_id=ids["lvr_start"], end_id=ids["lvr_end"],
                hidden_size=b.hidden, loss_lambda=LAMBDA),
            pinned(b.micro_batches, b.cuda))


def deeplatent_method(b: Bench) -> tuple:
    import sft_deeplatent  # its own batches and teacher cache

    method, batches, note = sft_deeplatent.setup(b.shape, b.args, b.dtype, b.cuda,
                                                 b.args.deeplatent_dir)
    b.log(f"# {note}")
    return method, batches


def hylar_method(b: Bench) -> tuple:
    from sft_hylar import build_hylar, hylar_micro_batches

    a = b.args
    # LVR's batches with the latent span as canvas slots
    batches = (b.micro_batches if a.latent_tokens == a.canvas_tokens
               else b.synthetic_batches(a.canvas_tokens))
    method = build_hylar(b.ids, b.hidden, b.canvas["dir"], a.canvas_tokens)
    return method, pinned(hylar_micro_batches(batches, canvas_image=b.canvas["image"],
                                              canvas_tokens=a.canvas_tokens, ids=b.ids), b.cuda)


METHODS = {"lvr": lvr_method, "hylar": hylar_method, "deeplatent": deeplatent_method}
# methods whose side modules (canvas encoder, ...) are built with the model: in DDP and the
# optimizer
SIDE_MODULE_METHODS = ("hylar", "deeplatent")


def our_config(b: Bench, precision: str):
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    a = b.args
    return Qwen25VLConfig.from_hf(b.cfg_hf.to_dict(), spec=a.spec, params_dtype=b.dtype,
                                  tensor_model_parallel_size=a.tp, sequence_parallel=a.sp,
                                  vision_graphs=a.vision_graphs,
                                  cross_entropy_fusion_impl=a.cross_entropy_fusion_impl,
                                  **config_overrides(a, precision))


def build_ours(b: Bench, precision: str, method_name: str, method, hf_weights) -> tuple:
    """-> (model chunks, optimizer) of one of our rows."""
    from megatron_latent.conversion.hf_load import StateDictReader, load_hf_weights
    from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                                unwrap)

    pa, frozen = b.args.use_precision_aware_optimizer, not b.args.train_vision
    model = build_model(our_config(b, precision), None, freeze_vision=frozen,
                        freeze_merger=frozen, use_distributed_optimizer=pa,
                        latent_method=method if method_name in SIDE_MODULE_METHODS else None)
    if hf_weights is not None:  # the same weights as HF (before the optimizer copies them)
        load_hf_weights(unwrap(model[0]), StateDictReader(hf_weights, "HF random init"))
    optimizer = build_optimizer(model, OptimSettings(lr=1e-5, use_distributed_optimizer=pa,
                                                     precision_aware=pa),
                                lr_overrides=method.optimizer_overrides())
    return model, optimizer


def our_row_name(args, method_name: str, precision: str) -> str:
    """The row's name: ours, plus whichever of method and precision this run varies."""
    parts = ([method_name] if len(args.method) > 1 else []) + \
        ([precision] if len(args.precision) > 1 else [])
    return " ".join(["ours", *parts])


def run_ours(b: Bench, results: dict, losses: dict, hf_weights) -> None:
    """Our rows: each --method at each --precision, one model at a time."""
    import torch

    if b.cuda:
        b.log(f"# memory still allocated before ours: "
              f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    methods = {m: METHODS[m](b) for m in b.args.method}
    for method_name in b.args.method:
        for precision in b.args.precision:
            name = our_row_name(b.args, method_name, precision)
            losses[name], results[name] = time_ours(b, name, method_name, precision,
                                                    methods[method_name], hf_weights)
            free_memory(b.cuda)  # the row's model and optimizer, before the next one's


def time_ours(b: Bench, name: str, method_name: str, precision: str, latent: tuple,
              hf_weights) -> tuple[dict, dict]:
    """One of our rows, `latent` = (method, host micro-batches): -> (its initial loss, its
    timing)."""
    from megatron_latent.training.step import eval_losses, launch_step, train_step

    method, host_batches = latent
    model, optimizer = build_ours(b, precision, method_name, method, hf_weights)
    loss = eval_losses(model, host_batches, method)
    lagged = Lagged(lambda: launch_step(model, optimizer, host_batches, method))
    r = time_path(b, lagged, optimizer, lagged.finish)
    r["gpus"], r["precision"], r["method"] = b.world, precision, method_name
    if method_name == "hylar":
        add_canvas_side(b, name, model[0], host_batches, r)
    profile_path(b, name, lambda: train_step(model, optimizer, host_batches, method))
    if b.cuda:
        r["peak_gib"] = max_over_ranks(r["peak_gib"], b.dev)
    return loss, r


def add_canvas_side(b: Bench, name: str, model_chunk, host_batches: list[dict],
                    r: dict) -> None:
    """HyLaR's side-module size and (on the GPU) its canvas path timed alone, into row `r`."""
    from megatron_latent.training.build import unwrap

    side_params = sum(p.numel() for p in unwrap(model_chunk).latent_modules.parameters())
    r["canvas_side_params"] = side_params
    if b.cuda:
        from sft_hylar import canvas_breakdown

        breakdown = canvas_breakdown(model_chunk, host_batches)
        b.log(canvas_breakdown_line(name, breakdown, side_params))
        r["canvas_breakdown"] = breakdown


def max_over_ranks(value: float, dev) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ------------------------------------------------------------------------------------ report
def report(b: Bench, results: dict, losses: dict) -> bool:
    """Print the losses, ratios and the table, write --json-out; -> False when the fp32 loss
    check fails."""
    a = b.args
    ours, hf_rows = split_paths(results)
    ok = log_losses(results, losses, ours, b.dtype_name, b.log)
    rows = table_rows(results, losses, ours, hf_rows, tokens=b.tokens,
                      hf_tokens=a.micro_batch_size * a.num_micro_batches * a.seq_length,
                      flops_total=b.flops["total"], dp=b.dp)
    if len(ours) > 1:
        compare_to_first(results, ours, b.log)
    canvas_cost = canvas_costs(results, ours, a.precision, b.log) if len(a.method) > 1 else {}
    log_table(rows, hf_rows, b.log)
    log_legend(FLOPS_FORMULA, b.log)
    if b.rank0 and a.json_out:
        write_json(b, losses, rows, canvas_cost)
    return ok


def write_json(b: Bench, losses: dict, rows: list[dict], canvas_cost: dict) -> None:
    canvas = b.canvas
    Path(b.args.json_out).write_text(json.dumps(
        {"gpu": b.gpu, "args": vars(b.args), "dtype": b.dtype_name, "tokens_per_step": b.tokens,
         "model_flops_per_step": b.flops, "params": b.params, "formula": FLOPS_FORMULA,
         "losses": losses, "rows": rows, "canvas_cost": canvas_cost,
         "canvas_flops_per_step": canvas and canvas.get("flops"),
         "canvas_encoder": canvas and str(canvas["dir"])}, indent=1))


# ------------------------------------------------------------------------------------ main
def main() -> None:
    from megatron_latent import parallel

    shapes = sft_shapes()
    args = parse_args(shapes)
    b = start(args, shapes[args.shape])
    log_run(b)
    results, losses = {}, {}
    # HF first: its random init is the shared weights (kept on CPU for ours)
    hf_weights = run_hf(b, results, losses) if b.run_hf else None
    run_ours(b, results, losses, hf_weights)
    hf_weights = None
    ok = report(b, results, losses)
    parallel.destroy()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
