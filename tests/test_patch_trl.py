"""A patched model under TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, which TRL's
SFT, DPO and GRPO trainers install and call with ``fused_lm_head=True``).

The patch does not serve those calls yet: TRL's forward runs the backbone and its own tiled
head. What is checked is that the patch never gets in its way: patched after TRL's head is
added, a ``fused_lm_head=True`` call runs the model body once (never a failed capture and a
second run), returns TRL's per-token outputs unchanged, and is counted as a fallback with
the reason, warned once. TRL's outputs are compared with the same call on an unpatched copy:
equal to rtol 1e-6 (the same code on the same weights).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fused.hf import patch_model, patch_report
from tests.test_patch import batch, llama

trl_utils = pytest.importorskip("trl.trainer.utils")


def test_a_trl_fused_lm_head_call_runs_once_and_is_counted_as_a_fallback():
    model = llama()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    unpatched = copy.deepcopy(model)
    report = patch_model(model)
    assert report.patched, report.reason
    runs = []
    model.model.register_forward_hook(lambda module, args, output: runs.append(1))
    model.train()
    unpatched.train()
    inputs = batch()
    with pytest.warns(RuntimeWarning, match=r"TRL's fused LM head \(fused_lm_head=True\)"):
        output = model(**inputs, fused_lm_head=True)
    expected = unpatched(**inputs, fused_lm_head=True)
    assert len(runs) == 1
    for name in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), rtol=1e-6, atol=0, msg=name)
    calls = patch_report(model).calls
    assert (calls.fused, calls.fallback) == (0, 1) and "TRL" in calls.last_fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        model(**inputs, fused_lm_head=True)
    output = model(**inputs)  # an ordinary training call still takes the fused path
    assert output.logits is None and calls.fused == 1
