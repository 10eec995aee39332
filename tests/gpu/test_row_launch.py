"""bench.row_launch on a CUDA GPU: one line per (kernel, setting), the chosen setting marked.
Skipped without CUDA (the interpreter's times say nothing about a GPU's)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import row_launch
from fused.kernels.launch import row_kernel_launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times kernels on a GPU")


def test_every_kernel_and_setting_is_timed_and_the_chosen_one_marked(capsys):
    chosen = row_kernel_launch(300)
    row_launch.main(["--rows", "8", "--cols", "300", "--blocks", f"256,{chosen['BLOCK_V']}",
                     "--warps", str(chosen["num_warps"]), "--reps", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["kernel"], r["BLOCK_V"]) for r in lines} == {
        (k, b) for k in row_launch.BYTES_PER_LOGIT for b in (256, chosen["BLOCK_V"])
    }
    assert all(r["ms"] > 0 for r in lines)
    assert {r["BLOCK_V"] for r in lines if r["default"]} == {chosen["BLOCK_V"]}
