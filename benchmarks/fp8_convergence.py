"""FP8 vs BF16 LVR SFT: the same 200 steps on the synthetic visual-search set, from the same
random initialisation, once per precision; prints the loss curves side by side, the step-200
loss difference and tokens/s (padded tokens of a step / its wall time, mean of the last half).

    python benchmarks/fp8_convergence.py --work /tmp/fp8 [--steps 200] [--recipes tensorwise delayed blockwise]

Set up the Megatron way: bf16 parameters with fp32 main parameters in megatron-core's
optimizer, DDP, TE linears in FP8 (LLM only; the vision tower stays bf16 unless --vision-fp8).
The model is a small Qwen2.5-VL (hidden 512, 8 layers, FP8-friendly sizes), not 7B: this checks
convergence, bench_sft.py measures speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--recipes", nargs="+", default=["tensorwise", "delayed", "blockwise"])
    ap.add_argument("--vision-fp8", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()

    from megatron_latent import parallel
    from megatron_latent.data.synthetic_lvr import make_synthetic_lvr
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl
    from megatron_latent.training.build import OptimSettings
    from megatron_latent.training.trainer import TrainConfig, train

    work = Path(args.work)
    ckpt = work / "small-qwen25vl"
    if not ckpt.exists():
        make_tiny_qwen25vl(ckpt, preset="tiny-b", hidden_size=512, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408,
                           mrope_section=[8, 12, 12],
                           vision_overrides=dict(depth=4, hidden_size=256, num_heads=4,
                                                 intermediate_size=512, window_size=112,
                                                 fullatt_block_indexes=[3]))
    data = work / "data"
    if not data.exists():
        make_synthetic_lvr(data, num=512, val_num=8, seed=0, min_side=224, max_side=448)
    runs = {"bf16": {}} | {f"fp8-{r}": dict(fp8="hybrid", fp8_recipe=r,
                                           vision_fp8=args.vision_fp8) for r in args.recipes}
    curves, speed = {}, {}
    for name, over in runs.items():
        cfg = TrainConfig(data_path=str(data / "meta.json"), hf_dir=str(ckpt), spec="te",
                          bf16=True, micro_batch_size=4, global_batch_size=16, seq_length=1024,
                          train_iters=args.steps, lr_warmup_iters=10,
                          optim=OptimSettings(lr=args.lr, min_lr=args.lr / 10),
                          min_pixels=224 * 224 // 4, max_pixels=448 * 448, seed=1234,
                          wandb_mode="disabled", model_overrides=over, latent_method="lvr")
        hist = train(cfg)
        parallel.destroy()
        curves[name] = [h["loss"] for h in hist]
        tail = hist[len(hist) // 2:]
        speed[name] = sum(h["tokens"] for h in tail) / sum(h["step_s"] for h in tail)
    names = list(curves)
    print("\n| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for s in sorted({1, 10, 25, 50, 100, 150, args.steps} & set(range(1, args.steps + 1))):
        print(f"| {s} | " + " | ".join(f"{curves[n][s - 1]:.4f}" for n in names) + " |")

    def smooth(n):  # mean of the last 10 steps: one step's loss depends on its batch
        return sum(curves[n][-10:]) / 10

    print("\n| run | loss (mean of last 10 steps) | vs bf16 | tokens/s | vs bf16 |\n|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {smooth(n):.4f} | {100 * (smooth(n) / smooth('bf16') - 1):+.2f}% "
              f"| {speed[n]:,.0f} | {speed[n] / speed['bf16']:.2f}x |")
    (work / "fp8_convergence.json").write_text(json.dumps({"curves": curves, "speed": speed}))


if __name__ == "__main__":
    main()
