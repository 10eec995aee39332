"""The bytes a loss moves over its logit-sized tensors, counted while it runs on the CPU.

On a GPU the loss is bound by memory traffic, and most of it is on the ``(rows, V)``
tensors: the logits, their copies, their gradients. ``logit_passes`` runs a forward and
backward pass and lists every operation that reads or writes such a tensor, with the bytes:

* a torch operation is seen at the dispatcher (``TorchDispatchMode``), after autograd, so the
  backward's operations are listed too. Every logit-sized input counts as read once and every
  output as written once; ``out=`` arguments are written, in-place ones read and written;
  views move nothing. The exception is an operation that picks one entry a row by a target
  index (``nll_loss``, ``gather``, an in-place ``scatter``): it reads (and writes) one entry
  of each logit-sized argument a row, not the row; a new output is still written whole.
* a Triton kernel under the interpreter (``TRITON_INTERPRET=1``) is seen through the
  interpreter's loads and stores: the bytes of every unmasked element of every ``tl.load``
  and ``tl.store``, all tensors included (a kernel's few numbers per row add
  ``O(rows)``, small beside the logits). This reads the interpreter's builder, an internal of
  the pinned Triton; the tests check the count against kernels of known traffic.

What is counted is each operation's nominal traffic; on a GPU a cache can save some of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

# Operations that take (rows, V) values and an index per row and touch one entry a row of them.
ONE_ENTRY_A_ROW = frozenset({"nll_loss_forward", "nll_loss_backward", "gather", "scatter_", "scatter_add_", "index_put_"})


@dataclass(frozen=True)
class Pass:
    """One operation's traffic on logit-sized tensors: ``op`` (an aten operation or a Triton
    kernel's name), bytes ``read`` and ``written``."""

    op: str
    read: int
    written: int


def _is_logits(t: object, vocab: int, hidden_dim: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and vocab in t.shape and hidden_dim not in t.shape


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Recorder(TorchDispatchMode):
    def __init__(self, vocab: int, hidden_dim: int):
        super().__init__()
        self.vocab, self.hidden_dim = vocab, hidden_dim
        self.passes: list[Pass] = []

    def logits(self, t: object) -> bool:
        if not _is_logits(t, self.vocab, self.hidden_dim):
            return False
        if t.device.type != "cpu":
            raise ValueError(f"logit_passes counts CPU tensors only, got one on {t.device}")
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or torch.Tag.inplace_view in func.tags:
            return out
        name = func._schema.name.split("::")[-1]
        values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        read = written = 0
        mutated = False
        for argument in func._schema.arguments:
            for t in tree_flatten(values.get(argument.name))[0]:
                if not self.logits(t):
                    continue
                writes = argument.alias_info is not None and argument.alias_info.is_write
                mutated |= writes
                touched = t.shape[0] * t.element_size() if name in ONE_ENTRY_A_ROW else _bytes(t)
                if not (writes and argument.is_out):
                    read += touched
                if writes:
                    written += touched
        if not mutated:  # a functional operation: its outputs are new tensors
            written += sum(_bytes(t) for t in tree_flatten(out)[0] if self.logits(t))
        if read or written:
            self.passes.append(Pass(name, read, written))
        return out


@contextlib.contextmanager
def _count_interpreted_kernels(passes: list[Pass]) -> Iterator[None]:
    """Each interpreted Triton launch in the block becomes one ``Pass`` (its loads and stores),
    and the torch operations the interpreter runs to launch it are not recorded."""
    from triton.runtime import interpreter

    builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
    launch, load, store = executor.__call__, builder.create_masked_load, builder.create_masked_store
    moved = {"read": 0, "written": 0}

    def unmasked_bytes(ptrs, mask) -> int:
        return int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def counted_load(ptrs, mask, *args):
        moved["read"] += unmasked_bytes(ptrs, mask)
        return load(ptrs, mask, *args)

    def counted_store(ptrs, value, mask, *args):
        moved["written"] += unmasked_bytes(ptrs, mask)
        return store(ptrs, value, mask, *args)

    def counted_launch(self, *args, **kwargs):
        moved.update(read=0, written=0)
        with _disable_current_modes():
            result = launch(self, *args, **kwargs)
        passes.append(Pass(self.fn.__name__, moved["read"], moved["written"]))
        return result

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    executor.__call__ = counted_launch
    try:
        yield
    finally:
        executor.__call__ = launch
        builder.create_masked_load, builder.create_masked_store = load, store


def logit_passes(fn: Callable[[], object], vocab: int, hidden_dim: int) -> list[Pass]:
    """Run ``fn()`` (typically a loss's forward and ``.backward()``) and list, in order, every
    torch operation and interpreted Triton kernel that reads or writes a logit-sized tensor:
    a 2-D CPU tensor with a dimension of ``vocab`` entries and none of ``hidden_dim`` (which
    tells the head's weight ``(V, D)`` and its gradient apart: no row count may equal
    ``hidden_dim``, nor ``vocab``).

    Triton kernels are counted only under the interpreter; a kernel compiled for a GPU would
    be invisible, so a logit-sized tensor on another device raises ``ValueError``.
    """
    if vocab == hidden_dim:
        raise ValueError(f"vocab and hidden_dim must differ to tell logits from the weight, both are {vocab}")
    recorder = _Recorder(vocab, hidden_dim)
    with _count_interpreted_kernels(recorder.passes), recorder:
        fn()
    return recorder.passes
