"""The fastest tile plan on the GPU that runs it, measured there.

``fused.plan`` knows exactly what each plan costs in memory. Which of the plans that fit a
budget is fastest depends on the device (memory bandwidth against matmul rate, launch
overhead) and on the sizes: constants tuned on an H100 chose badly on an H200. So the first
call of each kind of problem times the candidate plans (``fused.plan.candidate_plans``) on
that call's own inputs, and every call of that kind takes the fastest measured plan that fits
its budget.

A kind is the device, the dtypes, hidden size, vocabulary, bias, the pass (which gradients,
which options change the row kernels) and the token count rounded up to a power of two: a
plan of "all rows" stands for every token count of its bucket.

- First call of a kind: each candidate (ten at most) runs once to warm up and once or twice
  timed; the three fastest run twice more, and the least time decides. At most
  ``3 * candidates + 6`` runs of the loss, each within the budget's memory: on an H200, 0.2 to
  3 seconds at the benchmark's shapes (``results/``). With ``FUSED_EPILOGUE_PLANS=1``, for
  16-bit inputs, the epilogue plans of the three fastest row counts (``TilePlan.epilogue``)
  are timed after them, the same way: up to 15 runs more.
- A larger budget never chooses a slower plan: the choice is the fastest of every measured
  plan that fits, a superset of what fits a smaller budget.
- One plan's results are bitwise deterministic. Plans differ in rounding (``grad_weight`` is
  summed over row chunks), and two plans within noise of each other can swap between
  processes: ``FUSED_PLAN_TIMINGS=path.json`` keeps the timings in a file, and processes that
  read it choose the same plans. ``FUSED_MEASURED_PLANS=0`` turns measuring off
  (``fused.plan.plan_for_budget``'s constants choose).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from fused.plan import PlanSizes, TilePlan, candidate_plans, plan_for_budget

TIMINGS_FILE_VARIABLE = "FUSED_PLAN_TIMINGS"
SWITCH_VARIABLE = "FUSED_MEASURED_PLANS"
# Epilogue plans are timed only when this is "1": on the H200 every one measured lost to the
# plans of cuBLAS and the row kernels (results/epilogue/), and timing them multiplies the cost
# of a first call. A device where a Triton product keeps up with cuBLAS may differ.
EPILOGUE_VARIABLE = "FUSED_EPILOGUE_PLANS"
# Candidates slower than this multiple of the fastest are timed once only.
SLOW = 1.5
# The fastest few candidates are timed twice more, against noise.
FINALISTS = 3


@dataclass(frozen=True)
class ProblemKind:
    """What a plan's speed depends on besides the plan (see the module's docstring)."""

    device: str
    dtypes: str
    hidden_dim: int
    vocab: int
    rows_bucket: int
    has_bias: bool
    pass_name: str

    def text(self) -> str:
        return f"{self.device}|{self.dtypes}|D={self.hidden_dim}|V={self.vocab}|N<={self.rows_bucket}|bias={self.has_bias}|{self.pass_name}"


def problem_kind(sizes: PlanSizes, device: torch.device, dtypes: tuple[torch.dtype, ...], pass_name: str) -> ProblemKind:
    """The kind of a problem of ``sizes`` on CUDA ``device``, with the tile loop's ``dtypes``
    and ``pass_name`` naming what the loop computes."""
    return ProblemKind(
        device=torch.cuda.get_device_name(device),
        dtypes=",".join(str(d).removeprefix("torch.") for d in dtypes),
        hidden_dim=sizes.hidden_dim,
        vocab=sizes.vocab,
        rows_bucket=triton.next_power_of_2(sizes.n_rows),
        has_bias=sizes.has_bias,
        pass_name=pass_name,
    )


# Suffix of an epilogue plan's name ("allx128256+epilogue").
EPILOGUE_SUFFIX = "+epilogue"


def _plan_text(plan: TilePlan, n_rows: int) -> str:
    return f"{'all' if plan.rows >= n_rows else plan.rows}x{plan.cols}{EPILOGUE_SUFFIX if plan.epilogue else ''}"


def _plan_from_text(text: str, n_rows: int) -> TilePlan:
    epilogue = text.endswith(EPILOGUE_SUFFIX)
    rows, cols = text.removesuffix(EPILOGUE_SUFFIX).split("x")
    return TilePlan(rows=n_rows if rows == "all" else min(int(rows), n_rows), cols=int(cols), epilogue=epilogue)


class PlanTimings:
    """Milliseconds of one pass per plan, for each kind; in memory, and in the JSON file
    ``path`` if given (read once, written after each new measurement)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.ms: dict[str, dict[str, float]] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.ms = json.load(f)

    def of(self, kind: ProblemKind, n_rows: int) -> dict[TilePlan, float]:
        return {_plan_from_text(text, n_rows): ms for text, ms in self.ms.get(kind.text(), {}).items()}

    def record(self, kind: ProblemKind, n_rows: int, timings: dict[TilePlan, float]) -> None:
        self.ms.setdefault(kind.text(), {}).update({_plan_text(p, n_rows): ms for p, ms in timings.items()})
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.ms, f, indent=1, sort_keys=True)


_timings: PlanTimings | None = None
# (kind, sizes, budget) -> plan: choosing costs a few hundred plan_bytes evaluations, host
# time every call would pay; emptied whenever a timing is recorded.
_chosen: dict[tuple[ProblemKind, PlanSizes, int], TilePlan] = {}


def plan_timings() -> PlanTimings:
    """The process's timings, read from ``$FUSED_PLAN_TIMINGS`` on first use."""
    global _timings
    path = os.environ.get(TIMINGS_FILE_VARIABLE)
    if _timings is None or _timings.path != path:
        _timings = PlanTimings(path)
        _chosen.clear()
    return _timings


def measuring(device: torch.device) -> bool:
    """Whether plans are measured for tensors on ``device``: on CUDA, unless switched off,
    and not while a CUDA graph is captured (the timing waits for the device)."""
    return (
        device.type == "cuda"
        and os.environ.get(SWITCH_VARIABLE, "1") != "0"
        and not torch.cuda.is_current_stream_capturing()
    )


def _elapsed_ms(run: Callable[[TilePlan], object], plan: TilePlan) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run(plan)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_plans(plans: list[TilePlan], run: Callable[[TilePlan], object]) -> dict[TilePlan, float]:
    """Milliseconds of ``run(plan)`` for each plan, the least of its timed runs (the work is
    the same every run; noise only adds): one warm-up run (Triton compiles, the allocator
    grows), a timed run, and a second round for those within ``SLOW`` of the fastest (in the
    same order, so that a clock still rising does not favour the last); the ``FINALISTS``
    fastest twice more."""
    ms = {}
    for plan in plans:
        run(plan)
        ms[plan] = _elapsed_ms(run, plan)
    for plan in [p for p in plans if ms[p] <= SLOW * min(ms.values())]:
        ms[plan] = min(ms[plan], _elapsed_ms(run, plan))
    for plan in sorted(ms, key=ms.get)[:FINALISTS]:
        ms[plan] = min(ms[plan], _elapsed_ms(run, plan), _elapsed_ms(run, plan))
    return ms


def measured_plan(
    sizes: PlanSizes, budget: int, kind: ProblemKind, run: Callable[[TilePlan], object], *, epilogue: bool = False
) -> TilePlan:
    """The fastest measured plan within ``budget`` bytes for a problem of ``sizes`` and
    ``kind``; ``run(plan)`` runs the pass with a plan, for timing the candidates not yet
    measured. The candidates are ``candidate_plans``; with ``epilogue`` (the pass can run
    epilogue plans) and ``$FUSED_EPILOGUE_PLANS=1``, also the epilogue plans of the
    ``FINALISTS`` fastest candidates' row counts, timed after them (an epilogue plan replaces
    the row kernels of a tile, so it can only win where the tile's rows already do well).
    Raises ``ValueError`` (``plan_for_budget``'s) if no plan fits."""
    timings = plan_timings()
    key = (kind, sizes, budget)
    if (plan := _chosen.get(key)) is not None:
        return plan
    candidates = candidate_plans(sizes, budget)
    if not candidates:
        plan_for_budget(sizes, budget)  # raises, naming the least memory that would do
    measured = timings.of(kind, sizes.n_rows)

    def time_untimed(plans: list[TilePlan]) -> None:
        if untimed := [p for p in plans if p not in measured]:
            new = time_plans(untimed, run)
            timings.record(kind, sizes.n_rows, new)
            measured.update(new)
            _chosen.clear()

    time_untimed(candidates)
    epilogue = epilogue and os.environ.get(EPILOGUE_VARIABLE) == "1"
    if epilogue:
        finalist_rows = {p.rows for p in sorted(candidates, key=measured.__getitem__)[:FINALISTS]}
        time_untimed([p for p in candidate_plans(sizes, budget, epilogue=True) if p.rows in finalist_rows])
    fitting = [p for p in measured if sizes.plan_bytes(p) <= budget and (epilogue or not p.epilogue)]
    # Ties go to the larger tile, then the fewer rows: a deterministic order.
    plan = min(fitting, key=lambda p: (measured[p], -p.rows * p.cols, p.rows))
    _chosen[key] = plan
    return plan
