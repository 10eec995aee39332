"""fused.hf.capture: the loss seams of the patcher.

- ``F.cross_entropy`` losses (older heads) are caught by the head's output itself: the function
  is never swapped, so another thread calling it during a patched forward gets torch's own.
- Losses computed in a submodule's ``loss_function`` (Kosmos-2.5's ``text_model``) are caught
  there, so the count reaching them is seen and ``accepts_loss_kwargs`` is right.

Tolerances as in tests/test_patch.py: rtol 1e-4, atol 1e-6 on the loss and every gradient.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from fused.hf.capture import CROSS_ENTROPY, LOSS_FUNCTION
from fused.hf.patch import patch_model
from reference.num_items_probe import probe_num_items_in_batch
from tests.test_patch import SIZES, assert_same_training, batch, loss_and_grads

CROSS_ENTROPY_FUNCTION = F.cross_entropy


class CrossEntropyLlama(LlamaForCausalLM):
    """An older head: ``nn.CrossEntropyLoss`` on the labels as given, label smoothing on.
    Its backbone runs torch's cross entropy on a tensor of its own in another thread while the
    forward is under way, to see what another thread sees."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        seen = {}

        def other_thread() -> None:
            seen["function"] = F.cross_entropy
            seen["loss"] = F.cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 2]))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        self.other_thread = seen
        loss = None
        if labels is not None:
            loss = nn.CrossEntropyLoss(label_smoothing=0.1)(logits.view(-1, logits.size(-1)), labels.view(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_cross_entropy_head_is_fused_without_swapping_torch_function():
    torch.manual_seed(0)
    model = CrossEntropyLlama(LlamaConfig(**SIZES))
    inputs = batch()
    stock = loss_and_grads(model, **inputs)
    report = patch_model(model)
    assert report.patched, report.reason
    assert report.loss == CROSS_ENTROPY
    patched = loss_and_grads(model, **inputs)
    assert_same_training(stock, patched)
    assert patched[0].logits is None and report.calls.fused == 1
    assert model.other_thread["function"] is CROSS_ENTROPY_FUNCTION
    torch.testing.assert_close(model.other_thread["loss"], torch.tensor(4.0).log())
    assert F.cross_entropy is CROSS_ENTROPY_FUNCTION


def test_a_loss_in_a_submodule_loss_function_is_seen_with_its_count():
    from harness.tiny_models import build_tiny_model

    model = build_tiny_model("kosmos-2.5", "Kosmos2_5ForConditionalGeneration")
    assert model.get_output_embeddings() is model.text_model.lm_head
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, model.config.text_config.vocab_size - 8, (2, 9), generator=generator)
    cases = [{"input_ids": input_ids, "labels": input_ids, **count} for count in ({}, {"num_items_in_batch": 7})]
    stock = [loss_and_grads(model, **inputs) for inputs in cases]
    divides = probe_num_items_in_batch(model).uses_num_items_in_batch
    report = patch_model(model)
    assert report.patched, report.reason
    assert report.loss == LOSS_FUNCTION
    assert divides is True and report.uses_num_items_in_batch is True and model.accepts_loss_kwargs is True
    for inputs, expected in zip(cases, stock):
        assert_same_training(expected, loss_and_grads(model, **inputs))
    assert report.calls.fused == 2
