"""``fused.linear_cross_entropy``: the public function. It validates the arguments, follows
``torch.autocast`` as the model's own head would, and picks the path: the Triton tile loop
(``fused.ops``, ``fused.tiles``) on CUDA, or the chunked PyTorch reference elsewhere."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from fused.kernels.logit_statistics import logit_statistics_kernel
from fused.ops import LossInputs, fused_loss
from fused.plan import reference_chunk_rows
from fused.vocab_parallel import is_dtensor, vocab_parallel_linear_cross_entropy
from reference.chunked_cross_entropy import COMPUTE_DTYPES, chunked_linear_cross_entropy
from reference.input_checks import check_size
from reference.linear_cross_entropy import LossArguments, check_inputs, check_shift, takes_loss_arguments

BACKENDS = ("auto", "triton", "reference")
# Set at import: triton.jit reads TRITON_INTERPRET when the kernels are defined.
KERNELS_INTERPRETED = isinstance(logit_statistics_kernel, InterpretedFunction)


def _cast_for_autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # autocast's own rule for a matmul's inputs: floating tensors other than float64.
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def computes_as_autocast_would(function: Callable) -> Callable:
    """Under ``torch.autocast``, run ``function`` as the model's own head and loss would run:
    the head's inputs cast to the autocast dtype (what ``nn.Linear`` does under autocast),
    then the loss with autocast off, so that its float32 statistics stay float32 and the
    backward, which autocast does not reach, recomputes the same half-precision logits as
    the forward. The casts are autograd ops: float32 parameters get float32 gradients, as in
    stock mixed-precision training."""

    @functools.wraps(function)
    def run(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, **options):
        device_type = hidden.device.type if isinstance(hidden, Tensor) else None
        if device_type is None or not torch.is_autocast_enabled(device_type):
            return function(hidden, weight, labels, bias=bias, **options)
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (_cast_for_autocast(t, dtype) for t in (hidden, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return function(hidden, weight, labels, bias=bias, **options)

    return run


@computes_as_autocast_would
@takes_loss_arguments
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    arguments: LossArguments,
    *,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    logits_dtype: torch.dtype | None = None,
    accumulation_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross entropy of ``hidden @ weight.T + bias`` against ``labels``, never materialising
    the logits: ``reference.linear_cross_entropy``'s arguments, values and gradients.

    ``hidden (N, D)`` or ``(B, T, D)`` float16/bfloat16/float32/float64; ``weight (V, D)``,
    ``bias (V,)`` of the same dtype and device; ``labels`` integer, shaped like
    ``hidden[..., 0]``, in ``[0, V)`` or ``ignore_index``. Returns the loss (0-d, or shaped
    like ``labels`` for ``reduction='none'``) in ``compute_dtype`` (float32: the contract's
    upcast), and with ``return_lse=True`` also the per-token log-sum-exp shaped like
    ``labels``. Both are differentiable in ``hidden``, ``weight`` and ``bias``.

    Memory knobs (``fused.tiles`` gives the formula): ``chunk_size`` tokens per row chunk,
    ``vocab_chunk_size`` vocabulary entries per tile (Triton path only); or
    ``memory_budget``, bytes of extra memory beyond the inputs and the returned gradients,
    from which the fastest tile that fits is chosen (``fused.plan.tile_plan``; on the
    reference path, chunks of two row blocks of logits, ``fused.plan.reference_chunk_rows``).
    With none, the fastest plan whose tile fits in ``fused.plan.DEFAULT_MEMORY_BUDGET``.
    ``compute_dtype=torch.float64`` keeps float64 inputs in float64 throughout (for
    ``gradcheck``).

    Precision beyond stock, for 16-bit inputs (both off by default, which keeps
    transformers' numbers): ``logits_dtype=torch.float32`` keeps each tile's logits as
    cuBLAS's float32 sums instead of rounding them to the inputs' dtype first (the loss and
    lse then carry no 16-bit rounding; the tile takes ``4 + s`` bytes a logit instead of
    ``s``, counted by the planner). ``accumulation_dtype=torch.float32`` sums ``grad_weight``
    over row chunks in a float32 buffer of ``V x D`` (counted by the planner) rather than
    rounding it once per chunk. ``backend``: ``'auto'`` runs the Triton kernels on CUDA tensors and
    ``reference.chunked_cross_entropy`` elsewhere; ``'triton'`` forces the kernels (CPU
    tensors need ``TRITON_INTERPRET=1`` set before ``fused`` is imported); ``'reference'``
    forces the chunked PyTorch path.

    Under ``torch.autocast`` the loss is what ``F.linear`` + the loss compute there: the
    matmuls in the autocast dtype (float32 ``hidden``, ``weight`` and ``bias`` are cast to it;
    the gradients reach them in float32), the statistics in float32.

    A ``weight`` that is a DTensor sharded over the vocabulary (``Shard(0)`` on a 1-D mesh,
    tensor parallelism) runs ``fused.vocab_parallel``: the same loss, combined across ranks.
    """
    bias, num_items_in_batch = arguments.bias, arguments.num_items_in_batch
    options = arguments.options()
    check_shift(arguments.shift)
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size), ("memory_budget", memory_budget)):
        if size is not None:
            check_size(name, size)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
    for name, dtype in (("logits_dtype", logits_dtype), ("accumulation_dtype", accumulation_dtype)):
        if dtype not in (None, torch.float32):
            raise ValueError(f"{name} must be None (the inputs' dtype) or torch.float32, got {dtype}")
    if memory_budget is not None and (chunk_size is not None or vocab_chunk_size is not None):
        raise ValueError("memory_budget chooses chunk_size and vocab_chunk_size; pass either it or them")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if is_dtensor(weight):
        if vocab_chunk_size is not None or logits_dtype is not None or accumulation_dtype is not None:
            raise ValueError(
                "a vocabulary-sharded weight runs fused.vocab_parallel, which chunks rows only and keeps stock "
                "precision: vocab_chunk_size, logits_dtype and accumulation_dtype are not supported there"
            )
        return vocab_parallel_linear_cross_entropy(
            hidden, weight, labels, arguments, chunk_size=chunk_size, memory_budget=memory_budget,
            compute_dtype=compute_dtype, backend=backend,
        )
    if backend == "auto":
        backend = "triton" if isinstance(hidden, Tensor) and hidden.is_cuda else "reference"
    if backend == "reference":
        return _reference_path(
            hidden, weight, labels, arguments, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
            memory_budget=memory_budget, compute_dtype=compute_dtype, logits_dtype=logits_dtype,
        )

    count_is_number = isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool)
    op_types_fit = (
        all(isinstance(t, Tensor) for t in (hidden, weight, labels))
        and (bias is None or isinstance(bias, Tensor))
        and (num_items_in_batch is None or count_is_number or isinstance(num_items_in_batch, Tensor))
    )
    if not op_types_fit:
        # The op's schema would reject these with a generic message; the contract names them.
        check_inputs(hidden, weight, labels, bias, options, shift=arguments.shift, num_items_in_batch=num_items_in_batch)
    if not hidden.is_cuda and not KERNELS_INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {hidden.device}; to run the kernels on CPU set "
            "TRITON_INTERPRET=1 before importing fused"
        )

    grads_in_forward = options.reduction != "none" and not arguments.return_lse and torch.is_grad_enabled()
    flags = [grads_in_forward and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, lse = fused_loss(LossInputs(
        hidden, weight, labels, bias,
        num_items=num_items_in_batch if isinstance(num_items_in_batch, Tensor) else None,
        num_items_value=float(num_items_in_batch) if count_is_number else None,
        ignore_index=options.ignore_index, shift=arguments.shift, reduction=options.reduction,
        label_smoothing=float(options.label_smoothing),
        softcap=None if options.softcap is None else float(options.softcap),
        logit_scale=None if options.logit_scale is None else float(options.logit_scale),
        z_loss=float(options.z_loss), chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
        memory_budget=memory_budget, compute_dtype=compute_dtype, logits_dtype=logits_dtype,
        accumulation_dtype=accumulation_dtype, grad_hidden=flags[0], grad_weight=flags[1], grad_bias=flags[2],
    ))
    return (loss, lse) if arguments.return_lse else loss


def _reference_path(
    hidden: Tensor, weight: Tensor, labels: Tensor, arguments: LossArguments, *, chunk_size: int | None,
    vocab_chunk_size: int | None, memory_budget: int | None, compute_dtype: torch.dtype,
    logits_dtype: torch.dtype | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``reference.chunked_cross_entropy`` with the public function's memory knobs (it sums
    grad_weight in float32 whatever ``accumulation_dtype`` says)."""
    if vocab_chunk_size is not None:
        raise ValueError(
            "vocab_chunk_size sets the Triton kernels' tile; the reference path (backend='reference', or "
            "'auto' off CUDA) chunks over tokens only: pass chunk_size or memory_budget"
        )
    if memory_budget is not None and isinstance(hidden, Tensor) and isinstance(weight, Tensor) and weight.dim() == 2:
        n_rows = hidden.numel() // max(1, hidden.shape[-1]) if hidden.dim() else 0
        chunk_size = reference_chunk_rows(
            n_rows, weight.shape[0], memory_budget, compute_itemsize=compute_dtype.itemsize
        )
    return chunked_linear_cross_entropy(
        hidden, weight, labels, compute_dtype=compute_dtype, logits_dtype=logits_dtype, **({} if chunk_size is None else {"chunk_size": chunk_size}),
        **arguments._asdict(),
    )
