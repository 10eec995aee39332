"""Trainer's label_smoothing_factor on the fused path (fused.hf.trainer.fuse_label_smoothing).

Stock Trainer with its LabelSmoother against the same Trainer whose smoothing was moved into
the patched loss, tiny Llama on CPU, 3 SGD steps of 2 accumulated micro-batches, then one
evaluation: training losses within rtol 1e-5, weights within atol 1e-5, evaluation loss
within rtol 1e-5, and every training call fused.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, Trainer, TrainingArguments

from fused.hf import patch_model, patch_report, unpatch_model
from fused.hf.trainer import fuse_label_smoothing
from reference.gradient_accumulation import tiny_lm_dataset
from tests.test_patch import llama


def trainer(tmp_path, model=None, **overrides) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.1, optim="sgd", label_smoothing_factor=0.1, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, train_sampling_strategy="sequential",
    )
    args = TrainingArguments(**(settings | overrides))
    data = tiny_lm_dataset()
    return Trainer(model=model or llama(), args=args, train_dataset=data, eval_dataset=data)


def run(trainer: Trainer) -> tuple[list[float], float]:
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer.evaluate()["eval_loss"]


def test_label_smoothing_is_fused_and_unchanged(tmp_path):
    stock = trainer(tmp_path / "stock")
    stock_losses, stock_eval = run(stock)
    fused = trainer(tmp_path / "fused")
    assert patch_model(fused.model).patched
    assert fuse_label_smoothing(fused) == pytest.approx(0.1) and fused.label_smoother is None
    losses, eval_loss = run(fused)
    calls = patch_report(fused.model).calls
    assert (calls.fused, calls.fallback) == (6, 0)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(eval_loss), torch.tensor(stock_eval), rtol=1e-5, atol=0)
    for (name, ours), theirs in zip(fused.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
    with pytest.raises(RuntimeError, match="label smoothing"):
        unpatch_model(fused.model)


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        fuse_label_smoothing(trainer(tmp_path))
    with pytest.raises(ValueError, match="no label smoother"):
        fuse_label_smoothing(trainer(tmp_path, label_smoothing_factor=0.0))
    from transformers import GPT2LMHeadModel

    class NotACausalLmClass(GPT2LMHeadModel):
        pass

    torch.manual_seed(0)
    model = NotACausalLmClass(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert patch_model(model).patched
    refused = trainer(tmp_path, model=model)
    with pytest.raises(ValueError, match="not a causal-LM class"):
        fuse_label_smoothing(refused)
    assert refused.label_smoother is not None
