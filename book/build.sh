#!/usr/bin/env bash
# Build the book into book/_build/html from the outputs stored in the notebooks (they are
# never executed here), from scratch, with warnings as errors and nitpicky references.
# No network is used. Run from anywhere; VENV overrides the environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
rm -rf book/_build/html book/_build/.doctrees book/_build/jupyter_execute
# autodoc imports reference/ and fused/: those of this checkout (first on the path, whatever
# the environment has installed), offline. Not under the Triton interpreter, which hides
# which module a kernel belongs to (importing a kernel needs no GPU).
env -u TRITON_INTERPRET PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
    "$venv/bin/jupyter-book" build book \
    --all --warningiserror --nitpick --keep-going --quiet
# The stamp tells tests/test_book.py this build finished cleanly.
touch book/_build/html/.build-ok
