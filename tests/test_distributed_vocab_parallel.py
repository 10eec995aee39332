"""The vocabulary-parallel loss (fused.vocab_parallel) on 2 and 3 processes against the
single-process contract (reference.linear_cross_entropy on the whole weight).

Each rank holds ``distribute_tensor(weight, mesh, [Shard(0)])`` of a vocabulary that the rank
count does not divide (torch's uneven shards; one layout leaves the last rank empty), the
same tokens and labels (with ignored ones, and layouts where only the first rank's shard
holds targets), and returns its loss, lse, the full hidden gradient and its own weight and
bias gradient shards; the parent concatenates the shards. All cases of one rank count run
in one process group (spawning costs seconds on a 2-core machine).

Tolerances: float64 inputs, float32 statistics as the contract computes them. The shard's
logits are columns of the same matmul; the sums over the vocabulary run per shard and then
across ranks, so losses and lse are held to ``forward_atols`` (4 float32 ulps of
``max|z| + log V`` per token) plus rtol 1e-6, gradients to rtol 1e-5 plus 1e-5 of the largest
entry (as the chunked reference's tests). Bad input must raise the same ``ValueError`` on
every rank, well within the collective timeout, and leave the group usable.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from loss_tolerances import forward_atols
from rank_processes import device, rank, run_ranks
from reference.linear_cross_entropy import linear_cross_entropy

IGNORE = -100
DIM = 8

CASES = {
    "plain": {},
    "bias": {"bias": True},
    "softcap_scale": {"softcap": 4.0, "logit_scale": 0.6},
    "label_smoothing_z_loss": {"label_smoothing": 0.2, "z_loss": 0.05, "bias": True},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "count_tensor_shift": {"num_items_in_batch": "tensor", "shift": True},
    "count_int": {"num_items_in_batch": 7},
    "targets_in_first_shard_only": {"labels": "first_shard"},
    "all_ignored_sum": {"labels": "ignored", "reduction": "sum"},
    "hidden_dtensor": {"hidden_dtensor": True, "label_smoothing": 0.1},
    "float32_chunked": {"dtype": torch.float32, "chunk_size": 5},
    "tiny_vocab_empty_rank": {"vocab": 2},
    # The Triton row kernels (under the interpreter on CPU), in float32 as the interpreter's
    # float32 is exact; float64 in the other cases runs them in float64 arithmetic.
    "kernels": {"backend": "triton", "dtype": torch.float32, "bias": True, "chunk_size": 7},
    "kernels_options": {"backend": "triton", "softcap": 4.0, "label_smoothing": 0.2, "z_loss": 0.05,
                        "reduction": "none"},
    "kernels_empty_rank": {"backend": "triton", "vocab": 2, "logit_scale": 0.6},
}
# Arguments of the fused op only: not passed to the contract.
FUSED_ONLY = ("chunk_size", "backend")


def make_case(case: dict):
    """Full float64 (or float32) ``hidden (2, 9, D)``, ``weight (V, D)``, ``bias``, ``labels``,
    and the loss options, from a case's description."""
    vocab = case.get("vocab", 13)
    gen = torch.Generator().manual_seed(0)
    dtype = case.get("dtype", torch.float64)
    hidden = torch.randn(2, 9, DIM, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, DIM, generator=gen, dtype=torch.float64) * 3 / DIM**0.5).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype) if case.get("bias") else None
    labels = torch.randint(0, vocab, (2, 9), generator=gen)
    labels[torch.rand(2, 9, generator=gen) < 0.25] = IGNORE
    if case.get("labels") == "first_shard":
        labels = torch.where(labels == IGNORE, IGNORE, labels % 2)
    if case.get("labels") == "ignored":
        labels = torch.full_like(labels, IGNORE)
    options = {k: v for k, v in case.items() if k not in ("bias", "vocab", "labels", "hidden_dtensor", "dtype")}
    if options.get("num_items_in_batch") == "tensor":
        options["num_items_in_batch"] = torch.tensor(11)
    return hidden, weight, bias, labels, options


def _gradients(loss, lse, inputs):
    upstream = loss.sum() + lse.sum()
    return torch.autograd.grad(upstream, [t for t in inputs if t is not None])


def _run_cases(cases: dict, with_bad_inputs: bool) -> dict:
    """On each rank: the vocabulary-parallel loss of every case, and its gradients; then,
    if asked, the bad inputs (``_bad_inputs``) in the same process group."""
    import fused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dev = device()
    mesh = init_device_mesh(dev.type, (torch.distributed.get_world_size(),))
    out = {}
    for name, case in cases.items():
        hidden, weight, bias, labels, options = make_case(case)
        hidden, labels = hidden.to(dev), labels.to(dev)
        weight = distribute_tensor(weight.to(dev), mesh, [Shard(0)]).requires_grad_()
        bias = None if bias is None else distribute_tensor(bias.to(dev), mesh, [Shard(0)]).requires_grad_()
        if case.get("hidden_dtensor"):
            hidden = DTensor.from_local(hidden, mesh, [Replicate()])
        hidden.requires_grad_()
        loss, lse = fused.linear_cross_entropy(hidden, weight, labels, bias=bias, return_lse=True, **options)
        grads = _gradients(loss, lse, (hidden, weight, bias))
        if isinstance(loss, DTensor):
            loss, lse = loss.to_local(), lse.to_local()
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        out[name] = [t.detach().cpu() for t in (loss, lse, *local)]
    if with_bad_inputs:
        out["bad inputs"] = _bad_inputs()
    return out


@pytest.fixture(scope="module")
def runs():
    """``runs(world_size)``: every rank's results, one process group per rank count for the
    whole module (spawning costs seconds on a 2-core machine; the 2-rank group also runs the
    bad inputs)."""

    @functools.cache
    def results(world_size: int) -> list[dict]:
        return run_ranks(_run_cases, world_size, CASES, world_size == 2)

    return results


@pytest.mark.parametrize("world_size", [2, 3], ids=["2 ranks", "3 ranks"])
@pytest.mark.parametrize("name", CASES)
def test_vocab_parallel_equals_the_contract(runs, world_size, name):
    per_rank = runs(world_size)
    hidden, weight, bias, labels, options = make_case(CASES[name])
    inputs = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    for knob in FUSED_ONLY:
        options.pop(knob, None)
    loss, lse = linear_cross_entropy(hidden, weight, labels, bias=bias, return_lse=True, **options)
    expected = _gradients(loss, lse, inputs)
    loss_atol, lse_atol = forward_atols(hidden, weight, bias, labels, options)
    for r, results in enumerate(per_rank):
        got_loss, got_lse, got_hidden = results[name][:3]
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-6, atol=loss_atol, equal_nan=True, msg=f"rank {r}")
        torch.testing.assert_close(got_lse, lse.detach(), rtol=1e-6, atol=lse_atol, msg=f"rank {r}")
        g = expected[0]
        torch.testing.assert_close(got_hidden, g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=f"rank {r}")
    for k, g in enumerate(expected[1:]):
        shards = [results[name][3 + k] for results in per_rank]
        if CASES[name].get("vocab") == 2 and world_size == 3:
            assert [s.shape[0] for s in shards] == [1, 1, 0]  # the layout this case is here for
        torch.testing.assert_close(torch.cat(shards), g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


# ---------------------------------------------------------------------------------------
# Bad input: the same clear error on every rank, no hang.


def _bad_inputs() -> dict:
    """On each rank, every bad call in turn, then a good one (the group must still work):
    the error each raised, or the good call's loss."""
    import fused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dev = device()
    mesh = init_device_mesh(dev.type, (torch.distributed.get_world_size(),))
    hidden, weight, _, labels, _ = make_case({})
    hidden, labels, weight = hidden.to(dev), labels.to(dev), weight.to(dev)
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    me = rank()

    def bad_label():
        bad = labels.clone()
        if me == 1:
            bad[0, 3] = 13
        return fused.linear_cross_entropy(hidden, sharded, bad)

    def unequal_hidden_size():
        # Rank 1's shard has a column more than the global shape says.
        local = sharded.to_local()
        if me == 1:
            local = torch.cat([local, local[:, :1]], dim=1)
        w = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=weight.shape, stride=weight.stride())
        return fused.linear_cross_entropy(hidden, w, labels)

    def hidden_of_another_width():
        h = torch.cat([hidden, hidden[..., :1]], dim=-1) if me == 0 else hidden
        return fused.linear_cross_entropy(h, sharded, labels)

    def wrong_dimension():
        return fused.linear_cross_entropy(hidden, distribute_tensor(weight, mesh, [Shard(1)]), labels)

    def labels_differ():
        return fused.linear_cross_entropy(hidden, sharded, torch.where(labels == 3, 4, labels) if me == 0 else labels)

    def hidden_differs():
        return fused.linear_cross_entropy(hidden + me, sharded, labels)

    out = {}
    for name, call in [
        ("bad_label", bad_label),
        ("unequal_hidden_size", unequal_hidden_size),
        ("hidden_of_another_width", hidden_of_another_width),
        ("wrong_dimension", wrong_dimension),
        ("labels_differ", labels_differ),
        ("hidden_differs", hidden_differs),
    ]:
        try:
            call()
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
    out["good_after"] = fused.linear_cross_entropy(hidden, sharded, labels).detach().cpu()
    return out


EXPECTED_ERRORS = {
    "bad_label": r"rank 1: ValueError: labels must lie in \[0, 13\) or equal ignore_index=-100; found 13",
    "unequal_hidden_size": (
        r"rank 1: ValueError: this rank's weight shard is \(6, 9\); Shard\(0\) of \(13, 8\) gives it \(6, 8\)"
    ),
    "hidden_of_another_width": r"rank 0: ValueError: weight must be \(V, D\) with D = hidden.shape\[-1\] = 9",
    "wrong_dimension": r"weight is a DTensor placed \(Shard\(dim=1\),\); the vocabulary-parallel loss needs Shard\(0\)",
    "labels_differ": r"the ranks of the weight's mesh disagree on labels, labels \(order\)",
    "hidden_differs": r"the ranks of the weight's mesh disagree on hidden states",
}


def test_bad_input_raises_on_every_rank_without_hanging(runs):
    per_rank = runs(2)
    hidden, weight, _, labels, _ = make_case({})
    for r, results in enumerate(per_rank):
        out = results["bad inputs"]
        for name, pattern in EXPECTED_ERRORS.items():
            assert out[name] is not None, f"rank {r}: {name} raised nothing"
            assert re.search(pattern, out[name]), f"rank {r}: {name}: {out[name]}"
        expected = linear_cross_entropy(hidden, weight, labels)
        torch.testing.assert_close(out["good_after"], expected, rtol=1e-6, atol=1e-5)
