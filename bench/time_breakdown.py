"""Where one forward+backward's time goes: matrix products, the row kernels, the rest.

``python -m bench --parts profile`` times each method as the ``shapes`` part does, then
profiles one more run with ``torch.profiler`` and sums the time of what ran by kind:

* ``gemm``: the matrix products (cuBLAS/CUTLASS kernels on a GPU, ``aten::mm`` and its kin
  on a CPU);
* ``row_kernel``: the project's Triton kernels over rows of logits (``fused.kernels``);
* ``other``: everything else that ran (elementwise ops, reductions, copies, fills).

On a GPU these are device kernels, one stream, so they never overlap: the timed ``ms`` minus
their sum is time the GPU sat idle, waiting for the host (argument checks, host reads, kernel
launches). On a CPU they are the operators called from Python, which include the host's own
work, so no idle time can be told apart.

The profile says how long each kernel took, not why. For that, Nsight Compute on the GPU
machine, e.g. the first launch of the row kernel::

    ncu --kernel-name regex:logit_ --launch-count 1 --set full -o row \\
        python -m bench --parts profile --methods fused --budgets default \\
        --shapes 8192x2304x256000 --reps 1 --warmup 1
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from fused.kernels.logit_gradient import logit_gradient_kernel
from fused.kernels.logit_statistics import logit_statistics_kernel
from fused.kernels.logit_statistics_and_gradient import logit_statistics_and_gradient_kernel

# Each kind, and the record field that counts its kernels.
KINDS = {"gemm": "gemm_kernels", "row_kernel": "row_kernels", "other": "other_kernels"}
# Names of matrix-product kernels: cuBLAS (gemm, nvjet on Hopper), CUTLASS and its sm90
# variants, and the CPU operators.
_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|sm\d+_|^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$", re.IGNORECASE)
# A Triton kernel appears in a profile under its function's name.
_ROW_KERNELS = frozenset(
    k.fn.__name__ for k in (logit_statistics_kernel, logit_gradient_kernel, logit_statistics_and_gradient_kernel)
)


def kernel_kind(name: str) -> str:
    """Which of ``KINDS`` a kernel or operator belongs to, from its profiler name."""
    if name in _ROW_KERNELS:
        return "row_kernel"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def _top_level_operators(events: list[FunctionEvent]) -> list[FunctionEvent]:
    """The ``aten::`` operators not called by another one: each CPU op's time counted once."""

    def called_by_operator(e: FunctionEvent) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return [e for e in events if e.name.startswith("aten::") and not called_by_operator(e)]


def time_breakdown(run: Callable[[], Any], clear: Callable[[], None], device: torch.device) -> dict[str, float | int]:
    """Profile ``clear(); run()`` once (call it warm) and return, for each of ``KINDS``,
    ``<kind>_ms`` (summed milliseconds) and how many kernels (or operators) ran."""
    cuda = device.type == "cuda"
    clear()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize(device)
    events = list(prof.events())
    if cuda:
        timed = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        timed = _top_level_operators(events)
    out: dict[str, float | int] = {}
    for kind, count in KINDS.items():
        mine = [e for e in timed if kernel_kind(e.name) == kind]
        out[f"{kind}_ms"] = round(sum(e.time_range.elapsed_us() for e in mine) / 1e3, 4)
        out[count] = len(mine)
    return out
