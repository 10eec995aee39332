"""A patched tiny Llama whose ``lm_head`` is parallelised over the vocabulary with torch's
tensor-parallel API (``parallelize_module(model, mesh, {"lm_head": ColwiseParallel(...)})``),
on 2 and 3 processes, with a vocabulary (67) that neither divides: torch's uneven
``Shard(0)`` rows. Every rank trains on the same batch, as tensor parallelism requires.

For each output layout users meet (``output_layouts`` ``Replicate()`` or ``Shard(-1)``, each
as a plain tensor or a DTensor; ``ColwiseParallel()`` is ``Shard(-1)``, plain) and for
``patch_model`` applied before ``parallelize_module``: the report says patched, verified and
which layout; one training step's loss, the gradient of every body parameter and each rank's
shard of the head's weight gradient equal the unsharded stock model's (its rows of the full
gradient); the fused loss really ran (the report's counter), with no fallback warning. A
head sharded on the hidden dimension (``RowwiseParallel``) is refused with the reason naming
its layout. The same holds for transformers' own tensor parallelism
(``from_pretrained(distributed_config=DistributedConfig(tp_size=N))``: the whole model sharded
by its ``tp_plan``, the head ``colwise_gather_output``), every gradient compared in full.

Tolerances: those of tests/test_patch.py (rtol 1e-4, atol 1e-6, float32): the fused loss
sums in another order than torch's cross entropy, and over the shards and then the ranks.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

from rank_processes import backend_for, device, rank, run_ranks, set_launcher_environment, world
from test_distributed_ddp import rank_batch, tiny_llama

RTOL, ATOL = 1e-4, 1e-6
VOCAB = 67  # divisible by neither 2 nor 3
# name: (ColwiseParallel's output_layouts, use_local_output, patch_model before or after parallelize_module)
LAYOUTS = {
    "Replicate() output, plain": ("replicate", True, "after"),
    "Replicate() output, DTensor": ("replicate", False, "after"),
    "Shard(-1) output, plain (ColwiseParallel())": ("shard", True, "after"),
    "Shard(-1) output, DTensor": ("shard", False, "after"),
    "Shard(-1) output, plain, patched before parallelize_module": ("shard", True, "before"),
}


def _step(model, batch) -> tuple:
    """Loss and ``{name: this rank's gradient}`` of one training step, a fallback failing it."""
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for n, p in model.named_parameters()}
    return loss.detach().cpu(), {n: g.detach().cpu() for n, g in grads.items()}


def _tensor_parallel_runs(layouts: dict, folder: str) -> dict:
    import fused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dev = device()
    mesh = init_device_mesh(dev.type, (world(),))
    batch = {k: v.to(dev) for k, v in rank_batch(0, VOCAB).items()}  # the same on every rank
    base = tiny_llama(VOCAB).to(dev)
    out = {"stock": _step(copy.deepcopy(base), batch)}
    for name, (output, local, order) in layouts.items():
        model = copy.deepcopy(base)
        style = ColwiseParallel(output_layouts=Replicate() if output == "replicate" else Shard(-1), use_local_output=local)
        if order == "after":
            report = fused.patch_model(parallelize_module(model, mesh, {"lm_head": style}))
        else:
            report = fused.patch_model(model)
            parallelize_module(model, mesh, {"lm_head": style})
        assert report.patched, f"{name}: {report.reason}"
        step = _step(model, batch)
        live = fused.patch_report(model)
        out[name] = (*step, live.calls.fused, live.calls.fallback, live.layout, report.verification.describe())
    rowwise = parallelize_module(copy.deepcopy(base), mesh, {"lm_head": RowwiseParallel(input_layouts=Replicate())})
    out["Shard(1) refusal"] = fused.patch_model(rowwise).reason
    out["transformers' tp_plan"] = _transformers_tensor_parallel(folder, batch)
    return out


def _transformers_tensor_parallel(folder: str, batch: dict) -> dict:
    """transformers' own tensor parallelism, ``from_pretrained(distributed_config=
    DistributedConfig(tp_size=world))``: its ``tp_plan`` shards the whole model (the head
    ``colwise_gather_output``, by a forward of its own rather than hooks). The patched model's
    loss and full gradients, and the unsharded stock model's."""
    import fused
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    set_launcher_environment()
    if rank() == 0:
        torch.manual_seed(0)
        # Heads and widths that 2 and 3 ranks divide; the vocabulary still 67.
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=6, max_position_embeddings=32,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
    torch.distributed.barrier()
    stock = LlamaForCausalLM.from_pretrained(folder).to(device())
    model = LlamaForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=world()))
    report = fused.patch_model(model)
    assert report.patched, report.reason
    out = {"stock": _step(stock, batch)}
    loss, _ = _step(model, batch)
    full = {n: p.grad.full_tensor().cpu() if hasattr(p.grad, "full_tensor") else p.grad.cpu() for n, p in model.named_parameters()}
    live = fused.patch_report(model)
    out["patched"] = (loss, full, live.calls.fused, live.calls.fallback, live.layout, report.verification.describe())
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(world_size)``: every rank's results, one process group per rank count."""

    @functools.cache
    def results(world_size: int) -> list[dict]:
        folder = str(tmp_path_factory.mktemp(f"tensor_parallel_{world_size}"))
        return run_ranks(_tensor_parallel_runs, world_size, LAYOUTS, folder)

    return results


@pytest.mark.parametrize("world_size", [2, 3], ids=["2 ranks", "3 ranks"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_patched_tensor_parallel_head_has_the_unsharded_gradients(runs, world_size, name):
    per_rank = runs(world_size)
    mesh_type = "cuda" if backend_for(world_size) == "nccl" else "cpu"
    offset = 0
    for r, out in enumerate(per_rank):
        stock_loss, stock_grads = out["stock"]
        loss, grads, fused_calls, fallbacks, layout, verification = out[name]
        assert (fused_calls, fallbacks) == (1, 0), f"rank {r}: the fused loss did not run"
        assert layout.startswith(
            f"tensor parallel over the vocabulary (ColwiseParallel): weight (67, 16) placed Shard(0) on a {mesh_type} "
            f"mesh of {world_size} processes, this one holding {grads['lm_head.weight'].shape[0]} rows"
        ), layout
        assert verification.startswith("passed") and "(2 gradients;" in verification, verification
        torch.testing.assert_close(loss, stock_loss, rtol=RTOL, atol=ATOL, msg=f"rank {r}")
        assert grads.keys() == stock_grads.keys()
        rows = grads["lm_head.weight"].shape[0]
        assert rows == -(-VOCAB // world_size) or r == world_size - 1, f"rank {r} holds {rows} rows"
        for param, grad in stock_grads.items():
            expected = grad[offset : offset + rows] if param == "lm_head.weight" else grad
            torch.testing.assert_close(grads[param], expected, rtol=RTOL, atol=ATOL, msg=f"rank {r}: {param}")
        offset += rows
    assert offset == VOCAB


@pytest.mark.parametrize("world_size", [2, 3], ids=["2 ranks", "3 ranks"])
def test_a_head_sharded_on_the_hidden_dimension_is_refused_with_its_layout(runs, world_size):
    for out in runs(world_size):
        assert out["Shard(1) refusal"].startswith(
            "the head is parallelised over processes (weight (Shard(dim=1),)), a layout the vocabulary-parallel loss "
            "refuses: weight is a DTensor placed (Shard(dim=1),); the vocabulary-parallel loss needs Shard(0)"
        ), out["Shard(1) refusal"]


@pytest.mark.parametrize("world_size", [2, 3], ids=["2 ranks", "3 ranks"])
def test_patched_model_under_transformers_tensor_parallelism_has_the_unsharded_gradients(runs, world_size):
    for r, out in enumerate(runs(world_size)):
        stock_loss, stock_grads = out["transformers' tp_plan"]["stock"]
        loss, grads, fused_calls, fallbacks, layout, verification = out["transformers' tp_plan"]["patched"]
        assert (fused_calls, fallbacks) == (1, 0), f"rank {r}: the fused loss did not run"
        assert layout.startswith("tensor parallel over the vocabulary (ColwiseParallel): weight (67, 24)"), layout
        assert verification.startswith("passed"), verification
        torch.testing.assert_close(loss, stock_loss, rtol=RTOL, atol=ATOL, msg=f"rank {r}")
        assert grads.keys() == stock_grads.keys()
        for param, grad in stock_grads.items():
            torch.testing.assert_close(grads[param], grad, rtol=RTOL, atol=ATOL, msg=f"rank {r}: {param}")
