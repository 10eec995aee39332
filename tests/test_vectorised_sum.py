"""reference.vectorised_sum.lane_sum: a model of a vectorised float32 sum, exact to the bit."""

import pytest
import torch

from reference.vectorised_sum import lane_sum


def test_one_lane_is_a_running_total():
    values = torch.rand(37, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(())
    for v in values:
        total += v
    assert torch.equal(lane_sum(values, 1), total)


def test_lanes_group_the_additions():
    # Exactly representable sums agree for any lane count; rounding exposes the grouping.
    assert lane_sum(torch.arange(10.0), 4).item() == 45.0
    big, small = 2.0**24, 1.0
    values = torch.tensor([big, small, -big, small])
    assert lane_sum(values, 1).item() == 1.0  # (2^24 + 1) rounds to 2^24, then + 1
    assert lane_sum(values, 2).item() == 2.0  # lanes (2^24 - 2^24) and (1 + 1)


def test_a_leading_zero_can_change_the_bits():
    # The same numbers after one extra zero land in other lanes: with 16 lanes these round
    # differently (the case notebook 03 shows), while a running total cannot tell.
    gen = torch.Generator().manual_seed(2)
    values = torch.rand(48, generator=gen) * 6
    shifted = torch.cat([torch.zeros(1), values])
    assert torch.equal(lane_sum(values, 1), lane_sum(shifted, 1))
    assert any(not torch.equal(lane_sum(values, w), lane_sum(shifted, w)) for w in (8, 16, 32))


@pytest.mark.parametrize(
    "values, lanes, error",
    [(torch.rand(4).double(), 2, TypeError), (torch.rand(2, 2), 2, TypeError), (torch.rand(4), 0, ValueError),
     (torch.rand(4), True, ValueError)],
)
def test_bad_inputs(values, lanes, error):
    with pytest.raises(error):
        lane_sum(values, lanes)
