"""Patched vision-language models under transformers.Trainer: every training call fused.

Trainer changes the model before training (``config.use_cache = False``, a new key in
composite configs, which once made every call fall back) and passes ``num_items_in_batch``;
``harness.trainer`` trains two steps of two accumulated micro-batches on CPU and reads the
patch's counters: 4 fused calls, 0 fallbacks. Three families run by default; all twelve with
``-m full`` (about two minutes on a busy 2-core CPU).
"""

from __future__ import annotations

import pytest

from harness.trainer import ACCUMULATION, STEPS, VLM_FAMILIES, train_patched

DEFAULT = {"llava", "qwen2_5_vl", "gemma3"}
CASES = [
    pytest.param(model_type, class_name, id=model_type, marks=() if model_type in DEFAULT else pytest.mark.full)
    for model_type, class_name in VLM_FAMILIES
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("model_type", "class_name"), CASES)
def test_every_trainer_call_is_fused(model_type, class_name):
    result = train_patched(model_type, class_name)
    assert result.patched, result.reason
    assert (result.fused, result.fallback) == (STEPS * ACCUMULATION, 0), result.reason
    assert result.fused_every_call
