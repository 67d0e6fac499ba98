# The two commands of the README:
#   make train   installs everything into .venv and trains ROC on MNRE (offline encoders)
#   make test    installs everything into .venv and runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ROC_DATA_DIR ?= data/mnre
CONFIG ?= configs/mnre.py:offline
WORKDIR ?= workdirs/mnre_offline

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
	ROC_DATA_DIR=$(ROC_DATA_DIR) $(PY) train.py --config $(CONFIG) --workdir $(WORKDIR)

# `pip install .` into a fresh venv, then roc-train / roc-eval / roc-predict on fixture data.
check-install:
	bash tools/check_install.sh

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)
