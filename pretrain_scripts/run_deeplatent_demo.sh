#!/usr/bin/env bash
# DeepLatent on CPU, end to end, nothing downloaded (a few minutes on 2 cores):
#   1. a tiny random Qwen2.5-VL and synthetic Zebra-CoT-style data whose answers zoom in twice
#      (two reasoning images per row)
#   2. stage 1: CE with the reasoning images as real assistant images (TP=2)
#   3. the teacher cache: the stage-1 model's states at those images' slots, at the aligned
#      layers (tools/cache_teacher_states.py, data-parallel over 2 processes)
#   4. stage 2: each reasoning image becomes a latent block built in one pass by the
#      LatentFormer; CE + 4.0 x cosine alignment to the teacher + 0.5 x scale CE (TP=2)
#   5. one generation: the prompt opens a block; its grid is appended in one forward
# Override with NPROC, TP, ITERS1, ITERS2, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/deeplatent_demo}; NPROC=${NPROC:-2}; TP=${TP:-2}
ITERS1=${ITERS1:-20}; ITERS2=${ITERS2:-30}
mkdir -p "$OUT"
[ -d "$OUT/tiny-a" ] || $PY tools/make_tiny_qwen25vl.py --out "$OUT/tiny-a" --preset tiny-a
[ -d "$OUT/data" ] || $PY tools/make_synthetic_interleaved.py --out "$OUT/data" --n 64 --val-n 8 \
  --min-side 112 --max-side 224 --reasoning-images 2 --no-progress
COMMON=(--micro-batch-size 2 --global-batch-size 4 --seq-length 768 --min-pixels 3136
        --max-pixels 50176 --tensor-model-parallel-size "$TP" --lr-warmup-iters 2 --log-dir "$OUT")
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/pretrain_sft.py \
  --latent-method deeplatent --deeplatent-stage 1 --hf-dir "$OUT/tiny-a" \
  --data-path "$OUT/data/train" "${COMMON[@]}" --train-iters "$ITERS1" --lr 2e-3 \
  --save "$OUT/stage1" --load "$OUT/stage1" --save-interval "$ITERS1" --wandb-exp-name deeplatent_s1
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" tools/cache_teacher_states.py \
  --ckpt "$OUT/stage1" --data "$OUT/data/train" --out "$OUT/cache" --layers 1,2 \
  --seq-length 768 --min-pixels 3136 --max-pixels 50176 --shard-samples 16
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_scripts/pretrain_sft.py \
  --latent-method deeplatent --deeplatent-stage 2 --teacher-states "$OUT/cache" \
  --align-layers 1,2 --pretrained-checkpoint "$OUT/stage1" \
  --data-path "$OUT/data/train" "${COMMON[@]}" --train-iters "$ITERS2" --lr 2e-3 \
  --save "$OUT/stage2" --load "$OUT/stage2" --save-interval "$ITERS2" --wandb-exp-name deeplatent_s2
[ -f "$OUT/photo.png" ] || $PY -c "import sys; from megatron_latent.data.sample_inputs import sample_photo
sample_photo('coffee').resize((168, 168)).save(sys.argv[1])" "$OUT/photo.png"
$PY tools/generate.py --ckpt "$OUT/stage2" --image "$OUT/photo.png" \
  --prompt "What shape is the small red object?" --answer-prefix "<latent>" --max-new-tokens 300
echo "done: stage 1 $OUT/stage1, teacher cache $OUT/cache, stage 2 $OUT/stage2"
