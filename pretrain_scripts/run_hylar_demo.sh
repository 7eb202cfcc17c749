#!/usr/bin/env bash
# HyLaR SFT on CPU (or GPUs), end to end, with nothing downloaded (about 2 minutes on 2 cores):
#   1. a tiny random Qwen2.5-VL HF checkpoint and a tiny random SigLIP (the frozen canvas encoder)
#   2. a synthetic Zebra-CoT-style interleaved set on real photos: each answer thinks, looks at a
#      zoomed crop of the target (a reasoning image -> a canvas span), then answers
#   3. HyLaR SFT with TP=2 over 2 processes: CE + 0.5 * MSE of the hidden state before each
#      canvas slot against the canvas latent (SigLIP -> compressor -> projector), checkpoints
#   4. one generation from the checkpoint (the method comes from it): the span opened by the
#      prompt runs in latent mode, hidden states fed back, shown as [latent x N]
# Re-running resumes from runs/hylar_demo/ckpt. Override with NPROC, TP, ITERS, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/hylar_demo}; NPROC=${NPROC:-2}; TP=${TP:-2}; ITERS=${ITERS:-30}
mkdir -p "$OUT"
[ -d "$OUT/tiny-a" ] || $PY tools/make_tiny_qwen25vl.py --out "$OUT/tiny-a" --preset tiny-a
[ -d "$OUT/siglip" ] || $PY tools/make_tiny_siglip.py --out "$OUT/siglip"
[ -d "$OUT/data" ] || $PY tools/make_synthetic_interleaved.py --out "$OUT/data" --n 96 --val-n 16 \
  --min-side 112 --max-side 224 --no-progress
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/pretrain_sft.py \
  --latent-method hylar --canvas-encoder "$OUT/siglip" --canvas-tokens 4 \
  --hf-dir "$OUT/tiny-a" --data-path "$OUT/data/train" --valid-data-path "$OUT/data/val" \
  --tensor-model-parallel-size "$TP" --micro-batch-size 2 --global-batch-size 4 --seq-length 512 \
  --min-pixels 3136 --max-pixels 50176 --train-iters "$ITERS" --lr 2e-3 --lr-warmup-iters 3 \
  --canvas-lr 2e-3 --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 10 --eval-interval 10 \
  --wandb-exp-name hylar_demo --log-dir "$OUT"
[ -f "$OUT/photo.png" ] || $PY -c "import sys; from megatron_latent.data.sample_inputs import sample_photo
sample_photo('coffee').resize((168, 168)).save(sys.argv[1])" "$OUT/photo.png"
$PY tools/generate.py --ckpt "$OUT/ckpt" --image "$OUT/photo.png" \
  --prompt "What shape is the small red object?" --answer-prefix "<|canvas_start|>" \
  --latent-steps 4 --max-new-tokens 16
echo "done: checkpoint $OUT/ckpt, wandb logs (offline) under $OUT/wandb"
