"""Epilogue plans against cuBLAS and the row kernels, on this GPU: ``python -m bench.epilogue``.

An epilogue plan (``fused.plan.TilePlan.epilogue``) computes each logits tile with a Triton
matmul that keeps the row statistics, or writes the gradient, in its epilogue
(``fused.kernels.logits_product``), saving the row kernels' reads of the tile. Whether that
pays depends on how close the Triton product comes to cuBLAS's. For each ``--shapes`` entry
this prints one JSON line with:

* ``pieces``: on the default plan's tile, the milliseconds of cuBLAS's product, of the
  one-launch row kernel that follows it, and of the Triton product with the statistics
  (storing the logits or not) and with the gradient in its epilogue;
* ``plans``: for the default plan and a ``--budget`` plan, the whole loss (forward and
  backward) with the plan's row kernels and as an epilogue plan: milliseconds, multiple of
  the three-matmul bound, extra memory, and the epilogue plan's gradients' relative
  difference from the row kernels' (``--dtype``, bfloat16 by default; peaked data).

With ``--out``, the lines also go to ``epilogue_<device>_<time>.json`` there, with the
machine and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import fused.ops
from bench.kernels import RunSettings, time_bound
from bench.measure import measure
from bench.problems import make_problem, parse_shape
from bench.records import ResultFile, device_slug
from fused import linear_cross_entropy
from fused.kernels.logit_statistics import RowStatistics
from fused.kernels.logit_statistics_and_gradient import write_statistics_and_gradient
from fused.kernels.logits_product import logit_gradient_tile, logits_with_statistics, partial_buffer
from fused.plan import PlanSizes, TilePlan, budget_bytes, plan_for_budget
from fused.tiles import logits_tile
from reference.linear_cross_entropy import LossOptions

MiB = 2**20


def _ms(run, device: torch.device, reps: int) -> float:
    return round(measure(run, lambda: None, device, reps=reps, warmup=3).ms, 4)


def time_pieces(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, plan: TilePlan, reps: int) -> dict[str, float]:
    """Milliseconds of each piece of one tile of ``plan``'s rows and columns (the first ones)."""
    device, options = hidden.device, LossOptions()
    rows, cols = slice(0, plan.rows), slice(0, plan.cols)
    h, tile = hidden[rows], torch.empty(plan.rows * plan.cols, dtype=hidden.dtype, device=device)
    stats = RowStatistics(hidden.shape[0], torch.float32, device, sum_logits=False)
    lse = torch.zeros(hidden.shape[0], device=device)
    partials = partial_buffer(plan.rows, plan.cols, torch.float32, device)
    logits = logits_tile(tile, h, weight, None, cols)

    def epilogue_statistics(store: bool):
        return lambda: logits_with_statistics(
            tile, h, weight, None, cols, labels, stats, rows, options, partials, store=store, skip_ignored=True
        )

    return {
        "cublas_product_ms": _ms(lambda: logits_tile(tile, h, weight, None, cols), device, reps),
        "row_kernel_statistics_and_gradient_ms": _ms(
            lambda: write_statistics_and_gradient(logits, labels, stats, lse, rows, options), device, reps
        ),
        "epilogue_statistics_ms": _ms(epilogue_statistics(True), device, reps),
        "epilogue_statistics_unstored_ms": _ms(epilogue_statistics(False), device, reps),
        "epilogue_gradient_ms": _ms(
            lambda: logit_gradient_tile(tile, h, weight, None, cols, labels, lse, None, None, rows, options), device, reps
        ),
    }


def time_plan(hidden, weight, labels, plan: TilePlan, reps: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The whole loss with ``plan`` handed to the op: its timing and its gradients."""

    def clear() -> None:
        hidden.grad = weight.grad = None

    def run() -> None:
        linear_cross_entropy(hidden, weight, labels, backend="triton").backward()

    with mock.patch.object(fused.ops, "_plan", lambda *args: plan):
        t = measure(run, clear, hidden.device, reps=reps, warmup=3)
    grads = [hidden.grad.float(), weight.grad.float()]
    extra = None if t.peak_bytes is None else (t.peak_bytes - (hidden.numel() + weight.numel()) * hidden.element_size())
    return {"ms": round(t.ms, 4), "extra_mib": None if extra is None else round(extra / MiB, 1)}, grads


def measure_shape(text: str, budget: int, reps: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The ``pieces`` and ``plans`` of shape ``text`` (module docstring) in ``dtype``."""
    shape = parse_shape(text)
    problem = make_problem(shape, "peaked", device=device, dtype=dtype)
    hidden, weight, labels = problem.hidden, problem.weight, problem.labels
    h, w = hidden.detach(), weight.detach()
    settings = RunSettings(device, dtype, reps=reps, warmup=3, stop_reason=lambda: None)
    bound_ms = time_bound(problem, settings)["ms"]
    sizes = PlanSizes(shape.tokens, shape.vocab, shape.hidden, dtype.itemsize)
    entry: dict[str, Any] = {"shape": text, "bound_ms": bound_ms}
    plans = {"default": plan_for_budget(sizes, budget_bytes(sizes, None)), f"{budget // MiB}MiB": plan_for_budget(sizes, budget)}
    entry["pieces"] = time_pieces(h, w, labels, plans["default"], reps)
    entry["plans"] = {}
    for name, plan in plans.items():
        rows_only, rows_grads = time_plan(hidden, weight, labels, plan, reps)
        epilogue, epilogue_grads = time_plan(hidden, weight, labels, dataclasses.replace(plan, epilogue=True), reps)
        for timing in (rows_only, epilogue):
            timing["vs_bound"] = round(timing["ms"] / bound_ms, 3)
        epilogue["grad_rel_diff"] = [round(((a - b).norm() / b.norm()).item(), 9) for a, b in zip(epilogue_grads, rows_grads)]
        entry["plans"][name] = {"tile": [plan.rows, plan.cols], "row_kernels": rows_only, "epilogue": epilogue}
    return entry


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8191x576x49152,8192x2048x128256,4096x4096x32000,16384x4096x151936")
    p.add_argument("--budget", default=30, type=int, help="the second plan's memory budget, MiB")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, help="folder for the JSON file")
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the kernels in the interpreter (tests)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        result = ResultFile(
            args.out / f"epilogue_{device_slug(device)}_{stamp}.json", part="epilogue", device=device,
            provenance="python -m bench.epilogue " + " ".join(argv if argv is not None else sys.argv[1:]),
            config=vars(args) | {"out": str(args.out)},
        )
    for text in args.shapes.split(","):
        entry = measure_shape(text, args.budget * MiB, args.reps, device, dtype)
        print(json.dumps(entry), flush=True)
        if result is not None:
            result.add(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if result is not None:
        result.finish()


if __name__ == "__main__":
    main()
