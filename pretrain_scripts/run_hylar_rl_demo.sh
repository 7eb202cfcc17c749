#!/usr/bin/env bash
# HyLaR stage 2 on CPU, after run_hylar_demo.sh: DePO (decoupled hybrid PPO) in the co-located
# loop at TP=2, from the stage-1 demo checkpoint, on HyLaR-RL-Data-schema parquet prompts
# (synthetic), then one generation with the result. Nothing is downloaded; a few minutes.
# The policy loss is the checkpoint's method's: dual-clip PPO on text (eps 0.2/0.28, c 3) + 0.05
# text-only KL + 0.5 x the latent term (kappa <h_t, z_t+1>, its own clip 0.1). A tiny model
# cannot earn HyLaR's accuracy/format rewards in a few steps, so the demo adds a learnable toy
# reward (the share of vowels, from a --reward-module) and filters groups on it: watch `reward`
# rise, and `latent pg`, `latent clip fraction`, `kl`, `latent-span rate`, `kept share`. Two PPO
# epochs per batch, so the clip ranges act (with one, as HyLaR ships, every ratio is 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/hylar_demo}; NPROC=${NPROC:-2}; TP=${TP:-2}; ITERS=${ITERS:-20}
[ -d "$OUT/ckpt" ] || bash pretrain_scripts/run_hylar_demo.sh
[ -d "$OUT/rl_data" ] || $PY tools/make_synthetic_rl.py --out "$OUT/rl_data" --n 64
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/train_grpo.py \
  --pretrained-checkpoint "$OUT/ckpt" --load "$OUT/depo" --data-path "$OUT/rl_data" \
  --tensor-model-parallel-size "$TP" --prompts-per-step 4 --group-size 4 --micro-batch-size 4 \
  --max-new-tokens 16 --seq-length 768 --min-pixels 3136 --max-pixels 50176 \
  --system-prompt $'\nYou are a helpful assistant.\n' --answer-prefix "<|canvas_start|>" \
  --latent-steps 4 --temperature 1.0 --top-k 0 \
  --reward-module megatron_latent.testing.rl_workers \
  --rewards vowels:1.0,accuracy:0.9,format:0.1 --filter-reward vowels \
  --ppo-epochs 2 --train-iters "$ITERS" --lr 3e-3 \
  --save "$OUT/depo" --save-interval "$ITERS" --wandb-exp-name depo_demo --log-dir "$OUT"
$PY tools/generate.py --ckpt "$OUT/depo" --image "$OUT/photo.png" \
  --prompt "What shape is the small red object?" --answer-prefix "<|canvas_start|>" \
  --latent-steps 4 --max-new-tokens 16
echo "done: DePO checkpoint $OUT/depo"
