"""An output head as the operands of one linear map: ``head(x) == F.linear(hidden, weight, bias)``.

The fused loss takes a hidden state and a weight, never a module. A plain ``nn.Linear``
head is its own weight and bias. PEFT wraps the head in two ways that reading
``head.weight`` gets wrong:

- LoRA (``lora.Linear``): the output is ``x W^T + b + sum_a s_a * B_a(A_a(dropout_a(x)))``
  over the active adapters. ``.weight`` is the frozen base weight, so a loss built on it
  never trains the adapter. The same map is one GEMM over concatenated operands,
  ``hidden = [x, s_1 * A_1(dropout_1(x)), ...]`` and ``weight = [W | B_1 | ...]``, and autograd
  carries the gradient to ``A_a`` and ``B_a`` through the concatenation.
- ``modules_to_save``: a ``ModulesToSaveWrapper`` that routes to a trainable copy of the
  head for the active adapter, or to the original when adapters are disabled.

PEFT is recognised by the attributes its modules carry (no import of peft), and the
routing mirrors its forward: disabled or merged adapters use the base layer alone. LoRA
variants (DoRA ...), LoRA biases and non-Linear heads are refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

class UnsupportedHead(ValueError):
    """The head is not a linear map this module can express as ``F.linear`` operands."""


@dataclass(frozen=True)
class HeadOperands:
    """``head(x) == F.linear(hidden, weight, bias)``: ``hidden (..., D')``, ``weight (V, D')``,
    ``bias (V,)`` or None, all in the base weight's dtype. ``D' = D`` plus the LoRA ranks."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


def _is_modules_to_save(head: nn.Module) -> bool:
    return hasattr(head, "original_module") and hasattr(head, "modules_to_save")


def _is_lora_linear(head: nn.Module) -> bool:
    return all(hasattr(head, name) for name in ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling"))


def _is_plain_linear(head: nn.Module) -> bool:
    # A subclass that overrides forward computes something we cannot see.
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _routed_module(head: nn.Module) -> nn.Module:
    """The module a ``ModulesToSaveWrapper`` forwards to, as its forward chooses it."""
    adapters = list(head.active_adapters)
    if head.disable_adapters or not adapters or any(a not in head.modules_to_save for a in adapters):
        return head.original_module
    return head.modules_to_save[adapters[0]]


def head_kind(head: nn.Module, input_embeddings: nn.Module | None) -> str:
    """``'lora'``, ``'modules_to_save'``, ``'tied'`` (weight shared with the input embeddings)
    or ``'plain'``; raises ``UnsupportedHead`` for anything ``fold_head`` cannot express."""
    if _is_modules_to_save(head):
        head_kind(_routed_module(head), None)
        return "modules_to_save"
    if _is_lora_linear(head):
        head_kind(head.base_layer, None)
        _lora_adapters(head)
        return "lora"
    if not _is_plain_linear(head):
        raise UnsupportedHead(f"the output head is a {type(head).__name__}, not an nn.Linear or a PEFT wrapper of one")
    embedding_weight = getattr(input_embeddings, "weight", None)
    return "tied" if embedding_weight is not None and head.weight is embedding_weight else "plain"


def _lora_adapters(head: nn.Module) -> list[str]:
    """Active adapters that contribute to a ``lora.Linear``'s output, checked to be vanilla LoRA."""
    if head.disable_adapters or head.merged:
        return []
    names = [name for name in head.active_adapters if name in head.lora_A]
    for name in names:
        if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
            raise UnsupportedHead(f"LoRA adapter {name!r} on the head is a variant (DoRA ...), not plain LoRA")
        if head.lora_A[name].bias is not None or head.lora_B[name].bias is not None:
            raise UnsupportedHead(f"LoRA adapter {name!r} on the head has a bias (lora_bias)")
        if not isinstance(head.lora_A[name], nn.Linear) or not isinstance(head.lora_B[name], nn.Linear):
            raise UnsupportedHead(f"LoRA adapter {name!r} on the head is not made of nn.Linear layers")
    return names


def fold_head(head: nn.Module, hidden: Tensor) -> HeadOperands:
    """The operands of ``head(hidden)`` as one linear map; ``hidden (..., D)``.

    Runs the LoRA dropout (once per call, as the head itself would), so in training mode
    two calls draw different masks, exactly like two calls of the head.
    """
    if _is_modules_to_save(head):
        return fold_head(_routed_module(head), hidden)
    if _is_lora_linear(head):
        base = fold_head(head.base_layer, hidden)
        dtype = base.weight.dtype
        hiddens, weights = [base.hidden], [base.weight]
        for name in _lora_adapters(head):
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]
            x = head.lora_dropout[name](hidden.to(lora_a.weight.dtype))
            hiddens.append((lora_a(x) * head.scaling[name]).to(dtype))
            weights.append(lora_b.weight.to(dtype))
        if len(hiddens) == 1:
            return base
        return HeadOperands(torch.cat(hiddens, dim=-1), torch.cat(weights, dim=1), base.bias)
    if _is_plain_linear(head):
        return HeadOperands(hidden.to(head.weight.dtype), head.weight, head.bias)
    raise UnsupportedHead(f"the output head is a {type(head).__name__}, not an nn.Linear or a PEFT wrapper of one")
