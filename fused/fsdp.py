"""The patched loss on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a ``Shard(0)`` DTensor and gathers a module's parameters only
around that module's forward: its forward pre-hook all-gathers them (unshard) and registers
the reduce-scatter of their gradients to run once the gradient reaches the module's inputs;
its forward hook frees the gathered copy (with ``reshard_after_forward``) and registers a
re-gather for backward on the outputs. The head's weight therefore exists in full only
inside some forward:

- head in the model's own parameter group (``fully_shard(model)`` without a separate
  ``fully_shard(model.lm_head)``): it is gathered for the whole of the model's forward, where
  the patched loss runs, and nothing more is needed;
- head sharded on its own (``fully_shard(model.lm_head)``, or in a group with the final
  norm, ``fully_shard([model.model.norm, model.lm_head])``): gathered only while the head
  runs, and the model calls it (with no rows, ``fused.hf.capture``) before the loss is
  known. The loss is then computed as a second forward of the head, inside FSDP2's own
  pre- and post-forward hooks of that module (``run_in_fsdp_forward``): the same gather,
  free and gradient reduce-scatter FSDP2 does for any call of it, no full copy kept.

Outside a forward, ``patch_model``'s probe runs the model through ``nn.Module.__call__``
(``through_module_call``) so that the root's hooks gather what the forward needs.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

from fused.tensor_parallel import is_tensor_parallel_head, tensor_parallel_layout

_MISSING = object()


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (without importing FSDP: a module
    cannot be one unless FSDP2 is loaded)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def fsdp_gathers_head(model: nn.Module, head: nn.Module) -> bool:
    """Whether FSDP2 gathers the head's parameters around a forward this patch runs in: the
    head is sharded on its own, or in the model's group (the model is sharded)."""
    return is_fsdp_module(head) or is_fsdp_module(model)


def head_layout(model: nn.Module, head: nn.Module) -> str:
    """How the patched loss finds the head's weight, for the patch report."""
    if is_fsdp_module(head) and _sharded_in_group(head):
        return (
            "FSDP2, head sharded in a group with other modules (fully_shard([norm, lm_head]), transformers' plan): "
            "gathered for the loss, its gradient reduce-scattered with the group's"
        )
    if is_fsdp_module(head):
        return "FSDP2, head sharded on its own: gathered by its own forward hooks for the loss"
    if is_fsdp_module(model):
        return "FSDP2, head in the model's parameter group: gathered for the model's forward"
    if is_tensor_parallel_head(head):
        return tensor_parallel_layout(head)
    return "whole on this process (one process, or data parallel)"


def _sharded_in_group(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by one ``fully_shard([...])`` call with other modules."""
    return len(module._get_fsdp_state()._modules) > 1


def run_in_fsdp_forward(module: nn.Module, compute: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    """``compute(hidden)`` run as a forward of the FSDP2 module ``module``, inside its
    pre-forward (gather the parameters; ``hidden`` comes back wrapped so that its gradient
    triggers the parameters' gradient reduce-scatter) and post-forward (free the gathered
    parameters if ``reshard_after_forward``; the output re-gathers them for backward). Only
    FSDP2's hooks of the module run, not the other hooks on it (the patch's own capture). A
    module sharded in a group with others keeps the group's one reduce-scatter (below)."""
    state = module._get_fsdp_state()
    if _sharded_in_group(module):
        # Sharded in a group (``fully_shard([norm, lm_head])``, transformers' own plan): the
        # group's gradient reduce-scatter already waits at the input of its first module, which
        # the head's input comes from; a second one registered here would reduce-scatter and
        # free the group's parameters before that module's backward has used them. So the
        # group gathers as for another of its modules within one forward, which registers none.
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        for group in state._fsdp_param_groups:
            group._training_state = TrainingState.FORWARD
            group.pre_forward(module, (hidden,), {})
        return state._post_forward(module, (hidden,), compute(hidden))
    args, _ = state._pre_forward(module, (hidden,), {})
    output = compute(args[0])
    return state._post_forward(module, args, output)


def through_module_call(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` called through ``module.__call__``, so that the module's hooks (FSDP2's
    gather and free) run around it; ``module.forward`` is restored after each call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        previous = vars(module).get("forward", _MISSING)
        module.forward = forward
        try:
            return module(*args, **kwargs)
        finally:
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous

    return call
