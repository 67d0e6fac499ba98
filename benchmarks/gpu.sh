#!/usr/bin/env bash
# One prepared run for a lent GPU: the paper-size ROC train step (bert-base + CLIP ViT-B/32 shapes,
# random init, synthetic batches, float32 parameters) swept in one process, most telling first:
#   batch 256: JAX bf16 einsum attention, JAX bf16 fused attention (jax.nn.dot_product_attention,
#              cuDNN flash; trains without attention dropout), PyTorch bf16 (HF, SDPA),
#              JAX float32 einsum (is the bf16 step itself slow?);
#   batch 32:  JAX bf16 fused, PyTorch bf16, JAX bf16 einsum, JAX float32 einsum.
# Each runs BENCH_SECONDS (12) after its compile (about 75 s each on an H200 before); a variant
# that would end after BENCH_BUDGET seconds (360, about 6 minutes: enough for the batch-256 four)
# is skipped and recorded as such. The whole sweep needs about 10 minutes (BENCH_BUDGET=560, with
# a 600 s command limit).
# $OUT_DIR/gpu-<card>.json (default benchmarks/results/) is rewritten after every variant, so a
# killed run keeps what it measured; the einsum variants' compiled HLO goes to $HLO_DIR (gzip)
# and its convert/transpose counts into the JSON. The summary's single-run keys (jax_ex_per_s,
# ratio_vs_torch, ...) are batch 256 einsum bf16. Extra arguments go to gpu_train_step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-benchmarks/results}"
HLO_DIR="${HLO_DIR:-$OUT_DIR/hlo}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
# JAX first; leave half of the card's memory to the PyTorch runs in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train_step.py --sweep --batch 256 \
  --seconds "${BENCH_SECONDS:-12}" --warmup 2 --budget "${BENCH_BUDGET:-360}" \
  --hlo-dir "$HLO_DIR" --out "$OUT_DIR/" "$@"
