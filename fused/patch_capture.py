"""Run a model's own forward with its head output and its loss call intercepted.

A transformers causal LM computes ``logits = lm_head(hidden)``, maybe transforms them, and
computes its loss from them. Everything before the head (the backbone, multimodal merging,
``logits_to_keep`` slicing) and after the loss (the MoE auxiliary loss, the output class,
``return_dict``) is the model's own code and stays so. Only two seams are cut, for one call:

- the head: a forward pre-hook records its input ``hidden`` and hands the head an empty
  batch (so no ``(N, V)`` logits are computed), a forward hook replaces the empty output by
  ``head_output(hidden, vocab)``;
- the loss, which models reach in one of two ways:
  ``model.loss_function(logits=..., labels=..., vocab_size=..., **kwargs)`` (the
  ``ForCausalLMLoss`` path of current models; transformers supports overriding it per
  instance), or ``torch.nn.functional.cross_entropy(logits.view(-1, V), labels.view(-1))``
  (older heads, through ``nn.CrossEntropyLoss``). The first is set on the instance; the
  second is wrapped for the duration of the forward and intercepts only calls whose input
  is a view of the head's output, passing every other call through. Either way the call
  is bound to the intercepted function's signature and handed to ``loss(call, hidden)``.

Hooks go through ``nn.Module.__call__``, so other hooks on the head (accelerate, PEFT)
still run. Anything but "head once, then loss once" raises ``CaptureError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

_MISSING = object()


LOSS_FUNCTION, CROSS_ENTROPY = "model.loss_function", "torch.nn.functional.cross_entropy"


class CaptureError(RuntimeError):
    """The forward did not go head -> loss exactly once, so the loss cannot be fused."""


@dataclass(frozen=True)
class LossCall:
    """One intercepted loss call: ``kind`` is ``LOSS_FUNCTION`` (arguments bound to
    ``ForCausalLMLoss``'s signature) or ``CROSS_ENTROPY`` (bound to ``F.cross_entropy``'s),
    defaults applied, extra keywords under ``'kwargs'``; ``logits`` is what the model passed
    as logits (``'logits'`` or ``'input'``)."""

    kind: str
    arguments: dict[str, Any]

    @property
    def logits(self) -> Any:
        return self.arguments["logits" if self.kind == LOSS_FUNCTION else "input"]


def stock_causal_lm_loss() -> Callable:
    """transformers' ``ForCausalLMLoss``: the loss the fused kernel reproduces."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def _root(tensor: Tensor) -> Tensor:
    """The tensor whose storage ``tensor`` views (itself if it is no view)."""
    return tensor if tensor._base is None else tensor._base


class HeadLossCapture:
    """Context manager intercepting ``head`` and the loss (see the module docstring) during
    one forward of ``model``.

    ``head_output(hidden, vocab) -> Tensor`` replaces the head's output, ``vocab`` being the
    head's output width; ``loss(call, hidden) -> Tensor`` replaces the loss, ``call`` a
    ``LossCall``. After the forward, ``hidden`` is the head's input, ``output`` what replaced
    the head's output, ``call`` the intercepted loss call and ``calls`` the order of events.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        head_output: Callable[[Tensor, int], Tensor],
        loss: Callable[[LossCall, Tensor], Tensor],
    ) -> None:
        self.model, self.head = model, head
        self._head_output, self._loss = head_output, loss
        self.hidden: Tensor | None = None
        self.output: Tensor | None = None
        self.call: LossCall | None = None
        self.calls: list[str] = []
        self._handles: list = []
        self._swapped: dict[str, Any] = {}
        self._cross_entropy: Callable | None = None

    def _before_head(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.calls.append("head")
        if len(self.calls) > 1:
            raise CaptureError(f"the head was called after {self.calls[:-1]}; expected it once, before the loss")
        hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(hidden, Tensor):
            raise CaptureError("the head was called without a tensor input")
        self.hidden = hidden
        empty = hidden.new_empty((0, hidden.shape[-1]))
        return ((empty,) + tuple(args[1:]), kwargs) if args else ((empty,), {})

    def _after_head(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise CaptureError(f"the head returned a {type(output).__name__}, not a tensor")
        self.output = self._head_output(self.hidden, output.shape[-1])
        return self.output

    def _intercept(self, kind: str, function: Callable, args: tuple, kwargs: dict) -> Tensor:
        self.calls.append("loss")
        if self.calls != ["head", "loss"]:
            raise CaptureError(f"the loss was called after {self.calls[:-1]}; expected after one head call")
        try:
            bound = inspect.signature(function).bind(*args, **kwargs)
        except TypeError as error:
            raise CaptureError(f"the call of {kind} does not fit its signature: {error}") from error
        bound.apply_defaults()
        self.call = LossCall(kind, dict(bound.arguments))
        return self._loss(self.call, self.hidden)

    def _loss_function_call(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._intercept(LOSS_FUNCTION, stock_causal_lm_loss(), args, kwargs)

    def _cross_entropy_call(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.output is None or not isinstance(input, Tensor) or _root(input) is not _root(self.output):
            return self._cross_entropy(input, *args, **kwargs)
        return self._intercept(CROSS_ENTROPY, self._cross_entropy, (input, *args), kwargs)

    def check_complete(self) -> None:
        """Raise ``CaptureError`` unless the forward called the head, then the loss, once each."""
        if self.calls != ["head", "loss"]:
            raise CaptureError(f"expected the head, then the loss, once each; saw {self.calls or 'neither'}")

    def __enter__(self) -> HeadLossCapture:
        self._handles = [
            self.head.register_forward_pre_hook(self._before_head, with_kwargs=True),
            self.head.register_forward_hook(self._after_head),
        ]
        # Whatever instance attribute the loss_function setter writes (transformers:
        # _loss_function) is found by identity and put back on exit.
        before = dict(vars(self.model))
        replacement = self._loss_function_call
        try:
            self.model.loss_function = replacement
        except AttributeError as error:
            self.__exit__(None, None, None)
            raise CaptureError(f"model.loss_function cannot be overridden on this model: {error}") from error
        self._swapped = {k: before.get(k, _MISSING) for k, v in vars(self.model).items() if v is replacement}
        if not self._swapped:
            self.__exit__(None, None, None)
            raise CaptureError("setting model.loss_function did not take effect on the instance")
        self._cross_entropy, F.cross_entropy = F.cross_entropy, self._cross_entropy_call
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, previous in self._swapped.items():
            if previous is _MISSING:
                vars(self.model).pop(name, None)
            else:
                vars(self.model)[name] = previous
        self._swapped = {}
        if self._cross_entropy is not None:
            F.cross_entropy, self._cross_entropy = self._cross_entropy, None
