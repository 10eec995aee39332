"""The peak memory a callable makes torch allocate, measured rather than estimated.

On CUDA torch's caching allocator keeps a peak counter (``torch.cuda.max_memory_allocated``).
Its CPU allocator keeps none, and the process's resident set size (``ru_maxrss``) mixes in
the interpreter, the libraries and the C allocator's reuse of freed pages. What does see
every CPU tensor is the profiler: with ``profile_memory=True`` torch reports each
allocation and each free of a block to it, with its address and size. Replaying those
events in time order gives the bytes alive after each one; their maximum is the peak.
The events are read from the profiler's event tree, a private interface that torch's own
memory timeline (``torch.profiler._memory_profiler``) reads too; the tests check the
figures against allocations of known size.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch._C._profiler import _EventType


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    # Kineto prints a line to stderr as each profile starts and stops; level 6 silences
    # them. It reads the variable when first used, so this works unless a profile already ran.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.autograd.profiler.profile(use_kineto=True, profile_memory=True) as prof:
        fn()
    events = []
    pending = list(prof.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    # Only blocks allocated inside fn count, so the figure does not depend on what the
    # caller allocated (or freed) before: a free of an older block is not fn's saving.
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size in sorted(events, key=lambda event: event[0]):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory alive at once on ``device`` while ``fn()`` runs, beyond
    what was allocated before it started. ``fn``'s return value is discarded.

    CPU: from the profiler's allocation events, counting only blocks ``fn`` allocated itself
    (a block it frees that was allocated earlier does not lower the figure, and torch logs a
    warning about it). Tensors only: not Python objects, not the C allocator's overhead. The
    profiler slows ``fn`` down, so time it separately.
    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the bytes
    allocated at the start (there, frees of older tensors do count).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    raise ValueError(f"device must be a CPU or CUDA device, got {device}")
