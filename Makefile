# The two commands of the README:
#   make train   installs everything into .venv and trains ROC on MNRE (offline encoders)
#   make test    installs everything into .venv and runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ROC_DATA_DIR ?= data/mnre
CONFIG ?= configs/mnre.py:offline
# BUDGET=short (the default): 1 epoch at encoder learning rate 5e-5, about 20 minutes on a
# 2-core CPU with configs/mnre.py:offline. BUDGET=full: the config's own schedule (20 epochs).
BUDGET ?= short
WORKDIR ?= workdirs/mnre_offline_$(BUDGET)
BUDGET_FLAGS_short := --config.num_epochs=1 --config.train.lr_encoder=5e-5
BUDGET_FLAGS_full :=
BUDGET_NOTE_short := 1 epoch (382 steps of 32 on MNRE-2), encoder learning rate 5e-5. For \
  configs/mnre.py:offline about 20 min on a 2-core CPU (plus the one-off dataset build of a \
  first run), val micro-F1 about 52 (benchmarks/results/mnre_quality.json, budget e1). The \
  config's full schedule: make train BUDGET=full
BUDGET_NOTE_full := the config's own schedule (configs/mnre.py: 20 epochs, 7,640 steps of 32). \
  For configs/mnre.py:offline about 6.5 h on a 2-core CPU; use a GPU or TPU.
# On a CPU backend XLA:CPU's per-step buffers go on 2 MiB pages: glibc reads this tunable only
# at process start, so it is set here (docs/performance.md, "Host memory").
HUGE_PAGES_TUNABLE := glibc.malloc.hugetlb=1

.PHONY: install test train lint check-install clean

$(VENV)/.installed: requirements.txt requirements-offline.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-offline.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

train: install
	$(if $(filter $(BUDGET),short full),,$(error BUDGET=$(BUDGET): use short or full))
	@echo "make train: $(CONFIG) on $(ROC_DATA_DIR), into $(WORKDIR)"
	@echo "  budget $(BUDGET): $(BUDGET_NOTE_$(BUDGET))"
	@backend=$$($(PY) -c 'import jax; print(jax.default_backend())' 2>/dev/null); \
	tunables="$$GLIBC_TUNABLES"; \
	if [ "$$backend" = cpu ]; then tunables="$${tunables:+$$tunables:}$(HUGE_PAGES_TUNABLE)"; fi; \
	echo "  backend $$backend, GLIBC_TUNABLES=$$tunables"; \
	GLIBC_TUNABLES="$$tunables" ROC_DATA_DIR=$(ROC_DATA_DIR) $(PY) train.py --config $(CONFIG) \
	  --workdir $(WORKDIR) $(BUDGET_FLAGS_$(BUDGET)) $(ARGS)

# `pip install .` into a fresh venv, then roc-train / roc-eval / roc-predict on fixture data.
check-install:
	bash tools/check_install.sh

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)
