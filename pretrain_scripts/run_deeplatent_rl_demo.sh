#!/usr/bin/env bash
# DeepLatent RL on CPU, after run_deeplatent_demo.sh: continuous-space GRPO (spec 2.9) in the
# co-located loop at TP=2 from the stage-2 demo checkpoint, then one generation with the result.
# Nothing is downloaded; about 3 minutes on 2 cores (after the SFT demo).
# Each rollout samples both modulations of every block (a = mu + sigma eps) and records their
# statistics; the loss is GRPO over the sampled tokens plus the clipped Gaussian ratio and KL of
# the two modulation actions per block, with the grid, LatentFormer and scale head frozen.
# A tiny model cannot earn accuracy in a few steps, so the demo adds a learnable toy reward (the
# share of vowels in the text, block tokens excluded, from a --reward-module): watch `reward`
# rise, and `cont clip fraction`, `cont kl`, `cont actions per rollout`. Demo choices (not the
# paper's): the log-prob per dimension (--cont-logprob-reduction mean_per_dim; the paper's sum
# over ~N x d dims dominates the gradient norm of a tiny model: 247 at step 1 vs 0.98), the
# MLPs at LR 1e-5 (--modulation-lr) and 2 PPO epochs, so the clip ranges act.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/deeplatent_demo}; NPROC=${NPROC:-2}; TP=${TP:-2}; ITERS=${ITERS:-16}
[ -d "$OUT/stage2" ] || bash pretrain_scripts/run_deeplatent_demo.sh
[ -d "$OUT/rl_data" ] || $PY tools/make_synthetic_rl.py --out "$OUT/rl_data" --n 64
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/train_grpo.py \
  --pretrained-checkpoint "$OUT/stage2" --load "$OUT/rl" --data-path "$OUT/rl_data" \
  --tensor-model-parallel-size "$TP" --prompts-per-step 4 --group-size 4 --micro-batch-size 4 \
  --max-new-tokens 96 --seq-length 1024 --min-pixels 3136 --max-pixels 50176 \
  --answer-prefix "<latent>" --temperature 1.0 --top-k 0 \
  --cont-logprob-reduction mean_per_dim --modulation-lr 1e-5 \
  --reward-module megatron_latent.testing.rl_workers \
  --rewards vowels:1.0,accuracy:0.9,format:0.1 \
  --ppo-epochs 2 --train-iters "$ITERS" --lr 3e-3 \
  --save "$OUT/rl" --save-interval "$ITERS" --wandb-exp-name deeplatent_rl_demo --log-dir "$OUT"
$PY tools/generate.py --ckpt "$OUT/rl" --image "$OUT/photo.png" \
  --prompt "What shape is the small red object?" --answer-prefix "<latent>" --max-new-tokens 96
echo "done: DeepLatent RL checkpoint $OUT/rl"
