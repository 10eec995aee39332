"""`import fused` stays light: the op needs torch and Triton, not transformers.

Measured in a fresh interpreter with ``python -X importtime``, which writes one line per module
to stderr: ``import time: <self us> | <cumulative us> | <indented module name>``.
"""

import os
import subprocess
import sys

import pytest

# What fused adds on top of torch (its kernels, Triton, reference). torch's own import is the
# floor any user pays, so it is left out of the budget; transformers.Trainer alone cost 9 s.
OWN_IMPORT_BUDGET_S = 1.0


def _import_fused() -> tuple[set[str], dict[str, int]]:
    """The modules ``import fused`` loaded in a fresh interpreter, and the cumulative import
    time in microseconds of each that importtime reports."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    statement = "import sys, fused; print(*sys.modules, sep=chr(10))"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], env=env, capture_output=True, text=True, check=True
    )
    times = {}
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit():
                times[name.strip()] = int(cumulative)
    return set(result.stdout.split()), times


@pytest.fixture(scope="module")
def fused_import() -> tuple[set[str], dict[str, int]]:
    return _import_fused()


def test_import_fused_loads_no_transformers(fused_import):
    modules, _ = fused_import
    assert "fused" in modules
    loaded = sorted(name for name in modules if name.split(".")[0] in {"transformers", "datasets"})
    assert not loaded, f"import fused loaded {len(loaded)} modules of transformers and datasets: {loaded[:5]}"


def test_import_fused_adds_little_to_torch(fused_import):
    _, times = fused_import
    own = (times["fused"] - times["torch"]) / 1e6
    assert own < OWN_IMPORT_BUDGET_S, f"import fused took {own:.2f} s beyond torch's import"
