"""The op's inputs as the tile loop reads them, with the labels' check kept off the host's path.

The contract (``reference.linear_cross_entropy.prepare_inputs``) checks the labels' values
before anything else, which on a GPU makes the host wait for the device before the first
logits product is even queued. Here the check is queued on the device and read later: the
forward pass reads it once the first product is queued, so the device is not left idle
while the host waits, and before anything computed from the labels leaves the op.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from reference.causal_lm_loss import shift_labels
from reference.linear_cross_entropy import LossOptions, bad_label_error, bad_labels, check_inputs


class LabelCheck:
    """Whether a label lies outside ``[0, V)`` and is not ``ignore_index``, and how many
    targets are not ``ignore_index``: reduced on the labels' device, read by the host once,
    by ``read()``.

    Reading waits for the device. The copy of the two numbers to the host is queued behind
    the work already queued (on CUDA into pinned memory, without waiting), so a caller can
    queue more work before it reads.
    """

    def __init__(self, labels: Tensor, targets: Tensor, vocab: int, ignore_index: int) -> None:
        self._labels, self._vocab, self._ignore_index = labels, vocab, ignore_index
        summary = torch.stack([bad_labels(labels, vocab, ignore_index).any().long(), (targets != ignore_index).sum()])
        self._ready = None
        if summary.is_cuda:
            self._host = torch.empty(2, dtype=torch.long, device="cpu", pin_memory=True).copy_(summary, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(summary.device))
        else:
            self._host = summary
        self._valid_tokens: int | None = None

    def read(self) -> int:
        """The number of valid targets; raises ``ValueError`` naming a bad label instead."""
        if self._valid_tokens is None:
            if self._ready is not None:
                self._ready.synchronize()
            any_bad, valid_tokens = self._host.tolist()
            if any_bad:
                first = self._labels[bad_labels(self._labels, self._vocab, self._ignore_index)][0].item()
                raise bad_label_error(first, self._vocab, self._ignore_index)
            self._valid_tokens = valid_tokens
        return self._valid_tokens


@dataclass(frozen=True)
class TileProblem:
    """``hidden (N, D)``, ``weight (V, D)`` and ``bias (V,)`` contiguous for the kernels and
    cuBLAS, and the caller's ``labels`` (int64, on hidden's device), from which ``targets
    (N,)`` and ``label_check`` are made when first used."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    shift: bool
    ignore_index: int

    @property
    def batch_shape(self) -> torch.Size:
        """The labels' shape: that of ``reduction='none'`` losses and of the lse."""
        return self.labels.shape

    @cached_property
    def targets(self) -> Tensor:
        """``(N,)`` int64, contiguous: the labels, shifted when ``shift``."""
        targets = shift_labels(self.labels, ignore_index=self.ignore_index) if self.shift else self.labels
        return targets.reshape(-1).contiguous()

    @cached_property
    def label_check(self) -> LabelCheck:
        """The labels' check, queued on the device when first used."""
        return LabelCheck(self.labels, self.targets, self.weight.shape[0], self.ignore_index)

    @property
    def valid_tokens(self) -> int:
        """Read on the host with the labels' check (the first time, a wait for the device)."""
        return self.label_check.read()


def tile_problem(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    options: LossOptions,
    *,
    shift: bool,
    num_items_in_batch: Tensor | float | None,
) -> TileProblem:
    """The contract's checks (``check_inputs``) and flattening, with the labels' values
    checked later (``TileProblem.label_check``): the caller must read that check before it
    returns anything computed from these labels. A copy only for non-contiguous inputs."""
    check_inputs(hidden, weight, labels, bias, options, shift=shift, num_items_in_batch=num_items_in_batch)
    return TileProblem(
        hidden=hidden.reshape(-1, hidden.shape[-1]).contiguous(),
        weight=weight.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        labels=labels.to(device=hidden.device, dtype=torch.long),
        shift=shift,
        ignore_index=options.ignore_index,
    )
