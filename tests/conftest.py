"""Without CUDA, run Triton kernels in the interpreter: triton.jit reads TRITON_INTERPRET when a
kernel is defined, so this must happen before any test module imports them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from problems import DEVICE  # noqa: E402

# Property tests draw the same examples on every run, so a CI result can be reproduced.
settings.register_profile("reproducible", derandomize=True)
settings.load_profile("reproducible")


@pytest.fixture
def on_the_suites_device():
    """Tensors made in the test live where the kernels run: on the GPU where there is one
    (compiled kernels), else on the CPU (the interpreter)."""
    with torch.device(DEVICE):
        yield


# The peers' test grids (tests/peer_grids.py): `--peer-grid-ratios` prints their worst
# error / tolerance per grid and path.
def pytest_addoption(parser):
    parser.addoption("--peer-grid-ratios", action="store_true",
                     help="print the worst error / tolerance of each peer grid and path (tests/peer_grids.py)")


def pytest_collection_modifyitems(config, items):
    import peer_grids

    peer_grids.collection_hook(config, items)


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("--peer-grid-ratios"):
        import peer_grids

        peer_grids.summary(terminalreporter)


@pytest.fixture(params=["row_kernels", "epilogue"])
def plan_kind(request, monkeypatch):
    """Each test twice: with the tile plans as the knobs set them (statistics and gradients
    from the row kernels), and with the same tiles as epilogue plans (the Triton product with
    the statistics or the gradient in its epilogue), which the measured planner may choose on a
    GPU but no knob sets."""
    if request.param == "epilogue":
        import dataclasses

        import fused.ops

        planned = fused.ops._plan
        monkeypatch.setattr(fused.ops, "_plan", lambda *args: dataclasses.replace(planned(*args), epilogue=True))
    return request.param
