"""bench.trl_step on the CPU (``--tiny``): both variants run the same SFTTrainer steps, the
patched one entirely on the patch (every training call counted fused, none fallen back), and
their last losses agree (float32, the same weights and batch; measured: equal to the last bit;
asserted rtol 1e-5)."""

import json

import pytest

pytest.importorskip("trl")


def test_trl_step_times_both_variants_and_the_kernel_runs(capsys):
    from bench.trl_step import main

    result = main(["--tiny", "--reps", "2", "--warmup", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    trl, fused = result["trl"], result["fused"]
    assert fused["calls"] == {"fused": 3, "stock": 0, "fallback": 0}  # warmup + reps training steps
    assert trl["tokens"] == fused["tokens"] == 2 * 32
    assert trl["ms"] > 0 and fused["ms"] > 0 and trl["peak_mib"] is None
    assert fused["loss"] == pytest.approx(trl["loss"], rel=1e-5)
