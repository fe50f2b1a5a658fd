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

.PHONY: install train test test-all lint bench bench-finetune bench-serve clean

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
# test-all adds (measured on 2 cores, clean clone, 2026-12-07: 17 minutes of pytest for make test,
# 18 with the install; the machine's speed drifts by up to 1.5x). The tests keep a compilation
# cache per pytest worker (tests/conftest.py), so a program compiled twice in one worker loads.
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

# Fine-tuning throughput (LoRA, then full) against Hugging Face transformers + peft on the same
# checkpoint: a random Llama of hf_train_ref.py's default shape, built and imported once.
BENCH_BASE ?= runs/bench_llama
BENCH_TEXT ?= ../shared/data/tinyshakespeare.txt
bench-finetune: install
	$(PY) -m pip install --quiet torch==2.13.0 'transformers>=5' 'peft>=0.13'
	test -f $(BENCH_BASE)/config.json || ( \
		$(PY) -m experiments.random_hf_model --text=$(BENCH_TEXT) --hf_dir=$(BENCH_BASE)_hf && \
		$(PY) -m experiments.import_checkpoint --hf_dir=$(BENCH_BASE)_hf --workdir=$(BENCH_BASE) )
	for mode in lora full; do \
		$(PY) -m experiments.benchmark --config=experiments/configs/finetune_$$mode.py \
			--config.init_from=$(BENCH_BASE) --config.data.path=$(BENCH_TEXT) \
			--config.train.batch_size=8 --peer=../shared/bench/hf_train_ref.py \
			--rounds=5 --steps=20 || exit 1; \
	done

# Serving over HTTP (experiments.serve_bench): against Hugging Face transformers `generate` on the
# same weights, a GPT-2 of 6 layers, width 384 (experiments/configs/gpt2_serve.py) trained here
# once (~7 min on 2 cores) and exported once; then, on lm_char.py's tiny shakespeare model (trained
# once, ~2 min), 16 clients against one, and the load test (1,000 requests from 32 clients, a
# tenth malformed).
SERVE_RUN ?= runs/serve_gpt2
SERVE_CHAR_RUN ?= runs/shakespeare_char
SERVE_TEXT ?= ../shared/data/tinyshakespeare.txt
bench-serve: install
	$(PY) -m pip install --quiet torch==2.13.0 'transformers>=5'
	test -d $(SERVE_RUN)/checkpoints || $(PY) -m experiments.train \
		--config=experiments/configs/gpt2_serve.py --config.data.path=$(SERVE_TEXT) \
		--workdir=$(SERVE_RUN)
	test -f $(SERVE_RUN)_hf/config.json || $(PY) -m experiments.export_checkpoint \
		--workdir=$(SERVE_RUN) --hf_dir=$(SERVE_RUN)_hf
	$(PY) -m experiments.serve_bench --workdir=$(SERVE_RUN) --clients=16 --prompt_tokens=32 \
		--max_tokens=64 --peer=../shared/bench/hf_generate_ref.py --hf_dir=$(SERVE_RUN)_hf
	test -d $(SERVE_CHAR_RUN)/checkpoints || $(PY) -m experiments.train \
		--config=experiments/configs/lm_char.py --config.data.path=$(SERVE_TEXT) \
		--workdir=$(SERVE_CHAR_RUN)
	$(PY) -m experiments.serve_bench --workdir=$(SERVE_CHAR_RUN)
	$(PY) -m experiments.serve_bench --workdir=$(SERVE_CHAR_RUN) --clients=32 \
		--load_requests=1000 --malformed_fraction=0.1

clean:
	rm -rf runs
