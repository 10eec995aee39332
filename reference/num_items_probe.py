"""Does a model really divide its loss by ``num_items_in_batch``? Two ways to tell.

transformers' Trainer decides ``model_accepts_loss_kwargs`` from the class attribute
``accepts_loss_kwargs`` if the model has one, otherwise from "``forward`` takes
``**kwargs``". When that decision is True, Trainer passes the step's token count and skips
its own division by the accumulation steps, so a forward that takes ``**kwargs`` but
ignores the count inflates the loss and the gradient (see
:mod:`reference.gradient_accumulation`).

- Statically: read the forward's source (``inspect`` + ``ast``, nothing executed) and look
  for a call that hands the count on (``**kwargs`` or ``num_items_in_batch=...``) to a
  callable taking a ``num_items_in_batch`` parameter, such as ``self.loss_function``
  (``ForCausalLMLoss``). ``super().forward(...)`` calls are followed into the parent class.
- Behaviourally: run the model twice on the same small random batch with two counts,
  ``n`` and ``2n``. A loss that is a sum divided by the count halves exactly.

The behavioural answer is the measurement, so it decides whether the model uses the count;
the static one explains why.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from dataclasses import dataclass

import torch
from torch import nn

from reference.causal_lm_loss import IGNORE_INDEX, count_target_tokens
from reference.model_probing import evaluating, loss_of

COUNT = "num_items_in_batch"


@dataclass(frozen=True)
class ProbeResult:
    """Static and behavioural verdicts on one model, and Trainer's decision for it.

    ``static``: the forward's source routes the count into a loss that takes it.
    ``behavioural``: the loss halved when the count doubled.
    ``accepts_loss_kwargs``: Trainer's ``model_accepts_loss_kwargs`` for this model (None
    when Trainer could not decide: the forward has no readable signature).
    Each verdict comes with a one-line human-readable reason. ``loss_ratio`` is the
    measured ``loss(n) / loss(2n)``, None when the model gave no loss for the count.
    """

    static: bool
    behavioural: bool
    accepts_loss_kwargs: bool | None
    static_reason: str
    behavioural_reason: str
    decision_reason: str
    loss_ratio: float | None = None

    @property
    def uses_num_items_in_batch(self) -> bool:
        """Whether the model's loss divides by the count: the behavioural measurement."""
        return self.behavioural

    @property
    def trainer_decision_right(self) -> bool:
        """Whether Trainer's ``model_accepts_loss_kwargs`` matches what the model does.

        True when Trainer hands the count exactly to models that divide by it. A wrong True
        inflates loss and gradient by the accumulation steps; a wrong False falls back to
        the mean of per-micro-batch means.
        """
        return self.accepts_loss_kwargs is not None and self.accepts_loss_kwargs == self.uses_num_items_in_batch


def trainer_accepts_loss_kwargs(model: nn.Module) -> tuple[bool | None, str]:
    """Trainer's ``model_accepts_loss_kwargs`` decision for ``model``, and why.

    The rule of ``Trainer.__init__``: unwrap a PEFT model, then take its
    ``accepts_loss_kwargs`` attribute if it has one (class or instance), else test whether
    ``forward`` takes ``**kwargs``. Returns ``(None, reason)`` when the forward has no
    readable signature.
    """
    from transformers.trainer_utils import unwrap_peft_model

    _check_module(model)
    unwrapped = unwrap_peft_model(model)
    if hasattr(unwrapped, "accepts_loss_kwargs"):
        value = unwrapped.accepts_loss_kwargs
        return value, f"accepts_loss_kwargs attribute is {value!r}"
    try:
        parameters = inspect.signature(unwrapped.forward).parameters.values()
    except (TypeError, ValueError) as error:
        return None, f"forward has no readable signature ({error})"
    has_var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return has_var_keyword, "forward takes **kwargs" if has_var_keyword else "forward takes no **kwargs"


def static_routes_num_items(model: nn.Module) -> tuple[bool, str]:
    """Whether ``model.forward``'s source hands ``num_items_in_batch`` to a loss taking it.

    A call counts when it passes the forward's ``**kwargs`` (not stripped of the count by
    ``kwargs.pop``/``del``) or an explicit ``num_items_in_batch=`` keyword, and its callee,
    resolved on the model (``self.x``) or in the forward's module globals, names a
    ``num_items_in_batch`` parameter. Reads source only; executes nothing of the model.
    """
    _check_module(model)
    return _static_routes(model, model.forward)


def probe_num_items_in_batch(
    model: nn.Module, *, batch_size: int = 2, seq_len: int = 8, seed: int = 0
) -> ProbeResult:
    """Probe ``model`` statically and behaviourally and record Trainer's decision for it.

    The behavioural probe draws ``input_ids (batch_size, seq_len)`` uniformly from the
    config's vocabulary (its own generator: the global RNG is untouched), uses them as
    labels with the last position of row 0 ignored, and calls ``model(input_ids=...,
    labels=..., num_items_in_batch=c)`` with ``c = n`` and ``c = 2 n`` (0-d int64 tensors on
    the model's device, as Trainer passes them, ``n`` the target count after the shift).
    It passes when ``loss(n) / loss(2 n) = 2`` to float32 precision (relative 1e-5).
    All modules run in eval mode (no dropout, so the two calls differ only in the count)
    under ``torch.no_grad``; every module's train/eval mode is restored afterwards and no
    parameter, buffer or gradient changes.
    """
    _check_module(model)
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
    static, static_reason = static_routes_num_items(model)
    ratio, failure = _loss_ratio(model, batch_size, seq_len, seed)
    behavioural = ratio is not None and math.isclose(ratio, 2.0, rel_tol=1e-5)
    if ratio is None:
        behavioural_reason = failure
    else:
        verdict = " (divides by the count)" if behavioural else ", not 2"
        behavioural_reason = f"loss(n) / loss(2n) = {ratio:.6f}{verdict}"
    accepts, decision_reason = trainer_accepts_loss_kwargs(model)
    return ProbeResult(static, behavioural, accepts, static_reason, behavioural_reason, decision_reason, ratio)


def _check_module(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


# ---- static ------------------------------------------------------------------------------


def _static_routes(model: nn.Module, forward) -> tuple[bool, str]:
    function = inspect.unwrap(getattr(forward, "__func__", forward))
    name = getattr(function, "__qualname__", "forward")
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError) as error:
        return False, f"{name}: source unavailable ({type(error).__name__})"
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False, f"{name}: source is not a function definition"
    var_keyword = definition.args.kwarg.arg if definition.args.kwarg else None
    if var_keyword is not None and _strips_count(definition, var_keyword):
        return False, f"{name} removes {COUNT} from **{var_keyword}"

    for call in (node for node in ast.walk(definition) if isinstance(node, ast.Call)):
        passes = _passes_count(call, var_keyword)
        if passes is None:
            continue
        callee_text = ast.unparse(call.func)
        if _is_super_call(call.func):
            # The parent lies strictly later in the MRO, so following super() terminates.
            parent = _parent_method(model, function, call.func.attr)
            if parent is None:
                continue
            routes, reason = _static_routes(model, parent)
            if routes:
                return True, f"{name} passes {passes} to {callee_text}; {reason}"
            continue
        callee = _resolve(call.func, model, function)
        if callee is not None and _takes_count(callee):
            target = getattr(callee, "__qualname__", type(callee).__name__)
            return True, f"{name} passes {passes} to {callee_text} ({target}), which takes {COUNT}"
    if var_keyword is None:
        return False, f"{name} takes no **kwargs and passes no {COUNT} to a loss"
    return False, f"{name} takes **{var_keyword} but passes neither it nor {COUNT} to a loss taking {COUNT}"


def _strips_count(definition: ast.AST, var_keyword: str) -> bool:
    """``kwargs.pop("num_items_in_batch", ...)`` or ``del kwargs["num_items_in_batch"]``."""
    for node in ast.walk(definition):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "pop"
            and _is_name(node.func.value, var_keyword)
            and node.args
            and _is_count_constant(node.args[0])
        ):
            return True
        if isinstance(node, ast.Delete) and any(
            isinstance(target, ast.Subscript)
            and _is_name(target.value, var_keyword)
            and _is_count_constant(target.slice)
            for target in node.targets
        ):
            return True
    return False


def _passes_count(call: ast.Call, var_keyword: str | None) -> str | None:
    """How ``call`` hands the count on: ``'**kwargs'``, ``'num_items_in_batch='``, or None."""
    for keyword in call.keywords:
        if keyword.arg is None and var_keyword is not None and _is_name(keyword.value, var_keyword):
            return f"**{var_keyword}"
        if keyword.arg == COUNT and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is None):
            return f"{COUNT}="
    return None


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _is_count_constant(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == COUNT


def _is_super_call(func: ast.AST) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and _is_name(func.value.func, "super")
        and not func.value.args
    )


def _parent_method(model: nn.Module, function, attribute: str):
    """``super().<attribute>`` as seen from the class that defines ``function``."""
    for index, cls in enumerate(type(model).__mro__):
        defined = cls.__dict__.get(function.__name__)
        if defined is not None and inspect.unwrap(defined) is function:
            for parent in type(model).__mro__[index + 1 :]:
                if attribute in parent.__dict__:
                    return parent.__dict__[attribute]
            return None
    return None


def _resolve(func: ast.AST, model: nn.Module, function):
    """The object a call's callee names: ``self.a.b`` on the model, ``a.b`` in the forward's
    module globals. None when the expression is anything else or does not resolve."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    if func.id == "self":
        target = model
    elif func.id in function.__globals__:
        target = function.__globals__[func.id]
    else:
        return None
    for part in reversed(parts):
        try:
            target = getattr(target, part)
        except AttributeError:
            return None
    return target


def _takes_count(callee) -> bool:
    try:
        return COUNT in inspect.signature(callee).parameters
    except (TypeError, ValueError):
        return False


# ---- behavioural -------------------------------------------------------------------------


def _loss_ratio(model: nn.Module, batch_size: int, seq_len: int, seed: int) -> tuple[float | None, str]:
    """``(loss(n) / loss(2n), "")``, or ``(None, why)`` when no finite, non-zero pair was measured."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no config to read the vocabulary size from")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"model config has no usable vocab_size (got {vocab_size!r})")
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("model has no parameters to take the device from")
    device = parameter.device

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    labels = input_ids.clone()
    labels[0, -1] = IGNORE_INDEX
    count = count_target_tokens(labels)

    try:
        with evaluating(model), torch.no_grad():
            losses = [
                loss_of(model(input_ids=input_ids, labels=labels, **{COUNT: count * factor})) for factor in (1, 2)
            ]
    except TypeError as error:
        if COUNT not in str(error):
            raise
        return None, f"forward rejects {COUNT} ({error})"

    if any(loss is None for loss in losses):
        return None, "forward returned no loss"
    first, second = (loss.item() for loss in losses)
    if not (math.isfinite(first) and math.isfinite(second)) or second == 0.0:
        return None, f"loss not finite and non-zero: loss(n) = {first:.6g}, loss(2n) = {second:.6g}"
    return first / second, ""
