#!/bin/bash
# LVR stage 2 on CPU, after run_lvr_demo.sh: co-located GRPO (rollouts with latent steps, rewards,
# reference KL, training) at TP=2 from the stage-1 demo checkpoint, then one generation with
# the result. Nothing is downloaded; about a minute. A tiny model cannot earn the real
# accuracy/format rewards in a few steps, so the demo adds a learnable toy reward (the share of
# vowels in the answer, registered by a --reward-module): watch `reward` rise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/lvr_demo}; NPROC=${NPROC:-2}; TP=${TP:-2}; ITERS=${ITERS:-20}
[ -d "$OUT/ckpt" ] || bash pretrain_scripts/run_lvr_demo.sh
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/train_grpo.py \
  --pretrained-checkpoint "$OUT/ckpt" --load "$OUT/grpo" --data-path "$OUT/data/meta_rl.json" \
  --tensor-model-parallel-size "$TP" --prompts-per-step 4 --group-size 4 --micro-batch-size 4 \
  --max-new-tokens 16 --seq-length 512 --min-pixels 3136 --max-pixels 50176 \
  --answer-prefix "<|lvr_start|>" --latent-steps 4 --temperature 1.0 --top-k 0 \
  --reward-module megatron_latent.testing.rl_workers --rewards vowels:1.0,accuracy:1.0,format:1.0 \
  --train-iters "$ITERS" --lr 3e-3 --kl-beta 0.0 \
  --save "$OUT/grpo" --save-interval "$ITERS" --wandb-exp-name grpo_demo --log-dir "$OUT"
$PY tools/generate.py --ckpt "$OUT/grpo" --image "$(ls "$OUT"/data/images/*.png | head -1)" \
  --prompt "What shape is the small red object?" --answer-prefix "<|lvr_start|>" \
  --latent-method lvr --latent-steps 4 --max-new-tokens 16
echo "done: GRPO checkpoint $OUT/grpo"
