"""How a vectorised loop adds float32 numbers, and why the grouping shows in the last bit.

A CPU kernel that sums a long row keeps one running total per lane of its vector registers
(8 float32 lanes with AVX2, 16 with AVX-512) and adds the lanes at the end. Float addition
is not associative, so the same numbers summed with another lane count, or shifted by one
position (an extra zero in front changes no value but moves every later number to another
lane), can round differently. ``lane_sum`` is that loop written with single float32
additions only, so it gives the same bits on every machine: notebook 03 uses it to show why
two ways of writing the causal-LM loss can differ by an ulp on one CPU and not on another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lane_sum(values: Tensor, lanes: int) -> Tensor:
    """Sum of the 1-d float32 ``values`` as a loop over ``lanes``-wide vectors adds them.

    Element ``i`` goes to lane ``i % lanes`` (the tail padded with zeros), each lane keeps a
    running float32 total, and the lanes are added in order at the end. ``lanes=1`` is a
    plain running total. Returns a 0-d float32 tensor.
    """
    if not isinstance(values, Tensor) or values.dim() != 1 or values.dtype != torch.float32:
        raise TypeError("values must be a 1-d float32 tensor")
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes must be a positive int, got {lanes!r}")
    rows = F.pad(values, (0, -len(values) % lanes)).view(-1, lanes)
    totals = torch.zeros(lanes)
    for row in rows:
        totals += row  # one float32 addition per lane
    total = torch.zeros(())
    for lane in totals:
        total += lane
    return total
