#!/usr/bin/env bash
# LVR vs HyLaR SFT step (canvas encoder beside LVR's) at the 7b-4l shape on one GPU, after the
# TE install (docs/design.md "Running the GPU tests"), ~2 min a process. With AB_ORIG (an older
# canvas.py, e.g. `git show 8971926:megatron_latent/latent/canvas.py > .gpu/ab/canvas_orig.py`,
# carried), that version runs first in its own process, then the tree's.
#   bash benchmarks/run_hylar_vs_lvr_gpu.sh OUT_DIR [AB_ORIG]
# Canvas path alone (SigLIP forward; compressor fwd+bwd), under torch.profiler:
#   python3 benchmarks/profile_canvas.py /tmp/bench_siglip_so400m
set -u
out=${1:-${OUT:-/tmp/hylar_bench}}; orig=${2:-}
mkdir -p "$out"
export PYTHONPATH=$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled PYTHONUNBUFFERED=1
args=(--shape 7b-4l --spec te --precision bf16 --num-micro-batches 8 --method lvr hylar --skip-hf
      --canvas-encoder /tmp/bench_siglip_so400m)
quiet() { grep -v -E "warnings.warn|UserWarning|DEPRECATED|class MimoModelConfig"; }
if [ -n "$orig" ]; then
  cp megatron_latent/latent/canvas.py /tmp/canvas_new.py
  cp "$orig" megatron_latent/latent/canvas.py
  python3 benchmarks/bench_sft.py "${args[@]}" \
    --json-out "$out/bench_sft_7b4l_lvr_hylar_h200_siglip_fp32.json" 2>&1 | quiet | tee "$out/log_siglip_fp32.txt"
  cp /tmp/canvas_new.py megatron_latent/latent/canvas.py
fi
python3 benchmarks/bench_sft.py "${args[@]}" \
  --json-out "$out/bench_sft_7b4l_lvr_hylar_h200.json" 2>&1 | quiet | tee "$out/log.txt"
