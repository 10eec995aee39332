"""What every probe of a model instance does: run it with every module in eval mode and put
each module's mode back afterwards, and read the loss off whatever its forward returned."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (no dropout) inside the block; on exit each module
    gets back its own ``training`` flag (a model may hold modules in mixed modes)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def loss_of(output: Any) -> Tensor | None:
    """The loss of a model output: ``output.loss`` (or ``output['loss']``), or the first item of a
    ``return_dict=False`` tuple when it is a 0-d tensor (without labels the first item is the
    logits). None when the output carries no loss."""
    if isinstance(output, (tuple, list)):
        first = output[0] if output else None
        return first if isinstance(first, Tensor) and first.dim() == 0 else None
    return output.get("loss") if hasattr(output, "get") else getattr(output, "loss", None)
