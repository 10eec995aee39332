"""The one timing and memory measurement every benchmark entry goes through.

A workload is two callables: ``clear()`` drops what the previous run left (gradients) and is
not timed; ``run()`` is the timed work (a forward+backward, a training step, the three
matmuls of the bound). ``measure`` warms up, then times ``reps`` runs and takes the median. The first warm-up run
is timed on its own (wall clock, the device waited for): what a first call costs, including
compilation and the kernel's plan measurements.

Peak memory is the most the CUDA caching allocator held during the timed runs above what
was allocated just before them, after ``clear()``: the inputs and anything the caller keeps
are excluded, the gradients a run produces are included. On the CPU there is no allocator
to ask, so the peak is ``None`` and the times come from the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Median time of one run in milliseconds, peak bytes above the starting allocations
    (``None`` off CUDA), what the last timed ``run()`` returned, and the first warm-up run's
    milliseconds (``None`` without warm-up)."""

    ms: float
    peak_bytes: int | None
    last: Any
    first_ms: float | None = None


def measure(
    run: Callable[[], Any],
    clear: Callable[[], None],
    device: torch.device,
    *,
    reps: int,
    warmup: int,
) -> Timing:
    """Time ``run()`` ``reps`` times after ``warmup`` untimed runs, ``clear()`` before each.

    The state the last timed run leaves (for example ``.grad``) is kept for the caller.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    cuda = device.type == "cuda"
    first_ms = None
    for i in range(warmup):
        clear()
        if i == 0:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        run()
        if i == 0:
            if cuda:
                torch.cuda.synchronize(device)
            first_ms = (time.perf_counter() - t0) * 1e3
    clear()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, last = [], None
    for i in range(reps):
        if i:
            clear()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last = run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            last = run()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return Timing(ms=median(times), peak_bytes=peak, last=last, first_ms=first_ms)
