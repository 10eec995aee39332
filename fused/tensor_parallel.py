"""The patched loss on a head parallelised over the vocabulary with torch's tensor-parallel API.

``parallelize_module(model, mesh, {"lm_head": ColwiseParallel(...)})`` (the layout of
transformers' own ``tp_plan`` for ``lm_head``) turns the head's weight into a ``Shard(0)``
DTensor: each process holds some rows of the vocabulary, and hooks on the head make its
input a replicated DTensor and its output either the gathered logits (``output_layouts=
Replicate()``) or each process's columns (``Shard(-1)``, the default), as a DTensor or, with
``use_local_output``, a plain tensor. The patched loss never asks for the logits: it hands
the head's input and its sharded weight to ``fused.linear_cross_entropy``, which combines
the shards' statistics across the processes (``fused.vocab_parallel``). Every process runs
the same tokens, as tensor parallelism requires, and each gets its own rows' weight
gradient and the full gradient of the head's input.

The stock forward computes the loss of the whole vocabulary only with gathered logits; with
each process's own columns (``Shard(-1)``) its loss is not the model's. So the patch is
checked against the unsharded model's computation: the stock forward and loss with the
head's output replaced by ``F.linear(input, weight.full_tensor(), bias.full_tensor())``
(``unsharded_head_forward``). Anything else sharded (a ``Shard(1)`` weight, a mesh of more
than one dimension, a bias not sharded like the weight) is refused with the reason.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

from fused.vocab_parallel import is_dtensor, placement_error


def is_tensor_parallel_head(head: nn.Module) -> bool:
    """Whether some parameter of ``head`` is a DTensor: tensor parallelism, unless FSDP2
    shards the head (its parameters are DTensors too; callers ask ``fused.fsdp`` first)."""
    return any(is_dtensor(p) for p in head.parameters())


def tensor_parallel_refusal(head: nn.Module) -> str | None:
    """Why the patched loss cannot serve the tensor-parallel ``head``, or None when it is a
    plain ``nn.Linear`` whose weight (and bias) are sharded over the vocabulary."""
    placements = {name: tuple(p.placements) for name, p in head.named_parameters() if is_dtensor(p)}
    layout = ", ".join(f"{name} {placement}" for name, placement in placements.items())
    if not isinstance(head, nn.Linear):
        return f"the head is a tensor-parallel {type(head).__name__} ({layout}); only an nn.Linear head is served"
    reason = placement_error(head.weight, None, None, head.bias)
    if reason is not None:
        return f"the head is parallelised over processes ({layout}), a layout the vocabulary-parallel loss refuses: {reason}"
    return None


def tensor_parallel_layout(head: nn.Module) -> str:
    """The report's ``layout`` line for a head ``tensor_parallel_refusal`` accepts."""
    weight = head.weight
    mesh = weight.device_mesh
    return (
        f"tensor parallel over the vocabulary (ColwiseParallel): weight {tuple(weight.shape)} placed Shard(0) on a "
        f"{mesh.device_type} mesh of {mesh.size()} processes, this one holding {weight.to_local().shape[0]} rows; "
        "the loss combines the shards' statistics by all-reduce (fused.vocab_parallel)"
    )


def unsharded_head_forward(head: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` with the output of the tensor-parallel ``head`` replaced by the logits of
    the unsharded head, ``F.linear(input, weight.full_tensor(), bias.full_tensor())``: the
    stock computation of the model whose head was never sharded. Gradients reach each
    process's rows of the weight (every process computes the same full gradient) and the
    head's input. ``input`` is what the model hands the head, read before the head's own
    hooks make it a DTensor."""

    def call(**inputs: Any) -> Any:
        seen: list[Tensor] = []

        def record(module: nn.Module, args: tuple) -> None:
            seen.append(args[0])

        def replace(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            bias = None if head.bias is None else head.bias.full_tensor()
            return F.linear(seen[-1], head.weight.full_tensor(), bias)

        handles = [head.register_forward_pre_hook(record, prepend=True), head.register_forward_hook(replace)]
        try:
            return forward(**inputs)
        finally:
            for handle in handles:
                handle.remove()

    return call
