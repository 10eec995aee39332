"""The two seams the patcher cuts in a model's own forward: its head output and its loss call.

A transformers causal LM computes ``logits = lm_head(hidden)``, maybe transforms them, and
computes its loss from them. Everything before the head (the backbone, multimodal merging,
``logits_to_keep`` slicing) and after the loss (the MoE auxiliary loss, the output class,
``return_dict``) is the model's own code and stays so. ``Seams`` cuts two places:

- the head: a forward pre-hook records its input ``hidden`` and hands the head an empty
  batch (so no ``(N, V)`` logits are computed), a forward hook replaces the empty output by
  ``head_output(hidden, vocab)``;
- the loss, which models reach in one of two ways:
  ``loss_function(logits=..., labels=..., vocab_size=..., **kwargs)`` (the ``ForCausalLMLoss``
  path of current models; transformers supports overriding it per instance), set on the
  model and on every module between the model and its head that has one (Kosmos-2.5 computes
  its loss in ``text_model``); or ``torch.nn.functional.cross_entropy(logits.view(-1, V), ...)``
  (older heads, through ``nn.CrossEntropyLoss``), caught by the head's output itself: with
  ``cross_entropy=True`` it is a ``HeadOutput``, a tensor subclass whose results stay
  ``HeadOutput``s and whose ``cross_entropy`` is answered by the capture. Either way the call
  is bound to the intercepted function's signature and handed to ``loss(call, hidden)``.

The seams stay installed while a model is patched (hooks and attributes set once, so
``torch.compile`` traces a patched forward without registering anything) and do nothing
unless a capture is active on the calling thread: another thread, or an evaluation call,
sees the model's stock head and loss. Nothing outside the model instance changes. Hooks go
through ``nn.Module.__call__``, so other hooks on the head (accelerate, PEFT) still run.
Anything but "head once, then loss once" raises ``CaptureError``.
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from fused.vocab_parallel import is_dtensor

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


class HeadOutput(Tensor):
    """A head output that answers ``F.cross_entropy`` itself: every tensor computed from it is
    a ``HeadOutput`` of the same capture, and ``cross_entropy`` on one goes to that capture.
    Only code that touches the tensor dispatches here; nothing process-wide is swapped. The
    capture is held by a weak reference: the capture holds its output, and a cycle would keep
    the forward's graph alive until the garbage collector runs."""

    capture_ref: weakref.ref | None = None

    @property
    def capture(self) -> Capture | None:
        return self.capture_ref() if self.capture_ref is not None else None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tagged = (t.capture_ref for t in tree_flatten((args, kwargs))[0] if isinstance(t, HeadOutput))
        capture_ref = next((ref for ref in tagged if ref is not None), None)
        capture = capture_ref() if capture_ref is not None else None
        if func is F.cross_entropy and capture is not None:
            return capture.intercept(CROSS_ENTROPY, F.cross_entropy, args, kwargs)
        result = super().__torch_function__(func, types, args, kwargs)

        def tag(value: Any) -> Any:
            if isinstance(value, HeadOutput):
                value.capture_ref = capture_ref
            return value

        return tree_map(tag, result)


def loss_function_owners(model: nn.Module, head: nn.Module) -> list[nn.Module]:
    """``model`` and the modules between it and ``head`` that have a ``loss_function``: the
    places a forward may take its loss from."""
    path = next((name for name, module in model.named_modules() if module is head), None)
    owners = [model] if hasattr(model, "loss_function") else []
    if path:
        module = model
        for part in path.split(".")[:-1]:
            module = getattr(module, part)
            if hasattr(module, "loss_function"):
                owners.append(module)
    return owners


class Capture:
    """One forward's record at the seams: ``hidden`` the head's input, ``output`` what replaced
    the head's output, ``call`` the intercepted loss call, ``calls`` the order of events.
    ``head_output(hidden, vocab) -> Tensor`` replaces the head's output (``vocab`` the head's
    output width); ``loss(call, hidden) -> Tensor`` answers the loss call."""

    def __init__(
        self,
        head_output: Callable[[Tensor, int], Tensor],
        loss: Callable[[LossCall, Tensor], Tensor],
        cross_entropy: bool,
    ) -> None:
        self._head_output, self._loss, self._cross_entropy = head_output, loss, cross_entropy
        self.hidden: Tensor | None = None
        self.output: Tensor | None = None
        self.call: LossCall | None = None
        self.calls: list[str] = []

    def before_head(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.calls.append("head")
        if len(self.calls) > 1:
            raise CaptureError(f"the head was called after {self.calls[:-1]}; expected it once, before the loss")
        hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(hidden, Tensor):
            raise CaptureError("the head was called without a tensor input")
        self.hidden = hidden
        empty = hidden.new_empty((0, hidden.shape[-1]))
        return ((empty,) + tuple(args[1:]), kwargs) if args else ((empty,), {})

    def after_head(self, output: Tensor, vocab: int) -> Tensor:
        """The head's replacement output, ``vocab`` wide (the whole vocabulary's logits)."""
        if not isinstance(output, Tensor):
            raise CaptureError(f"the head returned a {type(output).__name__}, not a tensor")
        self.output = self._head_output(self.hidden, vocab)
        if self._cross_entropy:
            self.output = self.output.as_subclass(HeadOutput)
            self.output.capture_ref = weakref.ref(self)
        return self.output

    def intercept(self, kind: str, function: Callable, args: tuple, kwargs: dict) -> Tensor:
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

    def is_head_output(self, value: Any) -> bool:
        """Whether ``value`` is the head's replacement output or was computed from it."""
        if isinstance(value, HeadOutput):
            return value.capture is self
        return value is not None and (value is self.output or (self.call is not None and value is self.call.logits))

    def check_complete(self) -> None:
        """Raise ``CaptureError`` unless the forward called the head, then the loss, once each."""
        if self.calls != ["head", "loss"]:
            raise CaptureError(f"expected the head, then the loss, once each; saw {self.calls or 'neither'}")


class LossSeam:
    """What a loss owner's ``loss_function`` is while the seams are installed: the active
    capture's loss, or, idle, the loss function the owner had."""

    def __init__(self, seams: Seams, previous: Callable) -> None:
        self.seams, self.previous = seams, previous

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        capture = self.seams.active
        if capture is None:
            return self.previous(*args, **kwargs)
        return capture.intercept(LOSS_FUNCTION, stock_causal_lm_loss(), args, kwargs)


class Seams:
    """The head and loss seams of ``model`` (see the module docstring), installed on creation and
    taken out by ``remove``. ``capturing(...)`` activates a ``Capture`` on the calling thread for
    one forward; ``attach(head)`` moves the head's hooks to another module (PEFT wrapped the
    head after patching)."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.model = model
        self.head: nn.Module | None = None
        self._local = threading.local()
        self._handles: list = []
        self.loss_seams: list[tuple[nn.Module, LossSeam, dict[str, Any]]] = []
        try:
            for owner in loss_function_owners(model, head):
                self._install_loss_seam(owner)
            self.attach(head)
        except BaseException:
            self.remove()
            raise

    def _install_loss_seam(self, owner: nn.Module) -> None:
        seam = LossSeam(self, owner.loss_function)
        # Whatever instance attribute the loss_function setter writes (transformers:
        # _loss_function) is found by identity and put back by remove().
        before = dict(vars(owner))
        try:
            owner.loss_function = seam
        except AttributeError as error:
            raise CaptureError(f"loss_function cannot be overridden on {type(owner).__name__}: {error}") from error
        swapped = {k: before.get(k, _MISSING) for k, v in vars(owner).items() if v is seam}
        self.loss_seams.append((owner, seam, swapped))
        if not swapped:
            raise CaptureError(f"setting loss_function did not take effect on {type(owner).__name__}")

    def attach(self, head: nn.Module) -> None:
        # The model's own input must be what is recorded, and the replacement output what the
        # model sees: the pre-hook runs first and the hook last, around hooks that convert the
        # head's input and output (tensor parallelism's DTensor layouts), whenever those came.
        for handle in self._handles:
            handle.remove()
        self._handles = [
            head.register_forward_pre_hook(self._before_head, with_kwargs=True, prepend=True),
            head.register_forward_hook(self._after_head),
        ]
        self._after_head_id = self._handles[1].id
        self.head = head

    @property
    def active(self) -> Capture | None:
        return getattr(self._local, "capture", None)

    def _before_head(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        capture = self.active
        if capture is None:
            return None
        hooks = module._forward_hooks
        if next(reversed(hooks)) != self._after_head_id:  # a hook registered after the patch (parallelize_module's)
            hooks.move_to_end(self._after_head_id)
        return capture.before_head(args, kwargs)

    def _after_head(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        capture = self.active
        if capture is None:
            return None
        # A tensor-parallel head may return its own columns only (Shard(-1), local output).
        weight = getattr(module, "weight", None)
        return capture.after_head(output, weight.shape[0] if is_dtensor(weight) else output.shape[-1])

    @contextmanager
    def capturing(
        self,
        head_output: Callable[[Tensor, int], Tensor],
        loss: Callable[[LossCall, Tensor], Tensor],
        cross_entropy: bool = True,
    ) -> Iterator[Capture]:
        """A ``Capture`` active on this thread inside the block (``cross_entropy``: also catch
        ``F.cross_entropy`` on the head's output, which is then a ``HeadOutput``)."""
        if self.active is not None:
            raise CaptureError("the model's forward was entered again inside a captured forward")
        capture = Capture(head_output, loss, cross_entropy)
        self._local.capture = capture
        try:
            yield capture
        finally:
            self._local.capture = None

    @contextmanager
    def idle(self) -> Iterator[None]:
        """The stock head and loss inside the block, on this thread, even within a capture."""
        capture, self._local.capture = self.active, None
        try:
            yield
        finally:
            self._local.capture = capture

    def replaced_loss_function(self) -> str | None:
        """Which owner's ``loss_function`` was set to something else since installation, or None."""
        for owner, seam, _ in self.loss_seams:
            if owner.loss_function is not seam:
                return f"{type(owner).__name__}.loss_function"
        return None

    def remove(self) -> None:
        """Take every seam out: the head's hooks and each owner's ``loss_function`` as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.head = [], None
        for owner, _, swapped in self.loss_seams:
            for name, previous in swapped.items():
                if previous is _MISSING:
                    vars(owner).pop(name, None)
                else:
                    vars(owner)[name] = previous
        self.loss_seams = []

    def __deepcopy__(self, memo: dict) -> Seams:
        # A thread-local slot cannot be copied, and a copy has no capture under way.
        clone = Seams.__new__(Seams)
        memo[id(self)] = clone
        memo[id(_MISSING)] = _MISSING  # the marker of "no attribute before" must stay itself
        for name, value in vars(self).items():
            setattr(clone, name, threading.local() if name == "_local" else copy.deepcopy(value, memo))
        return clone


def plain(value: Any) -> Any:
    """``value`` as a plain ``torch.Tensor`` if it is a ``HeadOutput`` (autograd history kept),
    else itself."""
    return value.as_subclass(Tensor) if isinstance(value, HeadOutput) else value

