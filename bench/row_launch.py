"""The row kernels' launch settings, timed on this GPU: ``python -m bench.row_launch``.

Each row kernel (``fused.kernels``) runs one program per row of a logits tile, reading the row
in blocks of ``BLOCK_V`` columns with ``num_warps`` warps; ``fused.kernels.launch`` picks both.
For a ``--rows`` x ``--cols`` bfloat16 tile this times every setting of the grid for the three
kernels as the tile loop calls them, and prints one JSON line per (kernel, setting): the median
of ``--reps`` in ms, and the bandwidth the kernel's own bytes would take at that time. Those
bytes per logit: the statistics pass reads the tile (2), the gradient pass reads and rewrites
it (2 + 2), the one-launch kernel does both (6; its second read of a row may come from L2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from fused.kernels import logit_gradient, logit_statistics, logit_statistics_and_gradient
from fused.kernels.logit_statistics import RowStatistics
from reference.linear_cross_entropy import LossOptions

BYTES_PER_LOGIT = {"statistics": 2, "gradient": 4, "statistics_and_gradient": 6}


def _time_ms(run, reset, reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # the first compiles
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=128256)
    p.add_argument("--blocks", default="512,1024,2048,4096,8192", help="BLOCK_V values")
    p.add_argument("--warps", default="4,8,16", help="num_warps values")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    rows, cols = args.rows, args.cols
    source = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 3
    tile = torch.empty_like(source)
    targets = torch.randint(0, cols, (rows,), device=device)
    options = LossOptions()
    lse = torch.empty(rows, device=device)
    everything = slice(0, rows)
    stats = RowStatistics(rows, torch.float32, device, sum_logits=False)
    stats_fresh = RowStatistics(rows, torch.float32, device, sum_logits=False)

    def reset() -> None:
        tile.copy_(source)
        for name in ("max", "sumexp", "target_logit"):
            getattr(stats, name).copy_(getattr(stats_fresh, name))

    logit_statistics.accumulate_logit_statistics(source, 0, targets, stats, everything, options)
    torch.log(stats.sumexp, out=lse).add_(stats.max)  # the gradient pass's lse
    runs = {
        "statistics": (logit_statistics, lambda: logit_statistics.accumulate_logit_statistics(
            tile, 0, targets, stats, everything, options)),
        "gradient": (logit_gradient, lambda: logit_gradient.write_logit_gradient(
            tile, 0, targets, lse, None, None, everything, cols, options)),
        "statistics_and_gradient": (logit_statistics_and_gradient, lambda: (
            logit_statistics_and_gradient.write_statistics_and_gradient(tile, targets, stats, lse, everything, options))),
    }
    grid = itertools.product(map(int, args.blocks.split(",")), map(int, args.warps.split(",")))
    for block, warps in grid:
        setting = {"BLOCK_V": block, "num_warps": warps}
        for name, (module, run) in runs.items():
            chosen = module.row_kernel_launch
            module.row_kernel_launch = lambda n_cols: setting
            try:
                ms = _time_ms(run, reset, args.reps)
            finally:
                module.row_kernel_launch = chosen
            gbps = BYTES_PER_LOGIT[name] * rows * cols / ms / 1e6
            print(json.dumps({"kernel": name, "rows": rows, "cols": cols, **setting, "ms": round(ms, 4),
                              "GB/s": round(gbps), "default": chosen(cols) == setting}), flush=True)


if __name__ == "__main__":
    main()
