"""The memory_budget knob end to end: the same loss and gradients as the contract, and a
measured peak within the budget (the planner's arithmetic: tests/test_plan.py)."""

import functools
import gc

import pytest
import torch

import fused
import fused.per_token
from fused.measured_plan import SWITCH_VARIABLE
from fused.ops import plan_tiles
from fused.plan import PlanSizes, TilePlan, plan_for_budget, statistics_bytes
from reference.linear_cross_entropy import linear_cross_entropy as contract
from reference.peak_memory import peak_memory_bytes

MiB = 2**20


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_budget_gives_the_contract_values(backend):
    # The Triton backend runs on the GPU when there is one, else in the interpreter (conftest).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    h = torch.randn(37, 24, device=device, requires_grad=True)
    w = torch.randn(301, 24, device=device, requires_grad=True)
    y = torch.randint(0, 301, (37,), device=device)
    y[::4] = -100
    # Room for 16 rows of 64 columns (fp32: no accumulator): several row chunks and vocabulary blocks.
    loss = fused.linear_cross_entropy(h, w, y, memory_budget=statistics_bytes(37) + 16 * 64 * 4 * 32, backend=backend)
    grads = torch.autograd.grad(loss, (h, w))
    expected = contract(h, w, y)
    expected_grads = torch.autograd.grad(expected, (h, w))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "n,v,budget",
    [(256, 1024, 3 * MiB), (128, 4096, 512 * 1024), (256, 2048, 64 * 1024)],
    ids=["whole_vocabulary", "blocks", "tiny_tiles"],
)
def test_measured_peak_stays_within_the_budget(n, v, budget):
    # Measured, not the plan's formula: the extra memory of a forward+backward beyond the
    # gradients, as the allocator (CUDA) or the profiler's allocation replay (CPU) sees it.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = 32
    torch.manual_seed(0)
    h = torch.randn(n, d, device=device, requires_grad=True)
    w = torch.randn(v, d, device=device, requires_grad=True)
    y = torch.randint(0, v, (n,), device=device)
    y[::5] = -100

    def step():
        fused.linear_cross_entropy(h, w, y, memory_budget=budget, backend="triton").backward()

    step()
    h.grad = w.grad = None  # freed before the measurement starts: the gradients count inside it
    extra = peak_memory_bytes(step, device) - (n + v) * d * 4
    plan = plan_for_budget(PlanSizes(n, v, d, 4), budget)
    assert plan.rows * plan.cols * 4 <= extra <= budget  # the tile, at least, was measured


@pytest.mark.parametrize("bad", [dict(memory_budget=0), dict(memory_budget=1 << 20, chunk_size=8),
                                 dict(memory_budget=1 << 20, vocab_chunk_size=64)])
def test_bad_budget_arguments(bad):
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    with pytest.raises(ValueError, match="memory_budget"):
        fused.linear_cross_entropy(h, w, y, **bad)


def test_measured_peak_counts_every_per_token_buffer():
    # A budget with room for exactly the per-token buffers and a 64 x V float64 tile, with
    # every option that adds a per-token buffer: float64 statistics, label smoothing (the
    # logit sum), z-loss, shifted labels (their int64 targets). The measured extra memory stays
    # within it, so statistics_bytes undercounts nothing the forward and backward hold.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, t, d, v = 4, 512, 16, 1024
    n, dtype = b * t, torch.float64
    torch.manual_seed(0)
    h = torch.randn(b, t, d, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(v, d, dtype=dtype, device=device, requires_grad=True)
    y = torch.randint(0, v, (b, t), device=device)
    y[:, ::3] = -100
    budget = statistics_bytes(n, 8) + 64 * v * 8
    assert plan_for_budget(PlanSizes(n, v, d, 8, compute_itemsize=8), budget) == TilePlan(rows=64, cols=v)

    def step():
        loss = fused.linear_cross_entropy(
            h, w, y, shift=True, label_smoothing=0.1, z_loss=1e-3, compute_dtype=dtype, memory_budget=budget,
            backend="triton",
        )
        loss.backward()

    step()
    h.grad = w.grad = None  # freed before the measurement starts: the gradients count inside it
    extra = peak_memory_bytes(step, device) - (n + v) * d * 8
    assert 64 * v * 8 <= extra <= budget



def test_measured_peak_of_an_epilogue_plan_stays_within_its_formula(monkeypatch):
    # An epilogue plan (no knob sets one: handed to the op as the measured planner would)
    # with label smoothing, so that all three planes of partial statistics are kept: the
    # measured extra memory is at least its tile and within PlanSizes.plan_bytes.
    import fused.ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, d, v = 256, 32, 2048
    torch.manual_seed(0)
    h = torch.randn(n, d, device=device, requires_grad=True)
    w = torch.randn(v, d, device=device, requires_grad=True)
    y = torch.randint(0, v, (n,), device=device)
    y[::5] = -100
    plan = TilePlan(rows=64, cols=v // 2, epilogue=True)
    budget = PlanSizes(n, v, d, 4).plan_bytes(plan)
    monkeypatch.setattr(fused.ops, "_plan", lambda *args: plan)

    def step():
        fused.linear_cross_entropy(h, w, y, label_smoothing=0.1, memory_budget=budget, backend="triton").backward()

    step()
    h.grad = w.grad = None  # freed before the measurement starts: the gradients count inside it
    extra = peak_memory_bytes(step, device) - (n + v) * d * 4
    assert plan.rows * plan.cols * 4 <= extra <= budget


@pytest.mark.parametrize("top1", [False, True], ids=["entropy", "entropy_top1"])
def test_measured_peak_counts_every_token_output_buffer(monkeypatch, top1):
    # fused.per_token (TRL's fused_lm_head) keeps per-token outputs beside the loss's
    # statistics (PlanSizes.token_output_bytes). Budgets of exactly one whole-problem tile, at
    # two token counts: forward and backward stay within the budget, and the forward's peak
    # grows from one count to the other by exactly the formula's growth. The difference
    # cancels the 8 KiB the formula allows for small tensors, which would hide a buffer of a
    # byte or four per token left out of it. int32 targets: the int64 copy statistics_bytes
    # counts is made. On CUDA, counts whose boolean buffers fill whole 512-byte blocks.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv(SWITCH_VARIABLE, "0")  # the constants' plan, not the fastest measured
    d, v = 8, 64
    counts = (512, 1536) if device == "cuda" else (64, 192)
    forward_peaks, budgets = {}, {}
    for n in counts:
        sizes = PlanSizes(n, v, d, 4, entropy=True, top1=top1)
        budgets[n] = sizes.plan_bytes(TilePlan(rows=n, cols=v))
        assert plan_for_budget(sizes, budgets[n]) == TilePlan(rows=n, cols=v)
        monkeypatch.setattr(fused.per_token, "plan_tiles", functools.partial(plan_tiles, memory_budget=budgets[n]))
        torch.manual_seed(0)
        h = torch.randn(n, d, device=device, requires_grad=True)
        w = torch.randn(v, d, device=device, requires_grad=True)
        y = torch.randint(0, v, (n,), dtype=torch.int32, device=device)
        y[::5] = -100
        a, b = torch.randn(2, n, device=device)

        def forward():
            return fused.per_token.token_outputs(h, w, y, top1=top1, backend="triton")

        def step():
            found = forward()
            # Under the interpreter a launch's tensors stay in reference cycles until the cyclic
            # collector runs (compiled launches leave none): without it the forward's tile
            # could outlive the forward.
            gc.collect()
            torch.autograd.backward((found["log_probs"], found["entropy"]), (a, b))

        step()  # cuBLAS allocates its workspace with the first product
        h.grad = w.grad = None  # freed before the measurement starts: the gradients count inside it
        extra = peak_memory_bytes(step, device) - (n + v) * d * 4
        assert n * v * 4 <= extra <= budgets[n]
        forward_peaks[n] = peak_memory_bytes(forward, device)
    first, last = counts
    assert forward_peaks[last] - forward_peaks[first] == budgets[last] - budgets[first]
