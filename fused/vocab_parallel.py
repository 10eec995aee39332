"""The fused loss for a head sharded over the vocabulary (tensor parallelism), across processes.

``fused.linear_cross_entropy`` comes here when ``weight`` is a ``DTensor`` placed
``Shard(0)`` on a 1-D device mesh (torch's ``ColwiseParallel`` on ``lm_head``): rank ``k``
holds vocabulary rows ``[o_k, o_k + V_k)`` (torch's uneven ``Shard(0)`` sizes, the last ranks
possibly short or empty) and every rank holds the same tokens: ``hidden`` a plain tensor or a
``Replicate`` DTensor on the same mesh, the same ``labels``. ``bias``, if any, is sharded like
the weight. The semantics are ``reference.vocab_parallel``'s:

1. each rank walks its shard in chunks of rows and keeps per row its logits' max, sum of
   exponentials, target logit (0 unless the target lies in its shard) and logit sum (label
   smoothing only); no ``N x V`` tensor and no ``N x V_k`` one exist beyond one chunk;
2. one all-reduce (MAX) of the maxima, one (SUM) of the rescaled sums, target logits and
   logit sums: ``4 N`` (or ``5 N``) numbers per rank, whatever ``V``;
3. every rank then holds the same ``lse`` and per-token losses, reduced as the contract does.

Backward recomputes each chunk of the shard's logits from the saved ``lse``: the gradient of
the rank's own columns gives its weight (and bias) gradient shard, and its partial hidden
gradient ``dz @ W_k`` is summed over ranks (all-reduce, float32 or wider), so that every
rank holds the full gradient of its replicated ``hidden``.

Before any per-row exchange, every rank checks its inputs on its own and then all ranks
agree in one small all-reduce: whether any rank found an error, and that tokens, hidden size,
labels, hidden values and ``num_items_in_batch`` are the same on every rank. A problem on one
rank (a label out of range there only, a shard of another hidden size) then raises the same
``ValueError`` on every rank instead of leaving the others waiting in a collective.
Collectives run on the mesh's process group and are bounded by its timeout. The loss is
replicated: every rank must backpropagate the same upstream gradient through it, as it does
when each computes the same loss from it (the ranks' hidden gradients are summed).

Per chunk of rows, the shard's raw logits come from one matmul in the inputs' dtype; the
per-row arithmetic is either the fused op's Triton row kernels (``backend='triton'``, and
``'auto'`` on CUDA: ``fused.kernels.logit_statistics`` and ``logit_gradient``, which take the
shard's column offset and the whole vocabulary's size as they stand) or
``reference.vocab_parallel`` in PyTorch (``'reference'``, and ``'auto'`` elsewhere). The
op's tile loop itself (``fused.linear_cross_entropy._run_tiles``) does not fit a shard: it
reads target columns and the label-smoothing ``V`` from the tile's own vocabulary and
finishes the statistics before any exchange; this module's loop is its row-chunk part
without vocabulary blocks or gradients in the forward pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fused.kernels.logit_gradient import write_logit_gradient
from fused.kernels.logit_statistics import RowStatistics, accumulate_logit_statistics
from fused.plan import vocab_parallel_chunk_rows
from reference.linear_cross_entropy import (
    FlatProblem,
    LossArguments,
    LossOptions,
    prepare_inputs,
    reduce_losses,
    transform_logits,
)
from reference.vocab_parallel import (
    CombinedStatistics,
    ShardStatistics,
    losses_from_statistics,
    rescaled_sumexp,
    shard_logit_gradient,
    shard_statistics,
)



def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (a tensor
    cannot be one unless that module is loaded)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's slice of the vocabulary lies: rows ``[offset, offset + size)`` of a
    vocabulary of ``vocab``, and the process group of the mesh it is sharded over."""

    group: dist.ProcessGroup
    offset: int
    size: int
    vocab: int


def placement_error(weight, hidden, labels, bias) -> str | None:
    """Why the tensors are not a vocabulary-parallel layout this op computes, or None
    (``hidden`` and ``labels`` may be None: not checked). Read from DTensor metadata,
    identical on every rank: every rank refuses alike, without a collective."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1:
        return f"weight is a DTensor on a {mesh.ndim}-D device mesh; the vocabulary-parallel loss needs a 1-D mesh"
    if placements != (Shard(0),):
        return (
            f"weight is a DTensor placed {placements}; the vocabulary-parallel loss needs Shard(0) (the "
            "vocabulary dimension, torch's ColwiseParallel). Shard(1) cuts the hidden dimension, whose partial "
            "logits no per-row statistic can combine; Replicate or Partial: use weight.full_tensor()"
        )
    for name, t in (("hidden", hidden), ("labels", labels)):
        if isinstance(t, DTensor) and (t.device_mesh != mesh or tuple(t.placements) != (Replicate(),)):
            return (
                f"{name} is a DTensor placed {tuple(t.placements)} on {t.device_mesh}; with a vocabulary-sharded "
                "weight every rank needs all tokens: a plain tensor or Replicate() on the weight's mesh"
            )
    if bias is not None and not (
        isinstance(bias, DTensor) and bias.device_mesh == mesh and tuple(bias.placements) == (Shard(0),)
    ):
        return "bias must be sharded like the weight: a DTensor placed Shard(0) on the weight's mesh"
    return None


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def _fingerprint(p: FlatProblem, count) -> Tensor:
    """``(12,)`` float64 on the inputs' device: numbers every rank must agree on (tokens,
    hidden size, checksums of the targets and hidden states, the count), then their
    negatives, so that one all-reduce with MAX yields every maximum and minimum. Built on
    the device: no host read before the collective."""
    targets = p.targets.to(torch.float64)
    position = torch.arange(1, targets.numel() + 1, dtype=torch.float64, device=targets.device) % 9973 + 1
    hidden_sum = torch.nan_to_num(p.hidden.detach().sum(dtype=torch.float64), nan=0.0, posinf=1e300, neginf=-1e300)
    count = torch.as_tensor(-1.0 if count is None else count, dtype=torch.float64).to(targets.device).reshape(())
    shape = torch.tensor(p.hidden.shape, dtype=torch.float64, device=targets.device)
    values = torch.cat([shape, torch.stack([targets.sum(), (targets * position).sum(), hidden_sum, count])])
    return torch.cat([values, -values])


_FINGERPRINT_NAMES = (
    "number of tokens", "hidden size", "labels", "labels (order)", "hidden states", "num_items_in_batch",
)


def _agree(group: dist.ProcessGroup, device: torch.device, error: Exception | None, fingerprint: Tensor | None) -> None:
    """One small all-reduce in which every rank says whether its inputs failed its own checks
    and shows its fingerprint; raises the same ``ValueError`` on every rank unless all ranks
    passed and agree. A rank's own error is re-raised there, as the cause."""
    if fingerprint is None:
        fingerprint = torch.zeros(2 * len(_FINGERPRINT_NAMES), dtype=torch.float64, device=device)
    failed_here = torch.tensor([1.0 if error is not None else 0.0], dtype=torch.float64, device=device)
    flags = torch.cat([failed_here, fingerprint])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    if flags[0] > 0:
        messages: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        failed = "; ".join(f"rank {rank}: {m}" for rank, m in enumerate(messages) if m is not None)
        raise ValueError(
            f"fused.linear_cross_entropy (vocabulary-parallel): bad input on some rank: {failed}"
        ) from error
    half = len(_FINGERPRINT_NAMES)
    highs, lows = flags[1 : 1 + half].tolist(), (-flags[1 + half :]).tolist()
    differ = [name for name, hi, lo in zip(_FINGERPRINT_NAMES, highs, lows) if hi != lo]
    if differ:
        raise ValueError(
            "fused.linear_cross_entropy (vocabulary-parallel): the ranks of the weight's mesh disagree on "
            f"{', '.join(differ)}; every rank must pass the same tokens, labels and count (the hidden states "
            "replicated). A weight sharded by FSDP is not a vocabulary-parallel head: FSDP ranks hold different "
            "batches"
        )


def _torch_statistics(h, weight, bias, targets, shard: VocabShard, options: LossOptions, dtype) -> ShardStatistics:
    """One chunk's statistics ``(r,)`` of the shard, by ``reference.vocab_parallel``: the
    transformed logits ``(r, V_k)`` in ``dtype`` exist for the chunk."""
    z = transform_logits(F.linear(h, weight, bias).to(dtype), options)
    return shard_statistics(z, targets, shard.offset, options.ignore_index)


def _kernel_statistics(h, weight, bias, targets, shard: VocabShard, options: LossOptions, dtype) -> ShardStatistics:
    """The same by the fused op's statistics kernel, over the chunk's raw logits in the
    inputs' dtype (the kernel transforms them in ``dtype``); the target column is found
    from the shard's offset."""
    stats = RowStatistics(h.shape[0], dtype, h.device, sum_logits=options.label_smoothing > 0)
    if shard.size:  # an empty shard keeps the starting values: max -inf, sums 0
        logits = F.linear(h, weight, bias)
        accumulate_logit_statistics(logits, shard.offset, targets, stats, slice(0, h.shape[0]), options)
    logit_sum = stats.logit_sum if options.label_smoothing else torch.zeros_like(stats.max)
    return ShardStatistics(stats.max, stats.sumexp, stats.target_logit, logit_sum)


def _torch_gradient(h, weight, bias, targets, shard: VocabShard, lse, grad_loss, grad_lse, options, dtype) -> Tensor:
    """``dL/dx (r, V_k)`` of one chunk of the shard's raw logits, in ``dtype``
    (``grad_loss`` already 0 on ignored rows)."""
    z = transform_logits(F.linear(h, weight, bias).to(dtype), options)
    return shard_logit_gradient(z, targets, shard.offset, shard.vocab, lse, grad_loss, grad_lse, options)


def _kernel_gradient(h, weight, bias, targets, shard: VocabShard, lse, grad_loss, grad_lse, options, dtype) -> Tensor:
    """The same by the fused op's gradient kernel, written over the raw logits in the
    inputs' dtype, with the target column from the shard's offset and the label-smoothing
    ``V`` of the whole vocabulary."""
    logits = F.linear(h, weight, bias)
    if shard.size:
        rows = slice(0, h.shape[0])
        # The kernel reads the lse gradient with stride 1 (a broadcast upstream has stride 0).
        grad_lse = None if grad_lse is None else grad_lse.contiguous()
        write_logit_gradient(logits, shard.offset, targets, lse, grad_loss, grad_lse, rows, shard.vocab, options)
    return logits


class _VocabParallelFunction(torch.autograd.Function):
    """Per-token ``(losses, lse)``, ``(N,)`` each in ``compute_dtype`` and equal on every
    rank, of ``hidden (N, D)`` (replicated) against the shard ``weight (V_k, D)`` and
    ``bias (V_k,)`` (this rank's), ``targets (N,)`` int64 global vocabulary indices."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, shard: VocabShard, options: LossOptions, chunk_size: int,
                compute_dtype: torch.dtype, use_kernels: bool):
        n = hidden.shape[0]
        partial = torch.empty(4, n, dtype=compute_dtype, device=hidden.device)  # max, sumexp, target, logit sum
        statistics = _kernel_statistics if use_kernels else _torch_statistics
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            s = statistics(hidden[rows], weight, bias, targets[rows], shard, options, compute_dtype)
            partial[:, rows] = torch.stack([s.max, s.sumexp, s.target_logit, s.logit_sum])
            del s  # before the next chunk's logits exist
        row_max = partial[0].clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
        partial[1] = rescaled_sumexp(ShardStatistics(*partial), row_max)
        summed = partial[1:] if options.label_smoothing else partial[1:3]
        summed = summed.contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=shard.group)
        logit_sum = summed[2] if options.label_smoothing else torch.zeros_like(row_max)
        combined = CombinedStatistics(lse=row_max + torch.log(summed[0]), target_logit=summed[1], logit_sum=logit_sum)
        losses = losses_from_statistics(combined, targets, shard.vocab, options)
        ctx.save_for_backward(hidden, weight, bias, targets, combined.lse)
        ctx.shard, ctx.options, ctx.chunk_size, ctx.compute_dtype = shard, options, chunk_size, compute_dtype
        ctx.use_kernels = use_kernels
        ctx.set_materialize_grads(False)
        return losses, combined.lse

    @staticmethod
    def backward(ctx, grad_losses, grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        shard, options, chunk_size, compute_dtype = ctx.shard, ctx.options, ctx.chunk_size, ctx.compute_dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        valid = targets != options.ignore_index
        # where, not a product: an infinite upstream gradient (a mean over no valid target)
        # must still give 0 on ignored rows.
        grad_losses = torch.zeros_like(lse) if grad_losses is None else grad_losses.to(compute_dtype)
        grad_losses = torch.where(valid, grad_losses, 0)
        grad_lse = None if grad_lse is None else grad_lse.to(compute_dtype)
        acc_dtype = torch.promote_types(weight.dtype, compute_dtype)
        # Every rank needs grad_hidden in full: each adds its shard's partial product, and the
        # ranks sum them. All ranks take part whether or not their hidden needs a gradient.
        grad_hidden = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_bias else None
        gradient = _kernel_gradient if ctx.use_kernels else _torch_gradient
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            dz = gradient(
                h, weight, bias, targets[rows], shard, lse[rows], grad_losses[rows],
                None if grad_lse is None else grad_lse[rows], options, compute_dtype,
            )
            grad_hidden[rows] = dz.to(acc_dtype) @ weight.to(acc_dtype)
            if need_weight:
                grad_weight.addmm_(dz.t().to(acc_dtype), h.to(acc_dtype))
            if need_bias:
                grad_bias.add_(dz.sum(0).to(acc_dtype))
            del dz, h
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=shard.group)
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None, None,
        )


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    arguments: LossArguments,
    *,
    chunk_size: int | None,
    memory_budget: int | None,
    compute_dtype: torch.dtype,
    backend: str,
) -> Tensor | tuple[Tensor, Tensor]:
    """``fused.linear_cross_entropy`` with ``weight (V, D)`` a DTensor placed ``Shard(0)`` on a
    1-D mesh (see the module docstring); every rank of the mesh must call it with the same
    tokens. ``hidden (N, D)`` or ``(B, T, D)`` plain or a ``Replicate`` DTensor, ``labels``
    likewise, ``bias (V,)`` sharded like the weight. Returns the loss (and ``lse``) equal on
    every rank, in ``compute_dtype``: plain tensors, or ``Replicate`` DTensors when ``hidden``
    is a DTensor. Gradients: the weight's and bias's own shards, and ``hidden``'s in full.

    Called by ``fused.linear_cross_entropy`` once it has checked its own knobs:
    ``chunk_size`` rows of logits per step, or ``memory_budget`` bytes. ``backend`` as for
    the op: which per-row arithmetic runs (module docstring). Raises ``ValueError`` on every
    rank when any rank's inputs are bad or the ranks' inputs differ.
    """
    from torch.distributed.tensor import DTensor, Replicate

    # The public op's interpreter flag (it imports this module: import here).
    from fused.api import KERNELS_INTERPRETED

    options = arguments.options()
    bias, shift, num_items_in_batch = arguments.bias, arguments.shift, arguments.num_items_in_batch
    reason = placement_error(weight, hidden, labels, bias)
    if reason is not None:
        raise ValueError(f"fused.linear_cross_entropy: {reason}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    group = mesh.get_group()
    weight_local, bias_local = weight.to_local(), None if bias is None else bias.to_local()
    hidden_local, labels_local, count = _local(hidden), _local(labels), _local(num_items_in_batch)
    vocab, dim = weight.shape
    (local_rows, _), (offset, _) = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    error, fingerprint, p = None, None, None
    try:
        if tuple(weight_local.shape) != (local_rows, dim):
            raise ValueError(
                f"this rank's weight shard is {tuple(weight_local.shape)}; Shard(0) of {tuple(weight.shape)} gives it "
                f"{(local_rows, dim)}"
            )
        if bias_local is not None and tuple(bias_local.shape) != (local_rows,):
            raise ValueError(
                f"this rank's bias shard is {tuple(bias_local.shape)}, its weight shard has {local_rows} rows"
            )
        # The contract's validation against the whole vocabulary (labels in [0, V)), on a
        # stand-in of the global weight's shape that holds no memory.
        stand_in = weight_local.new_empty(()).expand(vocab, dim)
        bias_stand_in = None if bias_local is None else bias_local.new_empty(()).expand(vocab)
        p = prepare_inputs(
            hidden_local, stand_in, labels_local, arguments._replace(bias=bias_stand_in, num_items_in_batch=count)
        )
        fingerprint = _fingerprint(p, count)
    except Exception as caught:  # any rank's failure must reach every rank, not leave them waiting
        error = caught
    _agree(group, weight_local.device, error, fingerprint)
    shard = VocabShard(group, offset, local_rows, vocab)
    rows = vocab_parallel_chunk_rows(p.hidden.shape[0], local_rows, chunk_size, memory_budget, compute_dtype)
    use_kernels = backend == "triton" or (backend == "auto" and p.hidden.is_cuda)
    if use_kernels and not p.hidden.is_cuda and not KERNELS_INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {p.hidden.device}; to run the kernels on CPU set "
            "TRITON_INTERPRET=1 before importing fused"
        )
    losses, lse = _VocabParallelFunction.apply(
        p.hidden, weight_local, bias_local, p.targets, shard, options, rows, compute_dtype, use_kernels
    )
    loss = reduce_losses(losses, p.targets, options, count, p.batch_shape)
    lse = lse.reshape(p.batch_shape)
    if isinstance(hidden, DTensor):
        loss, lse = (DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in (loss, lse))
    return (loss, lse) if arguments.return_lse else loss
