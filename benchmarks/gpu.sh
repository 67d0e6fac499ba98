#!/usr/bin/env bash
# The paper-size ROC train step on one GPU (bert-base + CLIP ViT-B/32 shapes, random init,
# synthetic batches, float32 parameters), swept in one process, most telling first:
#   batch 256: JAX bf16 einsum attention, JAX bf16 fused attention (jax.nn.dot_product_attention,
#              cuDNN flash; trains without attention dropout), PyTorch bf16 (HF, SDPA),
#              JAX float32 einsum;
#   batch 32:  JAX bf16 fused, PyTorch bf16, JAX bf16 einsum, JAX float32 einsum.
# Each variant trains BENCH_SECONDS (12) after its compile (about 60-90 s each on an H200); one
# that would end after BENCH_BUDGET seconds (480) is skipped and recorded as such.
# $OUT_DIR/gpu-<card>.json (default benchmarks/results/) is rewritten after every variant, so a
# killed run keeps what it measured. Extra arguments go to gpu_train_step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
# Leave half of the card's memory to the PyTorch variants in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train_step.py --seconds "${BENCH_SECONDS:-12}" \
  --budget "${BENCH_BUDGET:-480}" --out "$OUT_DIR/" "$@"
