"""Do the latents carry information? (issue #23) The reproducible ablation experiment: for each
seed, one harder synthetic visual-search set (every arm the same records), a small
Qwen2.5-VL-shaped model trained FROM SCRATCH (random init, vision tower and merger trained too)
with each latent method that has an SFT stage and with a no-latent baseline, all for the same
number of optimizer steps on the same data, then the latent probes on a held-out set.

    # the GPU run (one H200, <= 10 min; megatron-core on PYTHONPATH is enough, no TE):
    python benchmarks/latent_ablation.py --shape gpu --seeds 0 1 2 --jobs 3 --time-limit 540 \
        --out /tmp/latent_ablation
    # the CPU smoke run (every arm end to end, 1 seed, a few steps; its test:
    # tests/test_latent_ablation_smoke.py):
    python benchmarks/latent_ablation.py --shape cpu-smoke --seeds 0 --device cpu --out /tmp/abl

Arms (`--methods`, default every registered method; the baseline is method `none`):
- none:       the LVR records with the latent span stripped: "<answer>X</answer>", no box
- lvr:        "<lvr>\\n<answer>X</answer>" with the target's box (its merged visual tokens are
              the latents' targets)
- hylar:      Zebra-CoT rows of the same records: a thought, one reasoning image = the target's
              zoomed crop (a canvas span, the frozen random SigLIP's compressed features as
              targets), a thought naming the target, the answer
- deeplatent: the same Zebra-CoT rows: stage 1 (the crop as a real assistant image) ->
              teacher-state cache of the stage-1 model (tools/cache_teacher_states.py) ->
              stage 2 (the crop becomes a latent block aligned to the cached states); stage 1 +
              stage 2 steps = the other arms' steps (`--deeplatent-stage1-steps`, default half;
              each stage starts the trainer's sample order afresh, so with the shape's 2000
              records and 2 x 120 steps of 16 it sees 1920 distinct records twice, the other
              arms 2000 records 1.9 times)
A registered method without a recipe here gets a row marked n/a, never a silent gap.

Data: benchmarks/ablation_data.py (megatron_latent/data/synthetic_lvr.make_sample at
`--difficulty`, default 2: a 3-5%-side target among 4 larger distractors that share the named
attribute). All arms' record i is the same image, question and answer; the per-seed data seed
is the run's seed. Held-out: the val split (`num_val` records, drawn from their own stream).

Training: pretrain_scripts/pretrain_sft.py's `main` in this process (world size 1, TP = PP = 1,
the torch-native `local` spec), the same flags for every arm but the method's own; the model's
initial weights are tools/make_tiny_qwen25vl.py's random init at the shape's sizes (seeded by
the run's seed: every arm of a seed starts from the same weights). fp32 weights (TF32 GEMMs on
a GPU): a model this small is bound by the host's image loading, not by its GEMMs.
`--jobs N` runs the seeds in N processes at once (the steps of a model this small are bound by
one core's image loading, not by the GPU) and merges them; `--merge DIR...` does the merge of
separate runs; `--time-limit S` skips an arm that would end past S seconds (its row says so),
so that the JSON and the table are written before an outer limit kills the run.

Probes (megatron_latent/eval/probe_runner.run_probe, in this process): accuracy of the answer
with the latents as generated and ablated (zeros, the mean latent, shuffled across samples, the
span cut out), homogeneity, grounding top-1 and scale. Where the probe cannot run an arm the
cell says n/a with the reason (ablation_report.py `PROBE_LIMITS`):
- none: no latents; its answer accuracy comes from the same greedy generation (the prompt is
  the conversation up to the assistant's first token, as LVR's is up to its span opener) and
  every ablation is the identity: its ablation cells equal its as-generated accuracy by
  construction (marked "=");
- deeplatent: no probe targets (the LatentFormer builds its slots; the teacher states it is
  aligned to are layer outputs, not inputs): its grounding and latent/target scale are n/a;
  the ablations replace the grid it appends in one chunk forward (eval/probe_programs.py).

Writes to --out (with --jobs the per-seed runs are in OUT/runs/seedS): latent_ablation.json (settings, the command, one row per arm x seed with its
training summary and probe metrics, mean/std over seeds), latent_ablation.md (the table: mean ±
sample std over seeds), and per seed seed{S}/{arm}/probe.json (the probe's whole result with
every item's outputs) and train.log. Progress with an ETA on stdout. Nothing here is tuned
toward a result: every setting is the shape's (below) or a flag, and all are in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from ablation_report import _mean, markdown, metrics_of, summarize  # noqa: E402

# Sizes by time budget only. "gpu": one H200, 3 seeds x (4 arms + DeepLatent's cache) within
# ~10 minutes with --jobs 3 (estimate: ~5-6 min); "cpu-smoke": every arm end to end on a
# 2-core CPU in about a minute.
SHAPES = {
    "cpu-smoke": dict(
        preset="tiny-a", text={}, vision={},
        siglip=dict(hidden=32, layers=2, heads=2, image_size=56),
        steps=2, num_train=8, num_val=4, min_side=112, max_side=160, max_pixels=160 * 160,
        micro_batch=2, global_batch=2, seq_length=1024, lr=2e-3, warmup=0, canvas_tokens=4,
        probe_batch=4, max_new_tokens=32, bf16=False, workers=1),
    "gpu": dict(
        preset="tiny-a",
        # 8 layers of width 512 (GQA 8:4, head dim 64) and a 6-block width-256 vision tower:
        # 25.2M + 8.2M parameters (+0.3M tied embedding); ~0.85 TFLOP a step of 16 LVR samples
        # (~1.0 HyLaR, ~1.25 DeepLatent stage 2): a step is bound by image loading, not FLOPs
        text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1536, mrope_section=[8, 12, 12]),
        vision=dict(depth=6, hidden_size=256, num_heads=4, intermediate_size=1024,
                    window_size=112, fullatt_block_indexes=[2, 5]),
        siglip=dict(hidden=128, layers=2, heads=4, image_size=112),
        # fp32 weights (TF32 GEMMs): the step is bound by the host's image loading anyway
        steps=240, num_train=2000, num_val=128, min_side=224, max_side=336,
        max_pixels=336 * 336, micro_batch=16, global_batch=16, seq_length=1024, lr=1e-3,
        warmup=20, canvas_tokens=8, probe_batch=128, max_new_tokens=96, bf16=False, workers=8),
}
MIN_PIXELS = 3136
DEEPLATENT_BLOCK_TOKENS = 3 + 16 * 16 + 1  # placeholders, the largest grid, `</latent>`
RECIPES = ("none", "lvr", "hylar", "deeplatent")  # arms this benchmark knows how to train
# ---------------------------------------------------------------------- small helpers
class Progress:
    """Task-weighted progress lines with an ETA (elapsed / done weight x remaining weight)."""

    def __init__(self, total: float):
        self.total, self.done, self.start = total, 0.0, time.monotonic()

    def seconds_for(self, weight: float) -> float | None:
        """The projected time of `weight` more work at the rate so far (None before any)."""
        spent = time.monotonic() - self.start
        return spent / self.done * weight if self.done else None

    def __call__(self, msg: str, weight: float = 0.0) -> None:
        self.done += weight
        spent = time.monotonic() - self.start
        eta = spent / self.done * max(0.0, self.total - self.done) if self.done else float("nan")
        print(f"[ablation {spent:6.0f} s, {100 * self.done / self.total:3.0f}%, ETA "
              f"{eta:4.0f} s] {msg}", flush=True)


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _logged(path: Path):
    """The trainer's per-step lines go to `path`, not the benchmark's stdout."""
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""


def _common_flags(shape: dict, steps: int, seed: int, save: Path) -> list[str]:
    s = shape
    flags = ["--micro-batch-size", str(s["micro_batch"]), "--global-batch-size",
             str(s["global_batch"]), "--seq-length", str(s["seq_length"]),
             "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(s["max_pixels"]),
             "--train-iters", str(steps), "--lr", str(s["lr"]), "--min-lr", str(s["lr"] / 10),
             "--lr-warmup-iters", str(min(s["warmup"], max(0, steps - 1))),
             "--train-vision", "--train-merger", "--seed", str(seed),
             "--save", str(save), "--save-interval", str(steps), "--wandb-mode", "disabled"]
    return flags + (["--bf16"] if s["bf16"] else [])


def _history_summary(history: list[dict]) -> dict:
    """Mean of each logged scalar over the last 10% of steps (>= 1), the first step's, and the
    mean step time (the first step left out when there are more)."""
    steps = [h for h in history if "valid" not in h]
    if not steps:
        return {}
    tail = steps[-max(1, len(steps) // 10):]
    keys = [k for k, v in steps[-1].items() if isinstance(v, (int, float)) and k != "iteration"]
    times = [h["step_s"] for h in steps[1:] or steps if "step_s" in h]
    return {"steps": len(steps),
            "first": {k: steps[0].get(k) for k in keys if k not in ("step_s", "tokens", "lr")},
            "last": {k: _mean([h.get(k) for h in tail]) for k in keys
                     if k not in ("step_s", "tokens", "lr")},
            "mean_step_s": _mean(times), "tokens_per_step": _mean([h.get("tokens") for h in steps])}


def train_stage(sft, argv: list[str], log: Path) -> dict:
    """pretrain_sft.py's main, in this process; -> the run's history summary."""
    from megatron_latent import parallel
    from megatron_latent.training.trainer import train

    t = time.monotonic()
    with _logged(log):
        print(f"$ pretrain_sft.py {' '.join(argv)}", flush=True)
        try:
            history = train(sft.config_from_args(sft.parse_args(argv)))
        finally:
            parallel.destroy()
    return {**_history_summary(history), "wall_s": time.monotonic() - t}


def teacher_cache(cache_tool, argv: list[str], log: Path) -> float:
    t = time.monotonic()
    with _logged(log):
        print(f"$ cache_teacher_states.py {' '.join(argv)}", flush=True)
        rc = cache_tool.main(argv)
    if rc:
        raise RuntimeError(f"tools/cache_teacher_states.py exited {rc}:\n{_tail(log)}")
    return time.monotonic() - t


def align_layers(num_layers: int) -> list[int]:
    """DeepLatent's default: 4 evenly spaced decoder layers, the last included."""
    return sorted({max(1, round(num_layers * k / 4)) for k in (1, 2, 3, 4)})


# ---------------------------------------------------------------------- probes
def _reference(tokenizer, ids, loss_mask, start: int) -> str:
    """The supervised text from token `start` on (its <answer> content when it has one), as
    probe_runner's reference."""
    from megatron_latent.eval.answers import extract_answer

    kept = [int(ids[j]) for j in range(max(1, start), len(ids)) if loss_mask[j - 1] > 0]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    inner = extract_answer(text)
    return (text if inner is None else inner).strip()


def _item(index: int, x: dict, cut: int, ref_from: int, tokenizer, cfg):
    """probe_runner.ProbeItem of sample `x` with the prompt ids[:cut]."""
    from megatron_latent.eval.probe_runner import ProbeItem

    ids = x["input_ids"][:cut].tolist()
    counts = (x["image_grid_thw"].prod(-1) // cfg.spatial_merge_size ** 2).cumsum(0).tolist()
    n_img = ids.count(cfg.image_token_id)
    if n_img not in [0] + counts:
        raise ValueError(f"sample {index}: the prompt cut splits an image's tokens")
    return ProbeItem(index, ids, ([0] + counts).index(n_img),
                     _reference(tokenizer, x["input_ids"], x["loss_mask"], ref_from))


def generated_only(model, tokenizer, method, ds, *, num: int, batch_size: int,
                   max_new_tokens: int, seed: int) -> dict:
    """The probe's as-generated run where run_probe cannot run (the no-latent baseline):
    greedy with the method's decode program (None: plain text) from the prompt cut at the
    method's span opener (DeepLatent's `<latent>`) or, without latents, before the assistant's
    first supervised token; the same scoring, and for latents their homogeneity and scale."""
    import torch

    from megatron_latent.eval import latent_probe as lp
    from megatron_latent.eval.probe_runner import _split, accuracy_table
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.loading import answer_text, stop_ids
    from megatron_latent.inference.sampling import SamplingParams

    program = method.decode_program()
    cfg, device = model.cfg, next(model.parameters()).device
    opener = None if program is None else program.start_id
    items = []
    for i in range(min(num, len(ds))):
        x = ds[i]
        first_sup = int(x["loss_mask"].nonzero()[0]) + 1  # loss_mask[t]: token t+1 supervised
        if opener is None:
            cut = ref_from = first_sup
        else:
            at = (x["input_ids"] == opener).nonzero()
            if not at.numel():
                continue
            cut = int(at[0]) + 1
            last = x["latent_mask"].nonzero()
            ref_from = int(last[-1]) + 1 if last.numel() else cut
        items.append(_item(i, x, cut, ref_from, tokenizer, cfg))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stop_ids(tokenizer), seed=seed)
    gen = Generator(model, rule=program, pad_id=tokenizer.pad_token_id or 0)
    comps = []
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        comps += gen.generate([it.prompt(ds[it.index]) for it in chunk], params)
    outputs = [answer_text(tokenizer, c) for c in comps]
    spans = [_split(c) for c in comps]
    flat = [s for sp in spans for s in sp if s.shape[0]]
    text_ids = torch.tensor([t for it in items for t in it.ids if t != cfg.image_token_id],
                            device=device)
    with torch.no_grad():
        emb = model.language_model.embedding(input_ids=text_ids[None], position_ids=None)
    return {"method": method.name, "no_latents": program is None, "items_probed": len(items),
            "items_without_span": min(num, len(ds)) - len(items),
            "mean_latents_per_item": _mean([len(c.latent_positions) for c in comps]) or 0.0,
            "accuracy": accuracy_table({"as_generated": outputs}, [it.answer for it in items]),
            "homogeneity": {"generated": lp.homogeneity(
                [s for sp in spans for s in sp], [i for i, sp in enumerate(spans) for _ in sp])
                if flat else None},
            "grounding": None,
            "scale": {"latents_generated": lp.mean_norm(torch.cat(flat)) if flat else None,
                      "text_embeddings": lp.mean_norm(emb.reshape(-1, emb.shape[-1]))},
            "items": [{"index": it.index, "answer": it.answer,
                       "outputs": {"as_generated": o}, "n_latent": {"as_generated": len(
                           c.latent_positions)}} for it, o, c in zip(items, outputs, comps)]}


def probe_arm(ckpt: Path, val_path: str, shape: dict, seed: int) -> dict:
    """Load the arm's checkpoint and probe it on the held-out set (run_probe, or
    `generated_only` where it cannot run)."""
    from megatron_latent import parallel
    from megatron_latent.eval.probe_runner import run_probe
    from megatron_latent.inference.loading import load_for_generation

    parallel.initialize(parallel.ParallelConfig(1, 1), seed=seed)
    try:
        model, processor, cfg, method = load_for_generation(ckpt, tp=1, pp=1, spec="local")
        ds = method.sft_dataset(val_path, tokenizer=processor.tokenizer,
                                image_processor=processor.image_processor,
                                vocab_size=cfg.vocab_size, seq_length=None,
                                min_pixels=MIN_PIXELS, max_pixels=shape["max_pixels"])
        # DeepLatent's block (placeholders, up to 16 x 16 latents, `</latent>`) is counted
        # in the generation budget: it gets one block's worth on top of the text budget
        extra = DEEPLATENT_BLOCK_TOKENS if method.name == "deeplatent" else 0
        kw = dict(num=shape["num_val"], batch_size=shape["probe_batch"],
                  max_new_tokens=shape["max_new_tokens"] + extra, seed=seed)
        if method.decode_program() is None:
            return generated_only(model, processor.tokenizer, method, ds, **kw)
        return run_probe(model, processor.tokenizer, method, ds, **kw)
    finally:
        parallel.destroy()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm "
                   "(default: the shape's)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpu")
    p.add_argument("--methods", nargs="+", default=None,
                   help="arms (registered method names; default all, `none` = the baseline)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--difficulty", type=int, choices=(0, 1, 2), default=2)
    p.add_argument("--num-train", type=int, default=None, help="default: the shape's")
    p.add_argument("--num-val", type=int, default=None, help="default: the shape's")
    p.add_argument("--deeplatent-stage1-steps", type=int, default=None,
                   help="default: half the steps (stage 2 gets the rest)")
    p.add_argument("--workers", type=int, default=None, help="data generation processes")
    p.add_argument("--hidden-size", type=int, default=None, help="LLM width (heads of the "
                   "shape's head dim, half as many KV heads, FFN 3x; default: the shape's)")
    p.add_argument("--num-layers", type=int, default=None, help="LLM layers (default: the shape's)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step, one micro-batch (default: the shape's)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: an arm whose projected end (at the rate so far) would pass it "
                        "is not started (its row says so), so the JSON and the table are "
                        "written before an outer limit kills the run")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="instead of running: combine the rows of earlier --out DIRs (e.g. one "
                        "seed each, same settings otherwise) into --out")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every arm's checkpoint (default: deleted once probed)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)  # --jobs' children
    p.add_argument("--jobs", type=int, default=1,
                   help="run up to N seeds at once, each in its own process (OUT/runs/seedS), "
                        "then --merge them into OUT: a small model leaves the GPU mostly idle "
                        "while one process loads images on one core")
    a = p.parse_args(argv)
    for name in ("steps", "num_train", "num_val", "jobs"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.merge:
        return merge(a)
    if a.jobs > 1 and len(a.seeds) > 1:
        return run_jobs(a, sys.argv[1:] if argv is None else argv)
    if a.device == "cpu":  # before torch is imported anywhere
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, world size 1
        if os.environ.get(k) not in (None, "0", "1"):
            print(f"error: run it as one process ({k}={os.environ[k]})", file=sys.stderr)
            return 2
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from megatron_latent.platform.quiet import quiet_known_warnings

    quiet_known_warnings()
    import torch

    from ablation_data import ARM_FORMAT, write_arm_data
    from megatron_latent.latent import registry
    from megatron_latent.testing.tiny_checkpoint import PRESETS, make_tiny_qwen25vl
    from megatron_latent.testing.tiny_siglip import make_tiny_siglip

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    shape = dict(SHAPES[a.shape])
    for k in ("steps", "num_train", "num_val", "workers"):
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    shape["text"] = dict(shape["text"])
    if a.hidden_size is not None or a.num_layers is not None:
        text = {**PRESETS[shape["preset"]]["text"], **shape["text"]}
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        if a.hidden_size is not None:
            if a.hidden_size % head_dim:
                print(f"error: --hidden-size must be a multiple of the head dim {head_dim}",
                      file=sys.stderr)
                return 2
            heads = a.hidden_size // head_dim
            shape["text"].update(hidden_size=a.hidden_size, num_attention_heads=heads,
                                 num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
                                 intermediate_size=3 * a.hidden_size,
                                 mrope_section=text["mrope_section"])
        if a.num_layers is not None:
            shape["text"]["num_hidden_layers"] = a.num_layers
    if a.global_batch_size is not None:
        shape["global_batch"] = shape["micro_batch"] = a.global_batch_size
    steps = shape["steps"]
    s1_steps = a.deeplatent_stage1_steps if a.deeplatent_stage1_steps is not None else steps // 2
    if not 1 <= s1_steps < steps and ("deeplatent" in (a.methods or registry.names())):
        print(f"error: DeepLatent needs 1 <= stage-1 steps ({s1_steps}) < --steps ({steps})",
              file=sys.stderr)
        return 2
    arms = list(a.methods or registry.names())
    unknown = [m for m in arms if m not in registry.names()]
    if unknown:
        print(f"error: --methods {unknown}: registered are {list(registry.names())}",
              file=sys.stderr)
        return 2
    arms.sort(key=lambda m: (m != "none", m))  # the baseline first
    out = _fresh_out(a)
    if out is None:
        return 2
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # fp32 weights (see SHAPES), TF32 GEMMs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    n_layers = {**PRESETS[shape["preset"]]["text"], **shape["text"]}["num_hidden_layers"]
    layers = align_layers(n_layers)
    command = "python benchmarks/latent_ablation.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    settings = {
        "shape": a.shape, "device": device, "seeds": a.seeds, "steps": steps, "arms": arms,
        "deeplatent_stage1_steps": s1_steps, "deeplatent_align_layers": layers,
        "difficulty": a.difficulty, **{k: v for k, v in shape.items() if k != "steps"},
        "min_pixels": MIN_PIXELS, "lr_decay": "cosine to lr/10", "optimizer": "Adam "
        "(betas 0.9, 0.95), no weight decay, grad clip 1.0 (pretrain_sft.py defaults)",
        "model_text": {**PRESETS[shape["preset"]]["text"], **shape["text"]},
        "model_vision": {**PRESETS[shape["preset"]]["vision"], **shape["vision"]},
        "vision_training": "trained (--train-vision --train-merger)", "spec": "local",
        "precision": ("bf16" if shape["bf16"] else "fp32") + (" (TF32 GEMMs)" if device == "cuda"
                                                              and not shape["bf16"] else ""),
        "probe_decode": "each method's default decode program, greedy; max_new_tokens "
                        f"{shape['max_new_tokens']} (DeepLatent + {DEEPLATENT_BLOCK_TOKENS}: "
                        "one block)",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    print(f"[ablation] {a.shape} on {device}: arms {arms}, seeds {a.seeds}, {steps} steps, "
          f"{shape['num_train']} train / {shape['num_val']} val records, difficulty "
          f"{a.difficulty} -> {out}", flush=True)

    sft = _load_script(REPO / "pretrain_scripts" / "pretrain_sft.py", "_ablation_pretrain_sft")
    cache_tool = _load_script(REPO / "tools" / "cache_teacher_states.py", "_ablation_cache")
    # ETA weights, rough: a training step 1 (DeepLatent's cache ~ steps/4), a probe with
    # ablations ~ steps/2, one without ~ steps/8, a seed's data ~ steps/10
    probe_w = {m: steps / 8 if m == "none" else steps / 2 for m in arms}
    per_arm = {m: steps + (steps / 4 if m == "deeplatent" else 0) + probe_w[m] for m in arms}
    progress = Progress(len(a.seeds) * (steps / 10 + sum(per_arm.values())))
    rows, t_all = [], time.monotonic()
    result = {"command": command, "settings": settings, "arms": arms, "rows": rows}
    failed = incomplete = False
    for seed in a.seeds:
        root = out / f"seed{seed}"
        t = time.monotonic()
        data = write_arm_data(root / "data", seed=seed, num=shape["num_train"],
                              val_num=shape["num_val"], min_side=shape["min_side"],
                              max_side=shape["max_side"], difficulty=a.difficulty,
                              workers=shape["workers"])
        init = make_tiny_qwen25vl(root / "init", preset=shape["preset"], seed=seed,
                                  vision_overrides=shape["vision"], **shape["text"])
        siglip = make_tiny_siglip(root / "siglip", seed=seed, **shape["siglip"])
        settings.setdefault("mean_distractors", {})[seed] = data["distractors"]
        progress(f"seed {seed}: data and initial weights ({time.monotonic() - t:.1f} s)",
                 steps / 10)
        for arm in arms:
            row = {"arm": arm, "seed": seed, "status": "ok", "train": {}}
            rows.append(row)
            adir = root / arm
            adir.mkdir(parents=True, exist_ok=True)
            log = adir / "train.log"
            if arm not in RECIPES:
                row["status"] = "no recipe in benchmarks/latent_ablation.py"
                progress(f"seed {seed} {arm}: skipped ({row['status']})", per_arm[arm])
                continue
            need = progress.seconds_for(per_arm[arm])
            spent = time.monotonic() - progress.start
            if a.time_limit is not None and need is not None and spent + need > a.time_limit:
                incomplete = True
                row["status"] = (f"not run: projected end {spent + need:.0f} s > --time-limit "
                                 f"{a.time_limit:.0f} s")
                progress(f"seed {seed} {arm}: {row['status']}", per_arm[arm])
                continue
            fmt = ARM_FORMAT[arm]
            train_path, val_path = data[fmt]["train"], data[fmt]["val"]
            try:
                t = time.monotonic()
                ckpt = adir / "ckpt"
                if arm == "deeplatent":
                    s1 = adir / "stage1"
                    row["train"]["stage1"] = train_stage(sft, [
                        "--latent-method", "deeplatent", "--deeplatent-stage", "1",
                        "--hf-dir", str(init), "--data-path", train_path,
                        *_common_flags(shape, s1_steps, seed, s1)], log)
                    cache = adir / "teacher"
                    row["train"]["cache_s"] = teacher_cache(cache_tool, [
                        "--ckpt", str(s1), "--data", train_path, "--out", str(cache),
                        "--layers", ",".join(map(str, layers)), "--seq-length",
                        str(shape["seq_length"]), "--min-pixels", str(MIN_PIXELS),
                        "--max-pixels", str(shape["max_pixels"]), "--micro-batch-size",
                        str(shape["micro_batch"]), "--quiet"], log)
                    row["train"]["stage2"] = train_stage(sft, [
                        "--latent-method", "deeplatent", "--deeplatent-stage", "2",
                        "--teacher-states", str(cache), "--align-layers",
                        ",".join(map(str, layers)), "--pretrained-checkpoint", str(s1),
                        "--data-path", train_path,
                        *_common_flags(shape, steps - s1_steps, seed, ckpt)], log)
                else:
                    extra = []
                    if arm == "hylar":
                        extra = ["--canvas-encoder", str(siglip), "--canvas-tokens",
                                 str(shape["canvas_tokens"]), "--canvas-lr", str(shape["lr"])]
                    row["train"]["sft"] = train_stage(sft, [
                        "--latent-method", arm, "--hf-dir", str(init), "--data-path", train_path,
                        *extra, *_common_flags(shape, steps, seed, ckpt)], log)
                progress(f"seed {seed} {arm}: trained ({time.monotonic() - t:.1f} s)",
                         per_arm[arm] - probe_w[arm])
                t = time.monotonic()
                res = probe_arm(ckpt, val_path, shape, seed)
                res = {"ckpt": str(ckpt), "data": val_path, **res}
                (adir / "probe.json").write_text(json.dumps(res, indent=1) + "\n")
                row["probe_file"] = str((adir / "probe.json").relative_to(out))
                row["items_probed"] = res["items_probed"]
                row["probe_s"] = time.monotonic() - t
                row["metrics"], row["na"] = metrics_of(arm, res)
                progress(f"seed {seed} {arm}: probed ({time.monotonic() - t:.1f} s): accuracy "
                         f"{row['metrics']['acc.as_generated']:.3f} as generated", probe_w[arm])
                if not a.keep_checkpoints:  # (the probe's context pass reads the cache)
                    for d in (ckpt, adir / "stage1", adir / "teacher"):
                        shutil.rmtree(d, ignore_errors=True)
            except Exception as e:  # noqa: BLE001  (the other arms still run; exit 1 at the end)
                failed = True
                row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
                print(f"[ablation] seed {seed} {arm} FAILED:\n{traceback.format_exc()}\n"
                      f"--- {log} (tail) ---\n{_tail(log)}", flush=True)
            # every row so far, after each arm (a killed run keeps what it had)
            result["summary"] = summarize(rows, arms)
            result["wall_s"] = time.monotonic() - t_all
            (out / "latent_ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    result["wall_s"] = time.monotonic() - t_all
    (out / "latent_ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "latent_ablation.md").write_text(md)
    if not a.no_table:
        print(md, flush=True)
    print(f"[ablation] done in {time.monotonic() - t_all:.0f} s: {out / 'latent_ablation.json'}, "
          f"{out / 'latent_ablation.md'}", flush=True)
    return 1 if failed or incomplete else 0


def _fresh_out(a) -> Path | None:
    """--out, emptied if --overwrite allows it; None (after an error message) if it may not be."""
    out = Path(a.out).absolute()
    if out.exists() and any(out.iterdir()):
        if not a.overwrite:
            print(f"error: {out} is not empty; pass --overwrite", file=sys.stderr)
            return None
        shutil.rmtree(out)
    return out


def run_jobs(a, argv: list[str]) -> int:
    """--jobs: one child process per seed (at most `jobs` at once), their lines prefixed with
    the seed, then --merge of their results into --out."""
    import subprocess
    import threading

    out = _fresh_out(a)
    if out is None:
        return 2
    flags = ["--shape", a.shape, "--device", a.device, "--difficulty", str(a.difficulty)]
    for name in ("steps", "num_train", "num_val", "deeplatent_stage1_steps", "workers",
                 "hidden_size", "num_layers", "global_batch_size", "time_limit"):
        if getattr(a, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    if a.methods:
        flags += ["--methods", *a.methods]
    if a.keep_checkpoints:
        flags.append("--keep-checkpoints")
    env = dict(os.environ)  # the host's cores shared out among the children's torch threads
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.jobs)))
    runs, procs, threads, t0 = [], [], [], time.monotonic()

    def pump(proc, seed):
        for line in proc.stdout:
            print(f"[seed {seed}] {line}", end="", flush=True)

    pending = list(a.seeds)
    codes = {}
    while pending or procs:
        while pending and len(procs) < a.jobs:
            seed = pending.pop(0)
            run = out / "runs" / f"seed{seed}"
            runs.append(str(run))
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--seeds",
                                     str(seed), "--out", str(run), "--no-table", *flags], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            th = threading.Thread(target=pump, args=(proc, seed), daemon=True)
            th.start()
            procs.append((seed, proc, th))
        time.sleep(0.5)
        for item in [x for x in procs if x[1].poll() is not None]:
            item[2].join()
            codes[item[0]] = item[1].returncode
            procs.remove(item)
            print(f"[ablation] seed {item[0]} finished (exit {item[1].returncode}) after "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    done = [r for r in runs if (Path(r) / "latent_ablation.json").is_file()]
    if not done:
        print("error: no seed produced a result", file=sys.stderr)
        return 1
    command = "python benchmarks/latent_ablation.py " + " ".join(argv)
    rc = merge(argparse.Namespace(merge=done, out=str(out)), command, time.monotonic() - t0)
    print(f"[ablation] {len(done)}/{len(runs)} seeds merged in {time.monotonic() - t0:.0f} s: "
          f"{out / 'latent_ablation.json'}, {out / 'latent_ablation.md'}", flush=True)
    return max([rc, *codes.values()])


def merge(a, command: str | None = None, wall_s: float | None = None) -> int:
    """--merge: the rows of earlier runs (same settings but the seeds) in one result;
    `command`, `wall_s`: those of the run that made them (--jobs), if one did."""
    skip = ("seeds", "mean_distractors", "device", "gpu", "torch")
    parts = [json.loads((Path(d) / "latent_ablation.json").read_text()) for d in a.merge]
    ref = {k: v for k, v in parts[0]["settings"].items() if k not in skip}
    for d, part in zip(a.merge[1:], parts[1:]):
        other = {k: v for k, v in part["settings"].items() if k not in skip}
        if other != ref:
            diff = sorted(k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k))
            print(f"error: {d}: settings differ from {a.merge[0]}'s in {diff}", file=sys.stderr)
            return 2
    rows, seeds, distractors = [], [], {}
    for d, part in zip(a.merge, parts):
        for r in part["rows"]:
            if r["seed"] in seeds:
                print(f"error: {d}: seed {r['seed']} is in two of the runs", file=sys.stderr)
                return 2
            if r.get("probe_file"):
                r = {**r, "probe_file": str((Path(d) / r["probe_file"]).absolute())}
            rows.append(r)
        seeds += [x for x in part["settings"]["seeds"] if x not in seeds]
        distractors.update(part["settings"].get("mean_distractors", {}))
    settings = {**parts[0]["settings"], "seeds": seeds, "mean_distractors": distractors}
    arms = parts[0]["arms"]
    result = {"command": command or " && ".join(p["command"] for p in parts),
              "settings": settings, "arms": arms, "rows": rows,
              "summary": summarize(rows, arms),
              "wall_s": wall_s if wall_s is not None else sum(p.get("wall_s", 0) for p in parts),
              "merged_from": a.merge}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent_ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "latent_ablation.md").write_text(md)
    print(md, flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
