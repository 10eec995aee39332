"""Run a function on several processes joined in one process group, bounded in time (named
so as not to shadow the ``multiprocess`` package that ``datasets`` imports).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes; each initialises
``torch.distributed`` (NCCL with one GPU per rank when there are enough GPUs, else gloo on
CPU with the GPUs hidden, so the same tests run unchanged on a multi-GPU machine), calls
``fn(*args)`` and sends back its result, or its traceback if it raised. The parent waits at
most ``deadline`` seconds (``FAILURE_GRACE`` once a rank has failed), kills what is still
running (only the processes it started) and raises an ``AssertionError`` naming each rank
that failed, hung or died. Every collective is bounded by the process group's ``timeout``,
well below the deadline, so a rank stuck in a collective fails with torch's own timeout
error rather than hanging the test run.

Inside ``fn``: ``rank()``, ``world()``, ``device()``, ``backend()`` and
``set_launcher_environment()``.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import traceback
from datetime import timedelta
from queue import Empty
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)
DEADLINE = 150.0
# After one rank fails, how long the others get before they are killed.
FAILURE_GRACE = 5.0


def backend_for(world_size: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def backend() -> str:
    return dist.get_backend()


def device() -> torch.device:
    return torch.device("cuda", rank()) if backend() == "nccl" else torch.device("cpu")


def set_launcher_environment() -> None:
    """Set the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``) in this rank's process, for libraries that read them (accelerate,
    transformers' ``DistributedConfig``); the process group itself is up already."""
    os.environ.update(RANK=str(rank()), WORLD_SIZE=str(world()), LOCAL_RANK=str(rank()), LOCAL_WORLD_SIZE=str(world()))


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(fn: Callable, rank_: int, world_size: int, backend_: str, init_file: str, results, args: tuple) -> None:
    if backend_ == "gloo":
        # A CPU rank, also where there are fewer GPUs than ranks: libraries that choose the
        # device themselves (transformers' DistributedConfig, accelerate) must choose the CPU,
        # and Triton kernels run in the interpreter as tests/conftest.py has them without CUDA
        # (read when fused is first imported, inside fn).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # the ranks share the CPU's cores; more threads only contend
    if backend_ == "nccl":
        torch.cuda.set_device(rank_)
    try:
        dist.init_process_group(
            backend_, init_method=f"file://{init_file}", rank=rank_, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
        )
        value = fn(*args)
        results.put((rank_, True, _to_bytes(value)))
    except BaseException:  # noqa: BLE001 (the parent reports it)
        results.put((rank_, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, deadline: float = DEADLINE) -> list[Any]:
    """``[fn(*args) on rank r for r in range(world_size)]``, each computed in its own process.
    ``fn`` and ``args`` must be picklable (``fn`` a module-level function)."""
    context = mp.get_context("spawn")
    backend_ = backend_for(world_size)
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        processes = [
            context.Process(target=_worker, args=(fn, r, world_size, backend_, init_file, results, args), daemon=True)
            for r in range(world_size)
        ]
        for process in processes:
            process.start()
        received: dict[int, tuple[bool, Any]] = {}
        end = time.monotonic() + deadline
        try:
            while len(received) < world_size and time.monotonic() < end:
                try:
                    r, ok, payload = results.get(timeout=1.0)
                    received[r] = (ok, payload)
                    if not ok:
                        # The others may be waiting for it in a collective: give them a moment
                        # to fail or finish on their own, not the whole collective timeout.
                        end = min(end, time.monotonic() + FAILURE_GRACE)
                except Empty:
                    dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in received]
                    if dead:
                        time.sleep(1.0)  # a result put just before exiting may still be in the pipe
                        while not results.empty():
                            r, ok, payload = results.get()
                            received[r] = (ok, payload)
                        if any(r not in received for r in dead):
                            break
        finally:
            for process in processes:
                process.join(timeout=max(0.0, min(10.0, end - time.monotonic())))
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5.0)
    problems = []
    for r, process in enumerate(processes):
        if r not in received:
            problems.append(f"rank {r}: no result (exit code {process.exitcode}; deadline {deadline:.0f} s)")
        elif not received[r][0]:
            problems.append(f"rank {r} raised:\n{received[r][1]}")
    if problems:
        raise AssertionError("\n".join(problems))
    return [torch.load(io.BytesIO(received[r][1]), weights_only=False) for r in range(world_size)]
