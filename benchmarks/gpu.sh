#!/usr/bin/env bash
# One prepared run for a lent GPU (about 5 minutes): the paper-size ROC train step (bert-base +
# CLIP ViT-B/32 shapes, random init, synthetic batches, bf16 compute) for 60 s in JAX, then the
# same model in PyTorch if torch is there; prints examples/s and MFU and writes
# $OUT_DIR/gpu-<card>.json (default benchmarks/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
# JAX first; leave half of the card's memory to the PyTorch run in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train_step.py --seconds "${BENCH_SECONDS:-60}" \
  --out "$OUT_DIR/" "$@"
