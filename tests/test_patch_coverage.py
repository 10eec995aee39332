"""A representative subset of the coverage harness (``python -m harness.architectures`` runs
all of them): each architecture built tiny, patched, and compared with its stock forward
in float32 (loss and every parameter's gradient within fused.hf.probe.TOLERANCE, with
no count, an int and a tensor count; labels=None logits bit-identical)."""

from __future__ import annotations

import pytest
import torch

from fused.hf.probe import TOLERANCE
from harness.architectures import CAUSAL_LM, IMAGE_TEXT_TO_TEXT, Result, architectures, check_architecture, write_tables

# model_type, mapping, a fragment the report's transforms must contain ("" for none)
SUBSET = [
    ("llama", CAUSAL_LM, ""),  # the canonical forward
    ("gpt2", CAUSAL_LM, ""),  # tied head, Conv1D backbone
    ("opt", CAUSAL_LM, ""),  # attention key biases: gradients that are zero up to rounding
    ("phi", CAUSAL_LM, ""),  # a head with a bias
    ("gemma2", CAUSAL_LM, "softcap=3 (config.final_logit_softcapping)"),
    ("cohere", CAUSAL_LM, "logit_scale=0.0625 (config.logit_scale)"),
    ("granite", CAUSAL_LM, "logit_scale=0.25 (1/config.logits_scaling)"),
    ("inkling_text", CAUSAL_LM, "vocab[:120]"),  # padded vocabulary sliced off
    ("mixtral", CAUSAL_LM, ""),  # MoE with an auxiliary loss
    ("deepseek_v3", CAUSAL_LM, ""),  # latent attention, shared experts
    ("jamba", CAUSAL_LM, ""),  # attention + state-space hybrid
    ("bart", CAUSAL_LM, ""),  # loss through nn.CrossEntropyLoss, no shift
    ("xlnet", CAUSAL_LM, ""),  # the same, viewing its logits with logits.size(-1)
    ("gemma3", CAUSAL_LM, ""),  # a *ForConditionalGeneration in the causal-LM mapping
    ("llava", IMAGE_TEXT_TO_TEXT, ""),
    ("qwen2_vl", IMAGE_TEXT_TO_TEXT, ""),  # multimodal rotary positions
]


def _item(model_type: str, mapping: str) -> tuple[str, str, str]:
    return next(a for a in architectures() if a[0] == model_type and a[2] == mapping)


@pytest.mark.parametrize(("model_type", "mapping", "transform"), SUBSET, ids=[s[0] for s in SUBSET])
def test_patched_matches_stock(model_type, mapping, transform):
    result = check_architecture(*_item(model_type, mapping))
    assert result.status == "patched", result.reason
    assert result.max_error <= TOLERANCE[torch.float32]
    assert transform in result.transforms if transform else result.transforms == ""
    # Trainer's accepts_loss_kwargs after patching is what the model does with the count.
    if result.behavioural is not None:
        assert result.patched_accepts_loss_kwargs == result.behavioural


def test_a_model_the_patch_cannot_reproduce_is_refused_not_mismatched():
    # ProphetNet computes its loss over n-gram streams in its own _compute_loss.
    result = check_architecture(*_item("prophetnet", CAUSAL_LM))
    assert result.status == "refused" and "head, then the loss" in result.reason


def test_tables_are_written(tmp_path):
    rows = [
        Result("llama", "LlamaForCausalLM", CAUSAL_LM, "patched", "verified", 1e-7, "plain", "",
               static=True, behavioural=True, stock_accepts_loss_kwargs=True, patched_accepts_loss_kwargs=True),
        Result("ctrl", "CTRLLMHeadModel", CAUSAL_LM, "refused", "no loss call", None, "plain", "",
               static=False, behavioural=False, stock_accepts_loss_kwargs=True),
    ]
    write_tables(rows, tmp_path)
    coverage = (tmp_path / "patch_coverage.md").read_text()
    assert "- causal-lm: 2 architectures, 1 patched and verified (50.0%); 1 refused" in coverage
    assert "| llama | LlamaForCausalLM | causal-lm | patched | plain |  | 1.0e-07 | verified |" in coverage
    num_items = (tmp_path / "num_items_coverage.md").read_text()
    assert "Trainer's stock decision is wrong for 1 model types: ctrl" in num_items
    assert (tmp_path / "coverage.json").is_file()
