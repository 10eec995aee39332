"""A patched tiny Llama sharded by FSDP2 (``fully_shard`` on each layer, optionally on
``lm_head`` alone, then on the model) on 2 gloo processes: ``patch_model`` applied before and
after ``fully_shard``, ``reshard_after_forward`` True and False. Each rank trains on a batch of
its own; the loss and every full gradient (``grad.full_tensor()``, after FSDP2's
reduce-scatter) equal the unpatched FSDP2 model's, and the fused loss really ran (the
report's counter), with no fallback warning.

Tolerances: those of tests/test_patch.py (rtol 1e-4, atol 1e-6, float32).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

from multiprocess import device, rank, run_ranks
from test_distributed_ddp import rank_batch, tiny_llama

RTOL, ATOL = 1e-4, 1e-6
LAYOUTS = {
    f"{order}, {'own lm_head unit' if own_head else 'lm_head in the root group'}, reshard_after_forward={reshard}": (
        order, own_head, reshard,
    )
    for order, own_head, reshard in itertools.product(("before", "after"), (False, True), (True, False))
}


def _shard(model, mesh, own_head: bool, reshard: bool):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    if own_head:
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=reshard)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def _step(model, batch) -> tuple:
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the stock loss fails the run
        loss = model(**batch).loss
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.full_tensor().cpu() for n, p in model.named_parameters()}


def _fsdp_runs(layouts: dict) -> dict:
    import fused
    from torch.distributed.device_mesh import init_device_mesh

    dev = device()
    mesh = init_device_mesh(dev.type, (torch.distributed.get_world_size(),))
    batch = {k: v.to(dev) for k, v in rank_batch(rank()).items()}
    base = tiny_llama().to(dev)
    out = {}
    for reshard in (True, False):
        out[("stock", reshard)] = _step(_shard(copy.deepcopy(base), mesh, False, reshard), batch)
    for name, (order, own_head, reshard) in layouts.items():
        model = copy.deepcopy(base)
        if order == "before":
            report = fused.patch_model(model)
            _shard(model, mesh, own_head, reshard)
        else:
            report = fused.patch_model(_shard(model, mesh, own_head, reshard))
        assert report.patched, f"{name}: {report.reason}"
        out[name] = (*_step(model, batch), fused.patch_report(model).calls.fused)
    return out


@pytest.fixture(scope="module")
def fsdp_results():
    return run_ranks(_fsdp_runs, 2, LAYOUTS)


@pytest.mark.parametrize("name", LAYOUTS)
def test_patched_fsdp2_model_has_the_stock_gradients(fsdp_results, name):
    reshard = LAYOUTS[name][2]
    for r, out in enumerate(fsdp_results):
        stock_loss, stock_grads = out[("stock", reshard)]
        loss, grads, fused_calls = out[name]
        assert fused_calls == 1, f"rank {r}: the fused loss did not run"
        torch.testing.assert_close(loss, stock_loss, rtol=RTOL, atol=ATOL, msg=f"rank {r}")
        assert grads.keys() == stock_grads.keys()
        for param, grad in stock_grads.items():
            torch.testing.assert_close(grads[param], grad, rtol=RTOL, atol=ATOL, msg=f"rank {r}: {param}")
    assert fsdp_results[0][name][0] != fsdp_results[1][name][0]  # the ranks trained on different batches
