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
	touch $(STAMP)

install: $(STAMP)

# Train the tiny tokenizer on the embedded `shapes` set (about 7 minutes on 2 CPU cores), export it, probe it.
DEMO_STEPS ?= 400
demo: $(STAMP)
	$(BIN)/python -m stellar_tok.train config=configs/tokenizer/tiny.yaml train.steps=$(DEMO_STEPS) train.output_dir=$(OUT)/tokenizer
	$(BIN)/python -m stellar_tok.probe tokenizer=$(OUT)/tokenizer/tokenizer data.name=shapes epochs=10

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf runs .pytest_cache
