"""Forward+backward of linear + cross entropy at one shape: the bound, then every method.

Each entry becomes one record (a dict, JSON-ready). Times are medians in milliseconds and
``vs_bound`` divides them by the three-matmul bound timed in the same run; ``peak_mib`` is
the peak above the inputs (it includes the gradients), ``extra_mib`` the part of it above
the gradient buffers of hidden and weight; ``gh_rel``/``gw_rel`` are the relative L2 errors
of the gradients against the float32 truth (``bench.truth``). With ``RunSettings.profile``
each method's record also carries one profiled run's time by kind of kernel
(``bench.time_breakdown``) and the bound's time (``bound_ms``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.measure import measure
from bench.methods import Method, fused_methods
from bench.problems import Problem, Shape, make_problem
from bench.time_breakdown import time_breakdown
from bench.truth import Truth, float32_truth, relative_error

BOUND = "cublas_3mm_bound"
MIB = 1 << 20
Record = dict[str, Any]


@dataclass(frozen=True)
class RunSettings:
    """What every measurement of a run shares."""

    device: torch.device
    dtype: torch.dtype
    reps: int
    warmup: int
    # Returns the reason to skip further work (the time budget is spent), or None.
    stop_reason: Callable[[], str | None]
    # Profile one more run of each method (bench.time_breakdown).
    profile: bool = False
    # Run every method and the bound under torch.autocast to this dtype (mixed precision:
    # float32 inputs, products in the autocast dtype), or None.
    autocast: torch.dtype | None = None

    def precision(self) -> Any:
        """The context every timed call runs in: autocast when asked, else nothing."""
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)


def _free_memory(device: torch.device) -> None:
    """Return cached CUDA memory, after freeing what reference cycles (tracebacks) still hold."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class Refused(Exception):
    """A method declined the problem (a patcher that refuses a model), which is no error."""


def guarded(record: Record, work: Callable[[], Record], device: torch.device) -> Record:
    """``record`` updated by ``work()``; a refusal, an out-of-memory or any other error
    becomes its status ('refused', 'oom', 'error') with the reason."""
    try:
        record.update(status="ok", **work())
    except Refused as e:
        record.update(status="refused", reason=str(e)[:500])
    except torch.OutOfMemoryError as e:
        record.update(status="oom", reason=str(e).splitlines()[0][:300])
    except Exception as e:
        record.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
    _free_memory(device)
    return record


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / MIB, 1)


def time_bound(problem: Problem, settings: RunSettings) -> Record:
    """The three cuBLAS products of the loss (logits, grad_hidden, grad_weight): its bound."""
    hidden, weight = problem.hidden.detach(), problem.weight.detach()

    def three_matmuls() -> None:
        with settings.precision():
            logits = hidden @ weight.t()
            logits @ weight, logits.t() @ hidden

    t = measure(three_matmuls, lambda: None, settings.device, reps=settings.reps, warmup=settings.warmup)
    return {
        "ms": round(t.ms, 4),
        "tflops": round(problem.shape.matmul_flops / t.ms / 1e9, 1),
        "peak_mib": _mib(t.peak_bytes),
    }


def _time_method(method: Method, problem: Problem, truth: Truth | None, bound_ms: float | None, settings: RunSettings) -> Record:
    def forward_backward() -> torch.Tensor:
        with settings.precision():
            loss = method.fn(problem.hidden, problem.weight, problem.labels)
        loss.backward()
        return loss.detach()

    t = measure(forward_backward, problem.clear_grads, settings.device, reps=settings.reps, warmup=settings.warmup)
    grads = problem.shape.gradient_bytes(settings.dtype)
    out: Record = {
        "ms": round(t.ms, 4),
        "vs_bound": None if bound_ms is None else round(t.ms / bound_ms, 3),
        "peak_mib": _mib(t.peak_bytes),
        "extra_mib": None if t.peak_bytes is None else _mib(t.peak_bytes - grads),
        "first_call_ms": None if t.first_ms is None else round(t.first_ms, 1),
        "loss": float(t.last),
    }
    if truth is not None:
        out.update(
            loss_err=abs(float(t.last) - truth.loss.item()),
            gh_rel=float(f"{relative_error(problem.hidden.grad, truth.grad_hidden):.4g}"),
            gw_rel=float(f"{relative_error(problem.weight.grad, truth.grad_weight):.4g}"),
        )
    if settings.profile:
        out.update(bound_ms=bound_ms, **time_breakdown(forward_backward, problem.clear_grads, settings.device))
    problem.clear_grads()
    return out


def measure_shape(
    shape: Shape,
    data: str,
    methods: Sequence[Method],
    settings: RunSettings,
    *,
    budgets: Sequence[int | str] = (),
    chunk_sizes: Sequence[int | tuple[int, int]] = (),
    emit: Callable[[Record], None],
) -> None:
    """Measure the bound, ``methods`` and the fused kernel's memory settings at ``shape`` on
    ``data``; hand each record to ``emit`` as soon as it exists.

    ``budgets``/``chunk_sizes``: the fused kernel's settings, see
    ``bench.methods.fused_methods``; none given, the kernel is not measured.
    """
    base = {
        "bench": "profile" if settings.profile else "kernel",
        "shape": str(shape),
        "tokens": shape.tokens,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "data": data,
        "grad_mib": _mib(shape.gradient_bytes(settings.dtype)),
    }
    def give_up(status: str, reason: str) -> None:
        fused_names = ["fused"] if budgets or chunk_sizes else []
        for name in ["float32_truth", BOUND, *(m.name for m in methods), *fused_names]:
            emit({**base, "method": name, "status": status, "reason": reason})

    stop = settings.stop_reason()
    if stop is not None:
        give_up("skipped", stop)
        return
    try:
        problem = make_problem(shape, data, device=settings.device, dtype=settings.dtype)
    except torch.OutOfMemoryError as e:
        give_up("oom", "the inputs alone: " + str(e).splitlines()[0][:280])
        _free_memory(settings.device)
        return
    truth: Truth | None = None

    def compute_truth() -> Record:
        nonlocal truth
        truth = float32_truth(problem)
        return {"loss": truth.loss.item()}

    truth_record = guarded({**base, "method": "float32_truth"}, compute_truth, settings.device)
    emit(truth_record)
    bound = guarded({**base, "method": BOUND}, lambda: time_bound(problem, settings), settings.device)
    emit(bound)
    bound_ms = bound.get("ms")

    def run(method: Method) -> Record:
        record = {**base, "method": method.name, "params": method.params}
        if method.unavailable is not None:
            return {**record, "status": "unavailable", "reason": method.unavailable}
        stop = settings.stop_reason()
        if stop is not None:
            return {**record, "status": "skipped", "reason": stop}
        return guarded(record, lambda: _time_method(method, problem, truth, bound_ms, settings), settings.device)

    liger_extra: int | None = None
    for method in methods:
        record = run(method)
        emit(record)
        if method.name == "liger_flce" and record.get("extra_mib") is not None:
            liger_extra = int(record["extra_mib"] * MIB)
    fused = fused_methods(budgets, chunk_sizes, liger_extra_bytes=liger_extra)
    for method in fused:
        emit(run(method))
    del problem, truth
    _free_memory(settings.device)

