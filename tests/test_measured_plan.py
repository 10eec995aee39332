"""The measured planner (fused/measured_plan.py): what it times, what it chooses and what it
keeps. The clock is replaced by a table of made-up milliseconds, so that the choice can be
checked on any machine; the GPU suite runs it for real (every Triton test on CUDA plans by
measuring)."""

import json
import random

import pytest
import torch

from fused import measured_plan as mp
from fused.plan import PlanSizes, TilePlan, candidate_plans, plan_for_budget

MiB = 2**20
SHAPES = [(8192, 2048, 128256), (8191, 576, 49152), (16384, 4096, 151936), (4096, 4096, 32000), (37, 64, 101)]
BUDGETS = [4 * MiB, 30 * MiB, 64 * MiB, 150 * MiB, 512 * MiB, 4096 * MiB]


def _kind(sizes: PlanSizes, pass_name: str = "forward,grads=hw") -> mp.ProblemKind:
    return mp.ProblemKind("test-gpu", "bfloat16", sizes.hidden_dim, sizes.vocab, sizes.n_rows, False, pass_name)


@pytest.fixture
def clock(monkeypatch, tmp_path):
    """Fresh timings; ``clock.ms[plan]`` is what timing ``plan`` reads, ``clock.runs`` every run."""

    class Clock:
        ms: dict = {}
        runs: list = []

        def run(self, plan):
            self.runs.append(plan)

    c = Clock()
    c.ms, c.runs = {}, []
    monkeypatch.delenv(mp.TIMINGS_FILE_VARIABLE, raising=False)
    monkeypatch.setattr(mp, "_timings", None)
    monkeypatch.setattr(mp, "_elapsed_ms", lambda run, plan: (run(plan), c.ms.setdefault(plan, random.uniform(1, 10)))[1])
    return c


@pytest.mark.parametrize("n,d,v", SHAPES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_candidates_fit_and_include_the_constants_choice(n, d, v, budget):
    sizes = PlanSizes(n, v, d, 2)
    plans = candidate_plans(sizes, budget)
    try:
        static = plan_for_budget(sizes, budget)
    except ValueError:
        assert plans == []
        return
    assert static in plans
    assert len(plans) <= 11
    assert all(sizes.plan_bytes(p) <= budget and 1 <= p.rows <= n and 1 <= p.cols <= v for p in plans)
    assert len({p.rows for p in plans}) >= len(plans) - 1  # one tile per row count (and the constants')


@pytest.mark.parametrize("n,d,v", SHAPES[:3])
def test_the_choice_is_the_fastest_measured_that_fits_and_never_slower_with_more_memory(clock, n, d, v):
    random.seed(n + v)
    sizes = PlanSizes(n, v, d, 2)
    kind = _kind(sizes)
    budgets = [b for b in BUDGETS if candidate_plans(sizes, b)]
    for budget in random.sample(budgets, len(budgets)):  # any order of first calls
        mp.measured_plan(sizes, budget, kind, clock.run)
    chosen = {b: mp.measured_plan(sizes, b, kind, clock.run) for b in budgets}
    times = [clock.ms[chosen[b]] for b in budgets]
    assert times == sorted(times, reverse=True), "a larger budget chose a slower plan"
    for budget, plan in chosen.items():
        fitting = [p for p in clock.ms if sizes.plan_bytes(p) <= budget]
        assert sizes.plan_bytes(plan) <= budget
        assert clock.ms[plan] == min(clock.ms[p] for p in fitting)


def test_each_kind_is_timed_once(clock):
    sizes = PlanSizes(8192, 128256, 2048, 2)
    first = mp.measured_plan(sizes, 512 * MiB, _kind(sizes), clock.run)
    candidates = candidate_plans(sizes, 512 * MiB)
    # Each candidate warms up and is timed once, again if not far slower than the fastest;
    # the finalists are timed twice more.
    fast = [p for p in candidates if clock.ms[p] <= mp.SLOW * min(clock.ms[c] for c in candidates)]
    assert len(clock.runs) == 2 * len(candidates) + len(fast) + 2 * mp.FINALISTS
    assert set(clock.runs) == set(candidates)
    clock.runs.clear()
    assert mp.measured_plan(sizes, 512 * MiB, _kind(sizes), clock.run) == first
    # Another token count of the same power-of-two bucket reuses the timings.
    assert mp.measured_plan(PlanSizes(8000, 128256, 2048, 2), 512 * MiB, _kind(sizes), clock.run).cols == first.cols
    assert clock.runs == []
    # Another pass is another kind.
    mp.measured_plan(sizes, 512 * MiB, _kind(sizes, "backward,grads=hw"), clock.run)
    assert len(clock.runs) == 2 * len(candidates) + len(fast) + 2 * mp.FINALISTS


def test_timings_kept_in_a_file_give_the_same_plans_without_timing(clock, monkeypatch, tmp_path):
    path = tmp_path / "timings.json"
    monkeypatch.setenv(mp.TIMINGS_FILE_VARIABLE, str(path))
    sizes = PlanSizes(8191, 49152, 576, 2)
    chosen = {b: mp.measured_plan(sizes, b, _kind(sizes), clock.run) for b in BUDGETS}
    stored = json.loads(path.read_text())
    assert list(stored) == [_kind(sizes).text()]
    assert "allx49152" in stored[_kind(sizes).text()]  # a whole-problem tile is stored as "all rows"
    monkeypatch.setattr(mp, "_timings", None)  # a new process
    clock.runs.clear()
    assert {b: mp.measured_plan(sizes, b, _kind(sizes), clock.run) for b in BUDGETS} == chosen
    assert clock.runs == []


def test_too_small_a_budget_is_refused_with_the_least_that_would_do(clock):
    sizes = PlanSizes(8192, 128256, 2048, 2)
    with pytest.raises(ValueError, match="too small.*at least"):
        mp.measured_plan(sizes, 1000, _kind(sizes), clock.run)


def test_measuring_only_on_cuda_unless_switched_off(monkeypatch):
    assert not mp.measuring(torch.device("cpu"))
    if torch.cuda.is_available():
        assert mp.measuring(torch.device("cuda"))
        monkeypatch.setenv(mp.SWITCH_VARIABLE, "0")
        assert not mp.measuring(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times plans on a GPU")
def test_a_measured_plan_gives_the_loss_of_the_same_plan_set_by_hand(monkeypatch, tmp_path):
    import fused

    monkeypatch.setenv(mp.TIMINGS_FILE_VARIABLE, str(tmp_path / "t.json"))
    monkeypatch.setattr(mp, "_timings", None)
    torch.manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(5000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 5000, (3000,), device="cuda")
    budget = 8 * MiB
    loss = fused.linear_cross_entropy(hidden, weight, labels, memory_budget=budget)
    loss.backward()
    assert json.loads((tmp_path / "t.json").read_text())  # timed, and kept
    (best,) = mp._chosen.values()  # the forward's one choice (a scalar loss's gradients come with it)
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    # No knob sets an epilogue plan: the same plan, handed to the op as the planner would.
    monkeypatch.setattr(fused.ops, "_plan", lambda *args: best)
    same = fused.linear_cross_entropy(hidden, weight, labels, memory_budget=budget)
    same.backward()
    assert torch.equal(loss, same)
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], weight.grad)


def test_epilogue_plans_are_timed_only_when_switched_on(clock, monkeypatch):
    sizes, budget = PlanSizes(8192, 128256, 2048, 2), 512 * MiB
    for p in candidate_plans(sizes, budget) + candidate_plans(sizes, budget, epilogue=True):
        clock.ms[p] = 1.0 if p.epilogue else 2.0
    monkeypatch.delenv(mp.EPILOGUE_VARIABLE, raising=False)
    assert not mp.measured_plan(sizes, budget, _kind(sizes), clock.run, epilogue=True).epilogue
    assert clock.runs and not any(p.epilogue for p in clock.runs)


def test_epilogue_plans_are_timed_for_the_finalists_rows_and_chosen_only_when_asked_for(clock, monkeypatch):
    monkeypatch.setenv(mp.EPILOGUE_VARIABLE, "1")
    sizes, budget = PlanSizes(8192, 128256, 2048, 2), 512 * MiB
    kind = _kind(sizes)
    base = candidate_plans(sizes, budget)
    both = base + candidate_plans(sizes, budget, epilogue=True)
    assert not any(p.epilogue for p in base)
    assert all(p.epilogue and sizes.plan_bytes(p) <= budget for p in both[len(base):])
    assert {p.rows for p in both[len(base):]} == {p.rows for p in base}  # one each: the memory fits
    # Made-up times: every epilogue plan is faster than every plan of row kernels.
    for i, p in enumerate(both):
        clock.ms[p] = 1 + i / 100 if p.epilogue else 5 + i / 100
    plan = mp.measured_plan(sizes, budget, kind, clock.run, epilogue=True)
    finalist_rows = {p.rows for p in sorted(base, key=clock.ms.get)[: mp.FINALISTS]}
    timed_epilogue = {p for p in clock.runs if p.epilogue}
    assert {p.rows for p in timed_epilogue} == finalist_rows
    assert plan == min(timed_epilogue, key=clock.ms.get)
    # The same kind's timings, for a caller whose pass has no epilogue kernels: never chosen.
    mp._chosen.clear()
    clock.runs.clear()
    assert mp.measured_plan(sizes, budget, kind, clock.run) == min(base, key=clock.ms.get)
    assert clock.runs == []


def test_epilogue_plans_keep_their_kind_in_the_timings_file(clock, monkeypatch, tmp_path):
    path = tmp_path / "timings.json"
    monkeypatch.setenv(mp.TIMINGS_FILE_VARIABLE, str(path))
    monkeypatch.setenv(mp.EPILOGUE_VARIABLE, "1")
    sizes = PlanSizes(8191, 49152, 576, 2)
    for p in candidate_plans(sizes, 512 * MiB) + candidate_plans(sizes, 512 * MiB, epilogue=True):
        clock.ms[p] = 1.0 if p.epilogue else 2.0
    chosen = mp.measured_plan(sizes, 512 * MiB, _kind(sizes), clock.run, epilogue=True)
    assert chosen.epilogue
    assert any(name.endswith("+epilogue") for name in json.loads(path.read_text())[_kind(sizes).text()])
    monkeypatch.setattr(mp, "_timings", None)  # a new process
    clock.runs.clear()
    assert mp.measured_plan(sizes, 512 * MiB, _kind(sizes), clock.run, epilogue=True) == chosen
    assert clock.runs == []
