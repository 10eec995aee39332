"""The multi-process harness itself (tests/rank_processes.py): a rank that raises while the
others wait for it in a collective fails the run quickly, with its traceback, instead of
hanging until the collective's timeout."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from rank_processes import COLLECTIVE_TIMEOUT, rank, run_ranks


def _rank_one_raises() -> None:
    if rank() == 1:
        raise RuntimeError("rank one gave up")
    dist.barrier()


def test_a_failing_rank_fails_the_run_quickly():
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_ranks(_rank_one_raises, 2)
    message = str(failure.value)
    assert "rank 1 raised" in message and "rank one gave up" in message
    assert "rank 0" in message  # killed while waiting, or failed by the barrier: either is named
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT.total_seconds()
