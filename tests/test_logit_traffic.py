"""bench.logit_traffic against operations and kernels whose traffic is known (on the CPU, the
Triton kernel through the interpreter, see conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

from bench.logit_traffic import Pass, logit_passes
from fused.kernels.minimal_logsumexp import row_logsumexp

N, D, V = 12, 5, 64


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, dtype=dtype, requires_grad=True)
    return hidden, weight, torch.randint(V, (N,), generator=gen)


def test_eager_float32_cross_entropy_pass_by_pass():
    hidden, weight, labels = _inputs()
    passes = logit_passes(lambda: F.cross_entropy(hidden @ weight.t(), labels).backward(), V, D)
    logits, row = N * V * 4, N * 4
    assert passes == [
        Pass("mm", 0, logits),                      # the logits
        Pass("_log_softmax", logits, logits),
        Pass("nll_loss_forward", row, 0),           # one target entry a row
        Pass("nll_loss_backward", row, logits),     # a dense gradient, written whole
        Pass("_log_softmax_backward_data", 2 * logits, logits),
        Pass("mm", logits, 0),                      # the two gradient products read G
        Pass("mm", logits, 0),
    ]


def test_out_in_place_views_and_one_entry_a_row():
    z = torch.randn(N, V)
    out = torch.empty(N, V)
    index = torch.randint(V, (N, 1))

    def run():
        torch.mm(torch.randn(N, D), torch.randn(D, V), out=out)  # written only
        out.mul_(2.0)                                           # read and written
        out.t()                                                 # a view: nothing moves
        z.gather(1, index)                                      # one entry a row read
        z.scatter_add_(1, index, torch.ones(N, 1))              # one entry a row, in place
        z.exp()                                                 # read, and a new output written

    assert logit_passes(run, V, D) == [
        Pass("mm", 0, N * V * 4),
        Pass("mul_", N * V * 4, N * V * 4),
        Pass("gather", N * 4, 0),
        Pass("scatter_add_", N * 4, N * 4),
        Pass("exp", N * V * 4, N * V * 4),
    ]


def test_weight_sized_tensors_are_not_logits():
    _, weight, _ = _inputs()
    assert logit_passes(lambda: weight.detach() * 2, V, D) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_interpreted_kernel_counts_its_loads_and_stores(dtype):
    z = torch.randn(37, 1000).to(dtype)
    passes = logit_passes(lambda: row_logsumexp(z, block_rows=16, block_cols=128), 1000, 7)
    # Every element read once (the masks drop the block's overhang), one float32 lse a row written.
    assert passes == [Pass("row_logsumexp_kernel", 37 * 1000 * z.element_size(), 37 * 4)]


def test_the_torch_operations_of_a_launch_are_not_counted():
    # The interpreter wraps each argument's storage in a new tensor before the launch.
    z = torch.randn(8, V)
    passes = logit_passes(lambda: row_logsumexp(z), V, D)
    assert [p.op for p in passes] == ["row_logsumexp_kernel"]


def test_vocab_equal_to_hidden_dim_is_refused():
    with pytest.raises(ValueError, match="must differ"):
        logit_passes(lambda: None, 8, 8)
