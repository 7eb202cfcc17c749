#!/usr/bin/env bash
# The README's main job: a tiny LVR SFT run on CPU (or GPUs), end to end, with nothing downloaded.
#   1. a tiny random Qwen2.5-VL HF checkpoint   (tools/make_tiny_qwen25vl.py)
#   2. a synthetic visual-search LVR dataset on real photos (tools/make_synthetic_lvr.py)
#   3. LVR SFT with TP=2 over 2 processes, checkpoints + eval (pretrain_scripts/pretrain_lvr.py)
#   4. export of the trained checkpoint to HF format     (tools/convert_megatron_to_hf.py)
# Re-running resumes from runs/lvr_demo/ckpt. Override with NPROC, TP, ITERS, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/lvr_demo}; NPROC=${NPROC:-2}; TP=${TP:-2}; ITERS=${ITERS:-30}
mkdir -p "$OUT"
[ -d "$OUT/tiny-a" ] || $PY tools/make_tiny_qwen25vl.py --out "$OUT/tiny-a" --preset tiny-a
[ -d "$OUT/data" ] || $PY tools/make_synthetic_lvr.py --out "$OUT/data" --num 96 --val-num 16 --min-side 112 --max-side 224
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/pretrain_lvr.py \
  --hf-dir "$OUT/tiny-a" --data-path "$OUT/data/meta.json" --valid-data-path "$OUT/data/meta_val.json" \
  --tensor-model-parallel-size "$TP" --micro-batch-size 2 --global-batch-size 4 --seq-length 512 \
  --min-pixels 3136 --max-pixels 50176 --train-iters "$ITERS" --lr 2e-3 --lr-warmup-iters 3 \
  --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 10 --eval-interval 10 \
  --wandb-exp-name lvr_demo --log-dir "$OUT"
$PY tools/convert_megatron_to_hf.py --ckpt "$OUT/ckpt" --out "$OUT/hf_export" --overwrite
echo "done: checkpoint $OUT/ckpt, HF export $OUT/hf_export, wandb logs (offline) under $OUT/wandb"
