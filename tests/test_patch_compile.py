"""torch.compile(model, fullgraph=True) of a patched model: the patch adds no graph break.

The seams are installed once at patch time, so a compiled training forward registers no hook
and swaps no attribute. fullgraph=True raises on any graph break; torch._dynamo's
CompileCounter counts the graphs (one). The loss op is called with ``backend="triton"``
here (its custom op, the Triton kernels in the interpreter): the op's CPU fallback path
is not a custom op and breaks graphs of its own, which is the op's business, not the patch's.
Compiled against eager patched: loss and every gradient within rtol 1e-5, atol 1e-7 (the
same kernels on the same inputs; only the graph's own ops may be reordered).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import LlamaConfig, LlamaForCausalLM

import fused.hf.forward
from fused.hf import patch_model, patch_report
from tests.test_patch import SIZES, batch, loss_and_grads


@pytest.fixture
def triton_op(monkeypatch):
    monkeypatch.setattr(
        fused.hf.forward, "linear_cross_entropy", functools.partial(fused.hf.forward.linear_cross_entropy, backend="triton")
    )


def test_compiled_patched_training_forward_is_one_graph(triton_op):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES))
    assert patch_model(model).patched
    eager = loss_and_grads(model, **batch())
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for seed in (1, 2):  # the second call reuses the graph
        output, loss, grads = loss_and_grads(compiled, **batch(seed))
    assert counter.frame_count == 1
    assert output.logits is None
    torch.testing.assert_close(loss_and_grads(model, **batch(2))[1], loss, rtol=1e-5, atol=1e-7)
    _, eager_loss, eager_grads = eager
    _, loss, grads = loss_and_grads(compiled, **batch())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"], grad, rtol=1e-5, atol=1e-7, msg=name)
    calls = patch_report(model).calls
    assert (calls.fused, calls.fallback) == (5, 0)  # 2 eager, 3 compiled: the counter is kept under compile


def test_compiled_eval_call_is_the_stock_graph(triton_op):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES))
    model.eval()
    stock_logits = model(input_ids=batch()["input_ids"]).logits
    patch_model(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=CompileCounter(), fullgraph=True)
    logits = compiled(input_ids=batch()["input_ids"]).logits
    torch.testing.assert_close(logits, stock_logits, rtol=1e-6, atol=1e-7)
