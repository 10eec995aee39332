"""A patched tiny Llama sharded by FSDP2 (``fully_shard`` on each layer, optionally on
``lm_head`` alone or on ``[norm, lm_head]`` together as transformers' own FSDP plan does, then
on the model) on 2 gloo processes: ``patch_model`` applied before and after ``fully_shard``,
``reshard_after_forward`` True and False. Each rank trains on a batch of
its own; the loss and every full gradient (``grad.full_tensor()``, after FSDP2's
reduce-scatter) equal the unpatched FSDP2 model's, and the fused loss really ran (the
report's counter), with no fallback warning.

Two more layouts run FSDP2's mixed precision (bfloat16 parameters, float32 gradient
reduction), where the stock model and the fused loss round their bfloat16 logits and logit
gradients in different places.

Tolerances: float32, those of tests/test_patch.py (rtol 1e-4, atol 1e-6). Mixed precision:
the same loss (both compute float32 statistics of the same bfloat16 logits), gradients within
one bfloat16 epsilon (2**-7) of each gradient's largest entry (measured: 3.5e-3).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

from rank_processes import device, rank, run_ranks
from test_distributed_ddp import rank_batch, tiny_llama

RTOL, ATOL = 1e-4, 1e-6
BF16_EPS = 2**-7
# name: (patch_model before or after fully_shard, lm_head's unit, reshard_after_forward, mixed precision)
# lm_head's unit: "root" (the model's parameter group), "own" (fully_shard(lm_head)) or "with norm"
# (fully_shard([norm, lm_head]), what transformers' own FSDP plan does with reshard_after_forward=False)
UNIT_NAMES = {"root": "lm_head in the root group", "own": "own lm_head unit", "with norm": "lm_head grouped with the norm"}
LAYOUTS = {
    f"{order}, {UNIT_NAMES[unit]}, reshard_after_forward={reshard}": (order, unit, reshard, False)
    for order, unit, reshard in itertools.product(("before", "after"), ("root", "own", "with norm"), (True, False))
}
LAYOUTS["before, lm_head in the root group, bf16 mixed precision"] = ("before", "root", True, True)
LAYOUTS["after, own lm_head unit, bf16 mixed precision"] = ("after", "own", True, True)
LAYOUT_LINES = {
    "root": "FSDP2, head in the model's",
    "own": "FSDP2, head sharded on its own",
    "with norm": "FSDP2, head sharded in a group with other modules",
}


def _shard(model, mesh, unit: str, reshard: bool, mixed: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    options = dict(mesh=mesh, reshard_after_forward=reshard, **({"mp_policy": policy} if mixed else {}))
    for layer in model.model.layers:
        fully_shard(layer, **options)
    if unit == "own":
        fully_shard(model.lm_head, **options)
    if unit == "with norm":
        fully_shard([model.model.norm, model.lm_head], **options)
    return fully_shard(model, **options)


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
    for reshard, mixed in ((True, False), (False, False), (True, True)):
        out[("stock", reshard, mixed)] = _step(_shard(copy.deepcopy(base), mesh, "root", reshard, mixed), batch)
    for name, (order, unit, reshard, mixed) in layouts.items():
        model = copy.deepcopy(base)
        if order == "before":
            report = fused.patch_model(model)
            _shard(model, mesh, unit, reshard, mixed)
        else:
            report = fused.patch_model(_shard(model, mesh, unit, reshard, mixed))
        assert report.patched, f"{name}: {report.reason}"
        out[name] = (*_step(model, batch), fused.patch_report(model).calls.fused, fused.patch_report(model).layout)
    return out


@pytest.fixture(scope="module")
def fsdp_results():
    return run_ranks(_fsdp_runs, 2, LAYOUTS)


@pytest.mark.parametrize("name", LAYOUTS)
def test_patched_fsdp2_model_has_the_stock_gradients(fsdp_results, name):
    _, _, reshard, mixed = LAYOUTS[name]
    for r, out in enumerate(fsdp_results):
        stock_loss, stock_grads = out[("stock", reshard, mixed)]
        loss, grads, fused_calls, layout = out[name]
        assert fused_calls == 1, f"rank {r}: the fused loss did not run"
        assert layout.startswith(LAYOUT_LINES[LAYOUTS[name][1]]), layout
        torch.testing.assert_close(loss, stock_loss, rtol=RTOL, atol=ATOL, msg=f"rank {r}")
        assert grads.keys() == stock_grads.keys()
        for param, grad in stock_grads.items():
            rtol, atol = (0.0, BF16_EPS * grad.abs().max().item()) if mixed else (RTOL, ATOL)
            torch.testing.assert_close(grads[param], grad, rtol=rtol, atol=atol, msg=f"rank {r}: {param}")
    assert fsdp_results[0][name][0] != fsdp_results[1][name][0]  # the ranks trained on different batches
