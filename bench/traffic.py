"""The arithmetic of the fused kernel's extra work over the three-matmul bound.

For a tile plan of whole-vocabulary row chunks (``rows`` tokens, every vocabulary entry),
the kernel does the bound's ``6 N D V`` FLOPs plus work the bound does not:

* ``weight_bytes``: each chunk after the first reads ``W`` twice more (for its logits and for
  ``G @ W``) and reads and writes ``grad_weight`` once (``beta = 1``): ``4 V D s`` bytes a
  chunk, ``s`` bytes an element. cuBLAS hides part of this behind the products' arithmetic.
* ``tile_bytes``: the one-launch row kernel reads every logit twice and writes its gradient
  once: ``3 N V s`` bytes, a pass the bound does not make at all.

Divided by the GPU's memory bandwidth these are lower bounds on the time they add when they
cannot overlap the products; ``H100_SXM`` holds the spec-sheet numbers of the benchmark GPU.

The row pass costs exponentials too: two per logit (the statistics, then the gradient). A
design without the row pass would form the gradient ``G`` from the logits inside the two
backward products, as each product loads it (``prologue_exponentials``). A product's program
covers ``block_d`` columns of ``D``, so every entry of ``G`` is then recomputed by
``ceil(D / block_d)`` programs in each of the two products: more exponentials than the row
pass by that factor, on units with a small fraction of the tensor cores' throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.problems import Shape

# NVIDIA H100 SXM5 80GB: dense bf16 tensor-core peak and HBM3 bandwidth, from the data sheet;
# exponentials per second of the special-function units: 132 SMs x 16 a clock (CUDA
# programming guide, compute capability 9.0) x 1.83 GHz, the 3.9 T/s FlashAttention-3 quotes.
H100_SXM = {"bf16_flops": 989e12, "bytes_per_s": 3.35e12, "exp_per_s": 3.9e12}


@dataclass(frozen=True)
class ChunkTraffic:
    """FLOPs and extra bytes of one whole-vocabulary plan (see the module docstring)."""

    chunks: int
    flops: int
    weight_bytes: int
    tile_bytes: int

    def seconds(self, gpu: dict[str, float] = H100_SXM) -> dict[str, float]:
        """Each term's time at the GPU's peak rates: the products, and each extra byte count."""
        return {
            "matmuls": self.flops / gpu["bf16_flops"],
            "weight": self.weight_bytes / gpu["bytes_per_s"],
            "tile": self.tile_bytes / gpu["bytes_per_s"],
        }


def whole_vocabulary_traffic(shape: Shape, rows: int, itemsize: int = 2) -> ChunkTraffic:
    """The work of ``shape`` in chunks of ``rows`` tokens over the whole vocabulary."""
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    chunks = math.ceil(n / rows)
    return ChunkTraffic(
        chunks=chunks,
        flops=shape.matmul_flops,
        weight_bytes=4 * (chunks - 1) * v * d * itemsize,
        tile_bytes=3 * n * v * itemsize,
    )


def row_pass_exponentials(shape: Shape) -> int:
    """Exponentials of the row pass: one per logit for the statistics, one for the gradient."""
    return 2 * shape.tokens * shape.vocab


def prologue_exponentials(shape: Shape, block_d: int) -> int:
    """Exponentials of a design with no row pass: one per logit for the statistics (in the
    logits product's epilogue), then each entry of ``G`` formed again by each of the
    ``ceil(D / block_d)`` programs that load it, in ``G @ W`` and in ``G.T @ H``."""
    if block_d <= 0:
        raise ValueError(f"block_d must be positive, got {block_d}")
    return shape.tokens * shape.vocab * (1 + 2 * math.ceil(shape.hidden / block_d))
