"""Do a checkpoint's latents carry information? Probes on an evaluation set in its method's SFT
format (e.g. the val split of tools/make_synthetic_lvr.py: DIR/meta_val.json).

    python tools/latent_probe.py --ckpt CKPT --data DIR/meta_val.json --num 200 \\
        --out runs/probe/probe.json --plot runs/probe/probe.png

Prints a table (and writes --out JSON, --plot PNG) of:
- answer accuracy with the latents as generated and ablated: zeros, the mean latent of the set,
  another sample's latents (shuffled), the span cut out (its opener and closer kept at their
  positions); "changed" is the fraction of answers that differ from the as-generated ones;
- homogeneity: mean pairwise cosine of the latents within a span and across samples;
- grounding (methods with targets: LVR's box tokens, HyLaR's canvas): each span's mean vs its
  own target and the others, top-1 retrieval among its image's regions and among all samples,
  with the ceiling (the targets themselves) and chance;
- scale: norms of the latents, their targets, ordinary token embeddings and image features.
The prompt is each sample's own context up to its first latent span, the reference its answer
after the last one (megatron_latent/eval/probe_runner.py). Greedy decoding; progress with an
ETA on stdout. --ckpt: an HF directory or a megatron_latent checkpoint (PP=1; TP via torchrun).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


class Progress:
    """One line per stage and at most one every `every` seconds, with an ETA."""

    def __init__(self, enabled: bool, every: float = 10.0):
        self.enabled, self.every = enabled, every
        self.start = self.last = time.monotonic()
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (stage == self.stage and now - self.last < self.every
                                and done < total):
            return
        self.stage, self.last = stage, now
        spent = now - self.start
        eta = spent / done * (total - done) if done else float("nan")
        print(f"[probe] {stage}: {done}/{total} ({100 * done / total:.0f}%), "
              f"{spent:.0f} s, ETA {eta:.0f} s", flush=True)


def main(argv=None) -> int:
    from megatron_latent.inference.loading import add_model_args
    from megatron_latent.latent import registry
    from megatron_latent.latent.decoding import MODES

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="evaluation set in the method's SFT format")
    p.add_argument("--num", type=int, default=None, help="probe the first N samples (default all)")
    p.add_argument("--out", default=None, help="write the result (and per-item outputs) as JSON")
    p.add_argument("--plot", default=None, help="write the result as a PNG")
    p.add_argument("--latent-method", choices=registry.names(), default=None,
                   help="default: the checkpoint's own")
    p.add_argument("--latent-mode", choices=MODES, default=None)
    p.add_argument("--latent-steps", type=int, default=None)
    p.add_argument("--latent-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-pixels", type=int, default=None, help="default: the dataset's")
    p.add_argument("--max-pixels", type=int, default=None, help="default: the dataset's")
    p.add_argument("--seed", type=int, default=0, help="the shuffle's donors")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    if a.pp != 1:
        p.error("the probe runs at --pp 1 (teacher-forced hidden states and targets on one stage)")
    for name in ("num", "batch_size", "max_new_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not Path(a.data).exists():
        print(f"error: --data {a.data}: not found", file=sys.stderr)
        return 2

    from megatron_latent import parallel
    from megatron_latent.eval.probe_report import plot, table
    from megatron_latent.eval.probe_runner import run_probe
    from megatron_latent.fsutil import write_text_atomic
    from megatron_latent.inference.loading import is_output_rank, load_for_generation

    parallel.initialize(parallel.ParallelConfig(a.tp, 1), seed=a.seed)
    try:
        model, processor, cfg, method = load_for_generation(
            a.ckpt, tp=a.tp, pp=1, spec=a.spec, dtype=a.dtype, latent_method=a.latent_method)
        pixels = {k: v for k, v in (("min_pixels", a.min_pixels), ("max_pixels", a.max_pixels))
                  if v is not None}
        ds = method.sft_dataset(a.data, tokenizer=processor.tokenizer,
                                image_processor=processor.image_processor,
                                vocab_size=cfg.vocab_size, seq_length=None, **pixels)
        writer = is_output_rank()
        res = run_probe(model, processor.tokenizer, method, ds, num=a.num,
                        batch_size=a.batch_size, mode=a.latent_mode, steps=a.latent_steps,
                        threshold=a.latent_threshold, max_new_tokens=a.max_new_tokens,
                        seed=a.seed, progress=Progress(writer and not a.quiet))
    except (ValueError, FileNotFoundError) as e:  # bad --ckpt, method or data
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    if writer:
        res = {"ckpt": str(a.ckpt), "data": str(a.data), **res}
        print(table(res), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(a.out, json.dumps(res, indent=1) + "\n")
        if a.plot:
            Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
            plot(res, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
