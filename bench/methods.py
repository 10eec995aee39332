"""The methods timed: each a loss function ``fn(hidden (N, D), weight (V, D), labels (N,)) ->
0-d mean loss`` over non-ignored labels (already aligned), or the reason it is unavailable.

Peers are optional imports: a missing package, or a torch without the function, becomes an
entry with ``unavailable`` set, never an exception. The project's kernel is timed at
several budgets of extra bytes above the gradient buffers (its ``memory_budget`` knob),
at explicit tile settings, and as users call it, with no knob set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.problems import IGNORE_INDEX

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]

# In the order they are measured; "fused" expands to one entry per memory setting, after
# Liger, whose measured memory sets one of the budgets.
METHOD_NAMES = (
    "torch_eager",
    "torch_compile",
    "reference_chunked",
    "torch_lce_chunked",
    "liger_flce",
    "cce",
    "cce_exact",
    "trl_fused_head",
    "fused",
)
# The budget measured from Liger's own extra memory at each shape.
LIGER_BUDGET = "liger"
# The kernel as users call it, no memory knob set.
KERNEL_DEFAULT = "default"
# The kernel at its default plan with a precision option beyond stock: knob and its value.
PRECISION_VARIANTS = {
    "float32_logits": ("logits_dtype", torch.float32),
    "float32_weight_sum": ("accumulation_dtype", torch.float32),
}
REFERENCE_CHUNK_ROWS = 1024
# Distinct static shapes a sweep may compile torch.compile for (dynamo's default is 8).
COMPILE_RECOMPILE_LIMIT = 64
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


@dataclass(frozen=True)
class Method:
    """A named loss function with the settings it runs at; ``fn`` is None when unavailable."""

    name: str
    fn: LossFn | None
    params: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None


def eager_loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The transformers path: logits in the input dtype, upcast, then ``F.cross_entropy``."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX)


def _unavailable(name: str, error: BaseException | str) -> Method:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Method(name, None, unavailable=reason[:300])


def _torch_compile() -> Method:
    try:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    except AttributeError:  # older torch: the limit went by another name; leave it
        pass
    return Method("torch_compile", torch.compile(eager_loss, dynamic=False), {"dynamic": False})


def _reference_chunked() -> Method:
    try:
        from reference.chunked_cross_entropy import chunked_linear_cross_entropy
    except ImportError as e:
        return _unavailable("reference_chunked", e)
    return Method(
        "reference_chunked",
        lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_size=REFERENCE_CHUNK_ROWS),
        {"chunk_size": REFERENCE_CHUNK_ROWS},
    )


def _torch_lce_chunked() -> Method:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return _unavailable("torch_lce_chunked", f"torch {torch.__version__} has no F.linear_cross_entropy")
    options = torch.nn.LinearCrossEntropyOptions()
    return Method(
        "torch_lce_chunked",
        lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, options=options),
        {"options": "LinearCrossEntropyOptions()"},
    )


def _liger() -> Method:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # a broken install fails in many ways, not only ImportError
        return _unavailable("liger_flce", e)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return Method("liger_flce", lambda h, w, y: loss(w, h, y))


def _cce(name: str, filter_eps: str | None) -> Method:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        return _unavailable(name, e)
    return Method(
        name,
        lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, shift=False, filter_eps=filter_eps),
        {"filter_eps": filter_eps},
    )


# TRL scores vocabulary tiles of this many columns (trl.trainer.utils.add_fused_lm_head).
TRL_VOCABULARY_CHUNK = 32768


def _trl_kernel_module() -> Any:
    """TRL's ``trl/kernels/chunked_logprob.py`` loaded on its own: importing the ``trl``
    package pulls in ``datasets`` and its trainers, while this module needs only torch (and
    triton on CUDA). Its one relative import, a DeepSpeed ZeRO-3 context, is given a no-op."""
    import contextlib
    import importlib.util
    import pathlib
    import sys
    import types

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("trl is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "kernels" / "chunked_logprob.py"
    package = "_bench_trl"
    for name in (package, f"{package}.kernels", f"{package}.trainer"):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    utils = sys.modules.setdefault(f"{package}.trainer.utils", types.ModuleType(f"{package}.trainer.utils"))
    utils.maybe_gather_lm_head_ctx = lambda *args, **kwargs: contextlib.nullcontext()
    module_spec = importlib.util.spec_from_file_location(f"{package}.kernels.chunked_logprob", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _trl_fused_head() -> Method:
    try:
        from importlib.metadata import version

        function = _trl_kernel_module().ChunkedLogProbFunction
    except Exception as e:
        return _unavailable("trl_fused_head", e)

    def trl_head(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        # As TRL's trainers call it: the valid rows only, no optional outputs; the mean of
        # the negative log-probabilities is the loss.
        valid = labels != IGNORE_INDEX
        log_probs = function.apply(hidden[valid], weight, None, labels[valid], 1.0, TRL_VOCABULARY_CHUNK, None, 1.0, ())[0]
        return -log_probs.sum() / valid.sum().clamp(min=1)

    return Method("trl_fused_head", trl_head, {"trl": version("trl"), "chunk_size": TRL_VOCABULARY_CHUNK})


_BUILDERS: dict[str, Callable[[], Method]] = {
    "torch_eager": lambda: Method("torch_eager", eager_loss),
    "torch_compile": _torch_compile,
    "reference_chunked": _reference_chunked,
    "torch_lce_chunked": _torch_lce_chunked,
    "liger_flce": _liger,
    "cce": lambda: _cce("cce", "high"),
    "cce_exact": lambda: _cce("cce_exact", None),
    "trl_fused_head": _trl_fused_head,
}


def build_methods(names: Sequence[str]) -> list[Method]:
    """The methods among ``names`` other than "fused", in ``METHOD_NAMES`` order."""
    unknown = sorted(set(names) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHOD_NAMES}")
    return [_BUILDERS[name]() for name in METHOD_NAMES if name in names and name != "fused"]


def parse_budget(text: str) -> int | str:
    """``"32MiB"`` -> bytes (units B, KiB, MiB, GiB; a bare number is bytes), or one of the
    words ``"liger"`` (Liger's measured extra memory), ``"default"`` (no knob set) and the
    ``PRECISION_VARIANTS`` (the default plan with that precision option)."""
    text = text.strip()
    if text.lower() in (LIGER_BUDGET, KERNEL_DEFAULT, *PRECISION_VARIANTS):
        return text.lower()
    match = re.fullmatch(r"(\d+)\s*([KMG]iB|B)?", text, flags=re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(
            f"a memory budget is a positive size like 32MiB, 1GiB, 4096, or one of "
            f"{[LIGER_BUDGET, KERNEL_DEFAULT, *PRECISION_VARIANTS]}; got {text!r}"
        )
    return int(match.group(1)) * _UNITS[(match.group(2) or "b").lower()]


def _budget_label(budget_bytes: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if budget_bytes % _UNITS[unit.lower()] == 0:
            return f"{budget_bytes // _UNITS[unit.lower()]}{unit}"
    return f"{budget_bytes}B"


def parse_chunk_setting(text: str) -> int | tuple[int, int]:
    """``"1024"`` -> 1024 rows; ``"1024x16384"`` -> (rows, vocabulary columns); ValueError otherwise."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a chunk setting is ROWS or ROWSxCOLS of positive integers, got {text!r}")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _chunk_name(setting: int | tuple[int, int]) -> str:
    return f"fused@chunk={setting if isinstance(setting, int) else 'x'.join(map(str, setting))}"


def _budget_name(budget: int | str) -> str:
    return f"fused@{budget if isinstance(budget, str) else _budget_label(budget)}"


def fused_methods(
    budgets: Sequence[int | str],
    chunk_sizes: Sequence[int | tuple[int, int]],
    *,
    liger_extra_bytes: int | None,
) -> list[Method]:
    """One entry of ``fused.linear_cross_entropy`` per memory setting.

    ``budgets``: bytes; ``"liger"`` for Liger's measured extra memory at this shape
    (``liger_extra_bytes``; None when Liger was not measured); ``"default"`` for the kernel
    with no knob set. A budget is handed to the kernel's ``memory_budget``, which picks the
    fastest tile whose extra memory fits in it.
    ``chunk_sizes``: explicit settings, ``rows`` (``chunk_size``, the kernel choosing the
    rest) or ``(rows, cols)`` (``chunk_size`` and ``vocab_chunk_size``).
    """
    try:
        import fused

        kernel = fused.linear_cross_entropy
    except Exception as e:
        names = [_budget_name(b) for b in budgets] + [_chunk_name(c) for c in chunk_sizes]
        return [_unavailable(n, e) for n in names]
    def entry(name: str, knobs: dict[str, Any], **params: Any) -> Method:
        plain = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in knobs.items()}
        return Method(name, lambda h, w, y: kernel(h, w, y, **knobs), {**plain, **params})

    out = []
    for budget in budgets:
        if budget == KERNEL_DEFAULT:
            out.append(entry(_budget_name(budget), {}))
            continue
        if budget in PRECISION_VARIANTS:
            knob, value = PRECISION_VARIANTS[budget]
            out.append(entry(_budget_name(budget), {knob: value}))
            continue
        if budget == LIGER_BUDGET and (liger_extra_bytes is None or liger_extra_bytes <= 0):
            out.append(_unavailable(_budget_name(budget), "needs Liger's extra memory measured at this shape"))
            continue
        nbytes = liger_extra_bytes if budget == LIGER_BUDGET else budget
        out.append(entry(_budget_name(budget), {"memory_budget": int(nbytes)}))
    for setting in chunk_sizes:
        rows, cols = setting if isinstance(setting, tuple) else (setting, None)
        out.append(entry(_chunk_name(setting), {"chunk_size": rows, **({} if cols is None else {"vocab_chunk_size": cols})}))
    return out
