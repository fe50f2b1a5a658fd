# The README's two commands: `make train` and `make test`. Both set up a virtual environment on
# a fresh machine first (python3 -m venv + pip install -e '.[test]'), once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/lm_stdlib
CONFIG ?= experiments/configs/lm_stdlib.py
PYTEST_ARGS ?=
# pytest-xdist workers; each takes whole test files (module fixtures stay in one worker).
TEST_WORKERS ?= 2
TRAIN_ARGS ?=

.PHONY: install train test test-all lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR) $(TRAIN_ARGS)

# make test (CI) leaves out the tests marked slow: the notebooks, the README's commands, the
# mesh-layout equivalence runs, the two-process runs and the kernels' long sweeps, which make
# test-all adds (about 30 minutes on 2 cores against under 20).
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# LM throughput against the PyTorch eager peer (installs the CPU torch wheel into the venv).
bench: install
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m experiments.benchmark --config=experiments/configs/lm_char.py \
		--config.data.path=../shared/data/tinyshakespeare.txt \
		--peer=../shared/bench/torch_gpt_ref.py --rounds=5

clean:
	rm -rf runs
