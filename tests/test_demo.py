"""The demo's training loop: stock and patched Trainer runs agree, and the logged loss is
the loss of one big batch (not inflated by gradient accumulation).

A tiny random Llama with SmolLM2's real tokenizer and vocabulary keeps this fast on CPU;
`make demo` runs the same code on the real 135M model.
"""

import os
import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from demo.finetune import finetune, side_by_side
from demo.instruction_data import IGNORE_INDEX, instruction_dataset, stdlib_instructions
from reference.causal_lm_loss import causal_lm_loss
from reference.pretrained import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_logging.set_verbosity_error()

BATCH, ACCUM = 2, 4
# The patched path sums the loss in another order than F.cross_entropy (and on CPU in
# chunks), so per-step losses and grad norms agree to fp32 rounding, not bit for bit.
RTOL = 2e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2()[1]


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    # Exactly one optimizer step's worth of examples: the first logged loss then covers all of them.
    return instruction_dataset(tokenizer, limit=BATCH * ACCUM, max_length=64)


def test_instructions_are_deterministic_real_text():
    first, second = stdlib_instructions(limit=20), stdlib_instructions(limit=20)
    assert first == second and len(first) == 20
    assert all(40 <= len(e["response"]) <= 400 and e["prompt"].startswith("What does `") for e in first)


def test_prompt_tokens_are_masked_and_answer_is_learned(tokenizer, dataset):
    for row in dataset:
        labels, ids = row["labels"], row["input_ids"]
        n_prompt = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        assert n_prompt > 0 and all(label == IGNORE_INDEX for label in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(ids[:n_prompt]).rstrip().endswith("assistant")


def _one_big_batch_loss(model, dataset) -> float:
    width = max(len(row["input_ids"]) for row in dataset)
    ids = torch.tensor([row["input_ids"] + [0] * (width - len(row["input_ids"])) for row in dataset])
    mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in dataset])
    labels = torch.tensor([row["labels"] + [IGNORE_INDEX] * (width - len(row["labels"])) for row in dataset])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return causal_lm_loss(logits, labels, logits.shape[-1]).item()


def test_stock_and_patched_runs_agree_and_loss_is_not_inflated(tiny_model, tokenizer, dataset):
    common = dict(steps=3, batch_size=BATCH, grad_accum=ACCUM, lr=1e-2, progress=False)
    stock = finetune(tiny_model, dataset, tokenizer, name="stock", patch=False, **common)
    patched = finetune(tiny_model, dataset, tokenizer, name="patched", patch=True, **common)
    # 3 steps of ACCUM micro-batches, plus the one forward+backward whose peak memory is measured.
    assert patched.report.patched and patched.report.calls.fused == 3 * ACCUM + 1
    assert len(stock.losses) == len(patched.losses) == 3
    torch.testing.assert_close(patched.losses, stock.losses, rtol=RTOL, atol=0)
    torch.testing.assert_close(patched.grad_norms, stock.grad_norms, rtol=RTOL, atol=0)
    # Step 1 sees every example once with the initial weights: its logged loss must be the
    # mean over all target tokens of the four micro-batches, not four times it.
    big_batch = _one_big_batch_loss(tiny_model, dataset)
    assert stock.losses[0] == pytest.approx(big_batch, rel=1e-4)
    assert patched.losses[0] == pytest.approx(big_batch, rel=1e-4)
    assert stock.losses[-1] < stock.losses[0]  # it trains
    assert "loss patched" in side_by_side(stock, patched)
    # One wall time per optimizer step; the typical one leaves out the first (one-off setup).
    assert len(stock.step_seconds) == len(patched.step_seconds) == 3
    assert patched.typical_step_seconds == statistics.median(patched.step_seconds[1:])


def test_lora_on_lm_head_trains_the_same_patched_and_unpatched(tiny_model, tokenizer, dataset):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    common = dict(steps=2, batch_size=BATCH, grad_accum=ACCUM, lr=1e-2, progress=False)
    stock = finetune(lora, dataset, tokenizer, name="stock", patch=False, **common)
    patched = finetune(lora, dataset, tokenizer, name="patched", patch=True, **common)
    assert patched.report.patched and patched.report.head == "lora"
    torch.testing.assert_close(patched.losses, stock.losses, rtol=RTOL, atol=0)
    torch.testing.assert_close(patched.grad_norms, stock.grad_norms, rtol=RTOL, atol=0)
    # The adapter's B matrix starts at zero: if the patch froze the head's adapter, the
    # second step's loss would differ between the runs.
    assert stock.losses[1] != stock.losses[0]
