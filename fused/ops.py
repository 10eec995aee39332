"""The fused loss as ``torch.library`` custom ops, with their fakes and autograd, and one
argument schema (``LossInputs``) that every one of them reads.

Two ops: ``fused::linear_cross_entropy`` (the forward: loss, lse, and for a scalar loss its
gradients, computed in the same walk over the tiles) and
``fused::linear_cross_entropy_backward`` (the recomputation, for ``reduction='none'`` or a
returned lse). Under ``torch.compile`` each is one graph node. Eager calls on plain tensors
run the same functions through a ``torch.autograd.Function`` (``_EagerForward``), without
the dispatcher's host time.

Autograd: a scalar loss's gradients become ``.grad`` without a copy, scaled in place by the
upstream gradient (not at all when it is 1, decided on the device: the host never waits);
a second backward through a retained graph raises if an earlier one's was not 1. No double
backward. The compiled backward scales out of place, holding the gradients twice for a
moment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional, get_type_hints

import torch
from torch import Tensor

from fused.kernels.upstream_scale import scale_unless_one
from fused.measured_plan import measured_plan, measuring, problem_kind
from fused.plan import PlanSizes, TilePlan, budget_bytes, tile_plan
from fused.problem import TileProblem, tile_problem
from fused.tiles import TileDtypes, run_tiles
from reference.linear_cross_entropy import LossOptions, reduce_losses


class LossInputs(NamedTuple):
    """The forward op's inputs, in its schema's order (the schema is built from these
    annotations). The backward op takes them too, followed by ``Upstream``."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor
    bias: Optional[Tensor]
    num_items: Optional[Tensor]  # num_items_in_batch given as a tensor
    num_items_value: Optional[float]  # ... or as a Python number
    ignore_index: int
    shift: bool
    reduction: str
    label_smoothing: float
    softcap: Optional[float]
    logit_scale: Optional[float]
    z_loss: float
    chunk_size: Optional[int]
    vocab_chunk_size: Optional[int]
    memory_budget: Optional[int]
    compute_dtype: torch.dtype
    logits_dtype: Optional[torch.dtype]  # None: the inputs' dtype, as transformers
    accumulation_dtype: Optional[torch.dtype]  # grad_weight's sum over row chunks; None: the inputs'
    # Forward: compute these gradients now (a scalar loss only). Backward: these are wanted.
    grad_hidden: bool
    grad_weight: bool
    grad_bias: bool

    def options(self) -> LossOptions:
        return LossOptions(
            self.ignore_index, self.reduction, self.label_smoothing, self.softcap, self.logit_scale, self.z_loss
        )

    def count(self) -> Tensor | float | None:
        """``num_items_in_batch`` as the caller gave it: a tensor, a Python number or None."""
        return self.num_items if self.num_items is not None else self.num_items_value

    def wanted(self) -> tuple[bool, bool, bool]:
        return self.grad_hidden, self.grad_weight, self.grad_bias

    def problem(self) -> TileProblem:
        return tile_problem(
            self.hidden, self.weight, self.labels, self.bias, self.options(), shift=self.shift,
            num_items_in_batch=self.count(),
        )


class Upstream(NamedTuple):
    """The backward op's inputs after ``LossInputs``: the forward's ``lse`` (shaped like the
    labels) and the upstream gradients of the loss (shaped like it) and of the lse, or None."""

    lse: Tensor
    loss_grad: Optional[Tensor]
    lse_grad: Optional[Tensor]


_SCHEMA_TYPES = {
    Tensor: "Tensor", Optional[Tensor]: "Tensor?", int: "int", Optional[int]: "int?", float: "float",
    Optional[float]: "float?", bool: "bool", str: "str", torch.dtype: "ScalarType",
    Optional[torch.dtype]: "ScalarType?",
}
_GRADIENTS = ("hidden", "weight", "bias")
_GRAD_POSITIONS = tuple(LossInputs._fields.index(name) for name in _GRADIENTS)


def _schema(*parts: type[tuple], returns: str) -> str:
    hints = [(name, kind) for part in parts for name, kind in get_type_hints(part).items()]
    return "(" + ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in hints) + ") -> " + returns


def _empty_unless(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op returns tensors: an ungiven gradient becomes an empty one."""
    return t if t is not None else like.new_empty(0)


def _gradients_out(out, inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    grad_hidden = None if out.hidden is None else out.hidden.view(inputs.hidden.shape)
    return tuple(_empty_unless(g, inputs.hidden) for g in (grad_hidden, out.weight, out.bias))


def _gradients_fake(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    hidden = inputs.hidden
    return (
        hidden.new_empty(hidden.shape if inputs.grad_hidden else (0,)),
        hidden.new_empty(inputs.weight.shape if inputs.grad_weight else (0,)),
        inputs.bias.new_empty(inputs.bias.shape) if inputs.grad_bias else hidden.new_empty(0),
    )


def plan_tiles(
    problem: TileProblem,
    sizes: PlanSizes,
    dtypes: TileDtypes,
    pass_name: str,
    run: Callable[[TilePlan], object],
    *,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> TilePlan:
    """The tile plan for a pass over ``problem``, whose memory ``sizes`` describes: as the knobs
    set it, else the fastest that fits the budget, measured on a GPU (``fused.measured_plan``;
    ``pass_name`` names what the pass computes, ``run(plan)`` runs it with ``plan``)."""
    device = problem.hidden.device
    if chunk_size is None and vocab_chunk_size is None and measuring(device):
        kind = problem_kind(sizes, device, (problem.hidden.dtype, *dataclasses.astuple(dtypes)), pass_name)
        # Epilogue plans where their kernels serve the pass: 16-bit products, float32
        # statistics, no per-token outputs (in float32 cuBLAS's products are faster by far).
        epilogue = (
            problem.hidden.dtype.itemsize == 2 and dtypes.compute == torch.float32 and not (sizes.entropy or sizes.top1)
        )
        return measured_plan(sizes, budget_bytes(sizes, memory_budget), kind, run, epilogue=epilogue)
    return tile_plan(sizes, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, memory_budget=memory_budget)


def _plan(problem: TileProblem, inputs: LossInputs, dtypes: TileDtypes, pass_name: str, run: Callable[[TilePlan], object]) -> TilePlan:
    """``plan_tiles`` for the loss of ``inputs``, with its knobs."""
    (n, hidden_dim), vocab = problem.hidden.shape, problem.weight.shape[0]
    itemsize = problem.hidden.element_size()
    sizes = PlanSizes(
        n, vocab, hidden_dim, itemsize, compute_itemsize=inputs.compute_dtype.itemsize,
        has_bias=problem.bias is not None,
        logits_itemsize=None if inputs.logits_dtype is None else inputs.logits_dtype.itemsize,
        weight_accumulator=_accumulates_weight(problem, inputs),
    )
    return plan_tiles(
        problem, sizes, dtypes, pass_name, run, chunk_size=inputs.chunk_size, vocab_chunk_size=inputs.vocab_chunk_size,
        memory_budget=inputs.memory_budget,
    )


def describe_pass(options: LossOptions, wanted: tuple[bool, bool, bool], *, backward: bool, **work: bool) -> str:
    """What a pass computes, as far as it changes which plan is fastest: forward or
    backward, the gradients ``wanted`` for (hidden, weight, bias), the ``work`` flags set
    (as named: ``lse_grad``, ``entropy``...) and the options that add work to the row kernels."""
    parts = [
        "backward" if backward else "forward",
        "grads=" + "".join(name[0] for name, want in zip(_GRADIENTS, wanted) if want),
    ]
    parts += [name for name, on in work.items() if on]
    parts += [name for name, on in (
        ("smoothing", options.label_smoothing > 0), ("z_loss", options.z_loss > 0),
        ("softcap", options.softcap is not None), ("scale", options.logit_scale is not None),
    ) if on]
    return ",".join(parts)


def _accumulates_weight(problem: TileProblem, inputs: LossInputs) -> bool:
    """Whether grad_weight is summed over row chunks in a wider dtype than the weight's."""
    return (
        inputs.grad_weight
        and inputs.accumulation_dtype is not None
        and inputs.accumulation_dtype.itemsize > problem.weight.element_size()
    )


def _tile_dtypes(problem: TileProblem, inputs: LossInputs) -> TileDtypes:
    return TileDtypes(
        compute=inputs.compute_dtype,
        logits=inputs.logits_dtype or problem.hidden.dtype,
        weight_sum=inputs.accumulation_dtype if _accumulates_weight(problem, inputs) else problem.weight.dtype,
    )


def _denominator(problem: TileProblem, inputs: LossInputs) -> Tensor | float:
    """What the summed loss is divided by: every token's loss has gradient ``1 / this``
    (ignored tokens are masked separately). A count given as a tensor stays on the targets'
    device; the valid count was read on the host with the label check."""
    count = inputs.count()
    if count is not None:
        return count.to(problem.hidden.device) if isinstance(count, Tensor) else count
    if inputs.reduction == "sum":
        return 1.0
    return problem.valid_tokens


def _forward_gradient_scale(problem: TileProblem, inputs: LossInputs) -> float:
    """``1 / denominator`` as a Python number, for the matmuls' ``alpha``: the gradient tile
    holds ``p - onehot``, whose target entries lie next to -1 and 0 and so round to 16 bits
    almost exactly, and the mean's scale is applied in cuBLAS's float32 epilogue (scaling the
    tile instead, as eager does, would round every entry fully). A count given as a tensor
    costs one more host read."""
    denominator = float(_denominator(problem, inputs))
    if denominator != 0:
        return 1.0 / denominator
    # transformers' edge cases: a count of 0 sends +inf to the valid tokens; with none valid
    # (or a mean over none) every token's gradient is 0.
    return math.inf if problem.valid_tokens else 0.0


# ---------------------------------------------------------------------------------------
# The forward op.


def _forward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, grad_hidden, grad_weight, grad_bias)``: the reduced loss as the contract
    returns it, ``lse`` shaped like ``labels``, and the gradients of the loss flagged
    ``grad_*`` (computed here, only for a scalar loss; empty otherwise). When gradients are
    computed here, ignored rows are skipped and their ``lse`` is -inf: the public function
    then does not return it."""
    inputs = LossInputs(*args)
    problem, options = inputs.problem(), inputs.options()
    alpha = functools.partial(_forward_gradient_scale, problem, inputs)
    dtypes = _tile_dtypes(problem, inputs)
    run = functools.partial(run_tiles, problem, options, dtypes=dtypes, wanted=inputs.wanted())
    plan = _plan(problem, inputs, dtypes, describe_pass(options, inputs.wanted(), backward=False), run)
    out = run(plan=plan, alpha=alpha)
    # Nothing computed from bad labels leaves the op: without gradients nothing has read them yet.
    problem.label_check.read()
    loss = reduce_losses(out.losses, problem.targets, options, inputs.count(), problem.batch_shape)
    return (loss, out.lse.reshape(problem.batch_shape), *_gradients_out(out, inputs))


forward_op = torch.library.custom_op(
    "fused::linear_cross_entropy", _forward, mutates_args=(),
    schema=_schema(LossInputs, returns="(Tensor, Tensor, Tensor, Tensor, Tensor)"),
)


@forward_op.register_fake
def _forward_fake(*args):
    inputs = LossInputs(*args)
    hidden, compute_dtype = inputs.hidden, inputs.compute_dtype
    if inputs.reduction == "none":
        loss = hidden.new_empty(inputs.labels.shape, dtype=compute_dtype)
    else:
        loss = hidden.new_empty((), dtype=compute_dtype)
        if inputs.num_items is not None:  # the division decides shape and dtype, as in reduce_losses
            loss = loss / inputs.num_items.to(hidden.device)
    return (loss, hidden.new_empty(inputs.labels.shape, dtype=compute_dtype), *_gradients_fake(inputs))


# ---------------------------------------------------------------------------------------
# The backward op.


def _split_backward_args(args: tuple) -> tuple[LossInputs, Upstream]:
    n = len(LossInputs._fields)
    return LossInputs(*args[:n]), Upstream(*args[n:])


def _backward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of (hidden, weight, bias) for the upstream gradients, recomputing the logits
    tile by tile from the forward's ``lse``."""
    inputs, upstream = _split_backward_args(args)
    problem, options = inputs.problem(), inputs.options()
    n = problem.hidden.shape[0]
    lse, loss_grad = upstream.lse, upstream.loss_grad
    if loss_grad is None:
        row_grad = lse.new_zeros(()).expand(n)
    elif inputs.reduction == "none":
        row_grad = loss_grad.reshape(n)
    else:
        row_grad = (loss_grad / _denominator(problem, inputs)).reshape(-1).expand(n)
    dtypes = _tile_dtypes(problem, inputs)
    run = functools.partial(
        run_tiles, problem, options, dtypes=dtypes, lse=lse.reshape(n).contiguous(), loss_grad=row_grad,
        lse_grad=None if upstream.lse_grad is None else upstream.lse_grad.reshape(n).contiguous(),
        wanted=inputs.wanted(),
    )
    pass_name = describe_pass(options, inputs.wanted(), backward=True, lse_grad=upstream.lse_grad is not None)
    out = run(plan=_plan(problem, inputs, dtypes, pass_name, run))
    return _gradients_out(out, inputs)


backward_op = torch.library.custom_op(
    "fused::linear_cross_entropy_backward", _backward, mutates_args=(),
    schema=_schema(LossInputs, Upstream, returns="(Tensor, Tensor, Tensor)"),
)


@backward_op.register_fake
def _backward_fake(*args):
    return _gradients_fake(_split_backward_args(args)[0])


# ---------------------------------------------------------------------------------------
# Autograd.


def _scale_by_upstream(ctx, grads: list[Tensor], factor: Tensor) -> list[Tensor]:
    """The forward's gradients times the loss's upstream gradient ``factor``.

    Eagerly in place, so no second copy of a ``V x D`` gradient exists, by a kernel that
    skips the work when ``factor`` is exactly 1 (``loss.backward()``) without the host
    waiting to find out (``fused.kernels.upstream_scale``). A second backward through a
    retained graph reads on the host whether an earlier one scaled them, and then raises
    rather than return gradients scaled twice. While traced (``torch.compile``) out of place:
    a data-dependent branch cannot be traced.
    """
    if type(factor) is not Tensor or torch.compiler.is_compiling():
        return [g * factor for g in grads]
    scaled = getattr(ctx, "scaled", None)
    if scaled is not None and bool(scaled):
        raise RuntimeError(
            "fused.linear_cross_entropy: a scalar loss computes its gradients in the forward pass and "
            "scales them in place by the upstream gradient; a second backward through it with an "
            "upstream gradient other than 1 is not supported. Use reduction='none' (and sum) or "
            "return_lse=True, whose backward recomputes."
        )
    ctx.scaled = scale_unless_one(grads, factor)
    return grads


def _setup_context(ctx, inputs, output):
    inputs = LossInputs(*inputs)
    _, lse, grad_hidden, grad_weight, grad_bias = output
    ctx.grads_in_forward = any(inputs.wanted())
    ctx.set_materialize_grads(False)
    if ctx.grads_in_forward:
        # lse is an internal by-product here: the public function does not return it.
        ctx.mark_non_differentiable(lse, grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(inputs.hidden, inputs.weight, inputs.labels, inputs.bias, inputs.num_items, lse)
        ctx.inputs = inputs._replace(hidden=None, weight=None, labels=None, bias=None, num_items=None)


def _autograd_backward(ctx, loss_grad, lse_grad, *_):
    needs = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
    result = [None] * len(LossInputs._fields)
    if loss_grad is None and lse_grad is None:
        return tuple(result)
    if ctx.grads_in_forward:
        grads = ctx.saved_tensors
        missing = [name for name, g, need in zip(_GRADIENTS, grads, needs) if need and g.numel() == 0]
        if missing:
            raise RuntimeError(f"fused::linear_cross_entropy computed no gradient for {missing}: set grad_<name>=True")
        grads = _scale_by_upstream(ctx, list(grads), loss_grad)
    else:
        hidden, weight, labels, bias, num_items, lse = ctx.saved_tensors
        flags = dict(zip(("grad_hidden", "grad_weight", "grad_bias"), needs))
        inputs = ctx.inputs._replace(hidden=hidden, weight=weight, labels=labels, bias=bias, num_items=num_items, **flags)
        grads = backward_op(*inputs, *Upstream(lse, loss_grad, lse_grad))
    for position, g, need in zip(_GRAD_POSITIONS, grads, needs):
        result[position] = g if need else None
    return tuple(result)


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """``forward_op`` and its autograd without the dispatcher, for eager calls on plain
    tensors: the custom op's dispatch costs about as much host time as the whole forward up
    to its first product, time the device sits idle when nothing else is queued ahead."""

    @staticmethod
    def forward(ctx, *inputs):
        # ctx in forward, rather than a setup_context: with one, apply() binds the arguments
        # to forward's signature through inspect on every call.
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_autograd_backward)


def needs_dispatcher(*tensors: Tensor | None) -> bool:
    """Whether a call must go through the custom op: while ``torch.compile`` traces it, and
    for tensor subclasses other than parameters (a tracer's fake tensors, DTensor), which
    the dispatcher routes to their own handling."""
    return torch.compiler.is_compiling() or any(
        t is not None and type(t) is not Tensor and type(t) is not torch.nn.Parameter for t in tensors
    )


def fused_loss(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """``(loss, lse)`` of the forward op, differentiable in hidden, weight and bias; through
    the dispatcher only where it must (``needs_dispatcher``)."""
    tensors = (inputs.hidden, inputs.weight, inputs.labels, inputs.bias, inputs.num_items)
    forward = forward_op if needs_dispatcher(*tensors) else _EagerForward.apply
    loss, lse, *_ = forward(*inputs)
    return loss, lse
