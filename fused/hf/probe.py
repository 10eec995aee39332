"""The patch-time probes: how a model wires head, transform and loss, and whether the fused
path reproduces it.

Two measurements on a tiny random batch, with every module in eval mode (no dropout),
under a forked RNG, without touching any parameter, buffer or ``.grad``:

1. ``observe_wiring``: one stock forward with chosen logits ``x`` in place of the head's
   output (``fused.hf.capture``). It tells whether the forward goes head -> loss once,
   which transform turns ``x`` into the logits the loss sees (``fused.hf.transform``),
   whether that transform depends on a trainable tensor (then it cannot be a constant of
   the kernel), and whether a ``num_items_in_batch`` given to the forward reaches the loss.
2. ``verify``: stock forward + backward against the patched one, with and without
   ``num_items_in_batch``: the loss, the gradient of the head's input and of every trainable
   parameter of the head. Those determine every other gradient: the rest of the graph is
   the model's own code in both runs and meets the loss only through the head's input.
   (The transform was already pinned down by step 1 on logits large enough to saturate a
   softcap, which a random-init model's tiny logits would never reveal.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fused.hf.capture import LOSS_FUNCTION, CaptureError, LossCall, Seams, plain
from fused.hf.config import config_leaves
from fused.hf.transform import LogitTransform, fit_transform, numeric_constants, probe_logits
from fused.vocab_parallel import is_dtensor
from reference.model_probing import evaluating, loss_of

PROBE_BATCH, PROBE_LENGTH = 2, 8
# A count no probe batch has, so seeing it in the loss call means the forward passed it on.
_SENTINEL_COUNT = 1234
# Largest error (relative to the reference's largest magnitude) accepted per dtype of the
# head weight. float32: the kernel sums in another order than torch's cross entropy; 16-bit:
# the kernel applies the transform in float32 where the model uses its own dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Gradients are compared relative to at least this fraction of the largest gradient.
GRADIENT_FLOOR = 1e-3


class ProbeRefusal(ValueError):
    """The probe found wiring the fused loss cannot reproduce; the message says what."""


@dataclass(frozen=True)
class Wiring:
    """What ``observe_wiring`` measured: which loss the forward calls (``fused.hf.capture``'s
    ``LOSS_FUNCTION`` or ``CROSS_ENTROPY``), the transform between head and loss, the head's
    output width, and whether ``num_items_in_batch`` given to the forward reaches the loss."""

    loss: str
    transform: LogitTransform
    head_vocab: int
    uses_num_items_in_batch: bool


@dataclass(frozen=True)
class Verification:
    """Stock against patched on the probe batch. Errors are ``relative_error``s (the loss) and
    ``gradient_errors`` (the head input's and the head parameters' gradients), the worst over
    ``cases``; ``gradients``: tensors compared per case; ``passed`` when both are within
    ``tolerance``."""

    passed: bool
    dtype: str
    tolerance: float
    loss_error: float
    grad_error: float
    cases: tuple[str, ...]
    gradients: int

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{verdict}: loss error {self.loss_error:.2e}, gradient error {self.grad_error:.2e} "
            f"({self.gradients} gradients; {', '.join(self.cases)}; {self.dtype}, tolerance {self.tolerance:g})"
        )


def relative_error(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """``max|actual - expected| / max(max|expected|, floor)`` in float64; NaN in both at one
    place counts as equal, anywhere else (or a shape mismatch) as ``inf``.

    ``floor`` keeps a tensor that is zero up to rounding (the gradient of an attention key
    bias, which softmax cancels exactly) from turning rounding noise into a large ratio:
    pass a small fraction of the scale of the tensors compared alongside it.
    """
    if actual.shape != expected.shape:
        return math.inf
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    both_nan = a.isnan() & e.isnan()
    diff = torch.where(both_nan, torch.zeros_like(a), a - e).abs()
    if diff.numel() == 0:
        return 0.0
    if bool(diff.isnan().any()):
        return math.inf
    scale = float(torch.where(both_nan, torch.zeros_like(e), e).abs().max())
    return float(diff.max()) / max(scale, floor, torch.finfo(torch.float32).tiny)


def gradient_errors(actual: list[Tensor | None], expected: list[Tensor | None]) -> float:
    """The worst ``relative_error`` over paired gradients (None where a tensor gets none), each
    floored at ``GRADIENT_FLOOR`` times the largest magnitude among all ``expected``."""
    if len(actual) != len(expected):
        return math.inf
    present = [float(e.detach().abs().max()) for e in expected if e is not None and e.numel()]
    floor = GRADIENT_FLOOR * max(present, default=0.0)
    worst = 0.0
    for a, e in zip(actual, expected):
        if (a is None) != (e is None):
            return math.inf
        if a is not None:
            worst = max(worst, relative_error(a, e, floor))
    return worst


@contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """Eval mode for every module (``reference.model_probing.evaluating``) and a forked RNG,
    both restored on exit."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), evaluating(model):
        yield


def _reserved_token_ids(config) -> set[int]:
    """Ids the config names (``*_token_id``, ``*_token_index``, ...): random text avoids them,
    since an image token without an image is an error in multimodal models."""
    reserved: set[int] = set()
    for path, value in config_leaves(config):
        if path.endswith(("_id", "_ids", "_index", "_idx")):
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, int) and not isinstance(item, bool):
                    reserved.add(item)
    return reserved


def probe_inputs(
    model: nn.Module, generator: torch.Generator, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH
) -> dict[str, Tensor]:
    """``{'input_ids': (batch, length) int64}`` on the model's device, drawn from the input
    vocabulary without the ids the config reserves."""
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    reserved = _reserved_token_ids(model.config)
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in reserved])
    if allowed.numel() == 0:
        raise ProbeRefusal("no token id is free of the config's special ids to build a probe batch")
    index = torch.randint(0, allowed.numel(), (batch, length), generator=generator)
    return {"input_ids": allowed[index].to(next(model.parameters()).device)}


def probe_labels(input_ids: Tensor, vocab: int, generator: torch.Generator) -> Tensor:
    """Labels shaped like ``input_ids`` in ``[0, vocab)``, with the first position of every row
    and one random other position ignored (-100)."""
    labels = torch.randint(0, vocab, input_ids.shape, generator=generator)
    labels[..., 0] = -100
    labels.view(-1)[int(torch.randint(1, labels.numel(), (1,), generator=generator))] = -100
    return labels.to(input_ids.device)


def _count_value(count: Any) -> float | None:
    if isinstance(count, Tensor) and count.numel() == 1:
        return float(count)
    return float(count) if isinstance(count, (int, float)) and not isinstance(count, bool) else None


def observe_wiring(
    model: nn.Module, seams: Seams, forward: Callable, inputs: dict[str, Any], generator: torch.Generator
) -> Wiring:
    """Probe 1 (see the module docstring). ``seams``: installed on ``model``; ``forward`` is the
    stock forward; ``inputs`` holds the model inputs and ``labels``. Raises ``ProbeRefusal``
    naming what does not fit."""
    seen: dict[str, Any] = {}

    def head_output(hidden: Tensor, vocab: int) -> Tensor:
        # The model may write into its logits in place (Chameleon masks columns): keep a copy.
        seen["x"] = probe_logits(tuple(hidden.shape[:-1]) + (vocab,), generator, hidden.device)
        return seen["x"].clone()

    def record_loss(call: LossCall, hidden: Tensor) -> Tensor:
        seen["call"] = call
        return torch.zeros((), device=hidden.device)

    def run(extra: dict[str, Any]) -> None:
        seen.clear()
        with seams.capturing(head_output, record_loss) as capture:
            forward(**inputs, **extra)
        capture.check_complete()

    count = torch.tensor(_SENTINEL_COUNT)
    try:
        try:
            run({"num_items_in_batch": count})
        except TypeError as error:
            if "num_items_in_batch" not in str(error):
                raise
            run({})
    except CaptureError as error:
        raise ProbeRefusal(f"the forward does not compute its loss as head -> loss once: {error}") from error
    except Exception as error:  # the model's own code failed on the probe batch
        raise ProbeRefusal(
            f"the stock forward failed on the probe batch ({type(error).__name__}: {error}); "
            "pass example_inputs= that this model accepts"
        ) from error

    call, x = seen["call"], seen["x"]
    y = plain(call.logits)
    if not isinstance(y, Tensor):
        raise ProbeRefusal(f"the loss received logits of type {type(y).__name__}")
    if y.requires_grad:
        raise ProbeRefusal("the logits reaching the loss depend on a trainable tensor besides the head's output")
    if call.kind == LOSS_FUNCTION:
        if call.arguments["vocab_size"] != y.shape[-1]:
            raise ProbeRefusal(
                f"the loss is told vocab_size={call.arguments['vocab_size']} for logits of width {y.shape[-1]}"
            )
        uses_count = _count_value(call.arguments["num_items_in_batch"]) == _SENTINEL_COUNT
    else:
        # cross_entropy(logits.view(-1, V), labels.view(-1)): compare row by row.
        if any(call.arguments[name] is not None for name in ("weight", "size_average", "reduce")):
            raise ProbeRefusal("cross_entropy is called with class weights or legacy reduction arguments")
        if y.dim() != 2 or y.shape[-1] != x.shape[-1] or y.numel() != x.numel():
            raise ProbeRefusal(
                f"cross_entropy gets logits of shape {tuple(y.shape)} from a head output of shape {tuple(x.shape)}"
            )
        x = x.reshape(y.shape)
        uses_count = False
    try:
        transform = fit_transform(x, y, numeric_constants(model.config))
    except ValueError as error:
        raise ProbeRefusal(str(error)) from error
    return Wiring(call.kind, transform, x.shape[-1], uses_count)


def _loss_and_grads(forward: Callable, head: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, list[Tensor | None]]:
    """The loss of ``forward(**inputs)`` and its gradients w.r.t. the head's input and the
    head's trainable parameters (by ``torch.autograd.grad``: no ``.grad`` is touched)."""
    seen: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]), prepend=True)
    try:
        loss = loss_of(forward(**inputs))
    finally:
        handle.remove()
    if loss is None or len(seen) != 1:
        raise ProbeRefusal(f"the forward returned no loss or called the head {len(seen)} times")
    targets = ([seen[0]] if seen[0].requires_grad else []) + [p for p in head.parameters() if p.requires_grad]
    if not targets or not loss.requires_grad:
        return loss.detach(), []
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    # A head sharded over processes: its gradients compared in full, so that every process
    # compares the same numbers and reaches the same verdict.
    return loss.detach(), [g.full_tensor() if is_dtensor(g) else g for g in grads]


def verify(
    stock: Callable, patched: Callable, head: nn.Module, inputs: dict[str, Any], count: Tensor | None
) -> Verification:
    """Probe 2 (see the module docstring): ``stock`` and ``patched`` are forwards called as
    ``f(**inputs)`` (``inputs`` with labels) and, when ``count`` is given, also with
    ``num_items_in_batch=count``."""
    dtype = next(head.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    cases = {"labels": {}}
    if count is not None:
        cases["labels + num_items_in_batch"] = {"num_items_in_batch": count}
    loss_error = grad_error = 0.0
    gradients = 0
    for extra in cases.values():
        stock_loss, stock_grads = _loss_and_grads(stock, head, {**inputs, **extra})
        patched_loss, patched_grads = _loss_and_grads(patched, head, {**inputs, **extra})
        loss_error = max(loss_error, relative_error(patched_loss, stock_loss))
        grad_error = max(grad_error, gradient_errors(patched_grads, stock_grads))
        gradients = sum(g is not None for g in stock_grads)
    passed = loss_error <= tolerance and grad_error <= tolerance
    dtype_name = str(dtype).removeprefix("torch.")
    return Verification(passed, dtype_name, tolerance, loss_error, grad_error, tuple(cases), gradients)
