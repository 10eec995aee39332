"""What the loss doctor examines: the model as the training loop calls it, one batch, and the
trainer around them; with the one way every check runs the model.

Every run goes through ``Subject.output``: the model's own forward on (a variant of) the
batch, under ``torch.no_grad`` and with the RNG reseeded, so two runs differ only in their
inputs.
``diagnose`` holds the whole examination inside ``examining``, which puts back module modes,
the RNG state and the patch's call counters afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from fused.hf.patch import _transformers_model, patch_report
from fused.hf.probe import loss_of, probe_inputs, probing

RANDOM_BATCH, RANDOM_LENGTH = 2, 16
# Two runs of the model on inputs that should give the same loss (one document at a time
# against the packed row, a token-type input that changes nothing) agree to this relative
# difference: the rounding of other shapes and mask paths, orders of magnitude below what a
# leaking document or a changed mask moves even a random model's loss.
RERUN_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Subject:
    """``model``: what the training loop calls (a PEFT wrapper stays wrapped); ``batch``: the
    keyword inputs of one batch, tensors on the model's device, ``input_ids (B, T)`` int64 and
    ``labels (B, T)`` int64 among them; ``trainer``: the transformers ``Trainer`` or None;
    ``given``: whether the batch is the user's (False: random tokens drawn here);
    ``pretrained``: whether the weights are trained ones."""

    model: nn.Module
    batch: dict[str, Any]
    trainer: Any | None
    given: bool
    pretrained: bool

    @property
    def transformers_model(self) -> nn.Module:
        """The transformers model inside a PEFT wrapper, or ``model`` itself."""
        return _transformers_model(self.model)

    @property
    def text_config(self) -> Any:
        config = self.transformers_model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    def output(self, inputs: Mapping[str, Any] | None = None, *, training: bool = False, seed: int = 0) -> Any:
        """The model's output on ``inputs`` (default: the batch). ``training`` runs the modules
        in training mode (dropout, training-only branches, the patched fused path); the RNG is
        seeded with ``seed`` first."""
        self.model.train(training)
        try:
            torch.manual_seed(seed)
            return self.model(**(self.batch if inputs is None else inputs))
        finally:
            self.model.eval()

    def loss(self, inputs: Mapping[str, Any] | None = None, *, training: bool = False, seed: int = 0) -> Tensor:
        """The loss of ``output(inputs, training=training, seed=seed)``, a 0-d float tensor.
        Raises ``ValueError`` when the forward returns no loss."""
        loss = loss_of(self.output(inputs, training=training, seed=seed))
        if loss is None:
            raise ValueError(f"{type(self.model).__name__} returned no loss for a batch with labels")
        return loss.detach().float()

    @property
    def tolerance(self) -> float:
        """``RERUN_TOLERANCE`` for the dtype of the model's parameters."""
        return RERUN_TOLERANCE.get(next(self.model.parameters()).dtype, RERUN_TOLERANCE[torch.float32])

    def with_inputs(self, **changes: Any) -> dict[str, Any]:
        """The batch with some inputs replaced or added."""
        return {**self.batch, **changes}


def patch_reports(model: nn.Module) -> list:
    """The patch report of every patched module inside ``model``, each once."""
    reports = {id(r): r for module in model.modules() if (r := patch_report(module)) is not None}
    return list(reports.values())


@contextmanager
def examining(model: nn.Module) -> Iterator[None]:
    """Eval mode, a forked RNG and no autograd for the examination; every module's mode, the
    RNG state and the patch counters are put back afterwards."""
    counters = [(report.calls, replace(report.calls)) for report in patch_reports(model)]
    with probing(model), torch.no_grad():
        try:
            yield
        finally:
            for live, saved in counters:  # in place: callers may hold the counters object
                vars(live).update(vars(saved))


def _check_batch(batch: Any) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of model inputs (a dict), got {type(batch).__name__}")
    for name in ("input_ids", "labels"):
        value = batch.get(name)
        if not isinstance(value, Tensor):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise ValueError(f"batch[{name!r}] must be a tensor (B, T): it is {found}")
        if value.dim() != 2 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(
                f"batch[{name!r}] must be an integer tensor (B, T), got {value.dtype} {tuple(value.shape)}"
            )
    if batch["labels"].shape != batch["input_ids"].shape:
        raise ValueError(
            f"batch['labels'] has shape {tuple(batch['labels'].shape)}, input_ids {tuple(batch['input_ids'].shape)}"
        )
    if batch["input_ids"].shape[1] < 2:
        raise ValueError("batch['input_ids'] needs at least two positions: one predicts the next")
    return dict(batch)


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _random_batch(model: nn.Module) -> dict[str, Tensor]:
    """``input_ids (2, 16)`` of the model's ordinary tokens, as labels too."""
    generator = torch.Generator().manual_seed(0)
    input_ids = probe_inputs(_transformers_model(model), generator, RANDOM_BATCH, RANDOM_LENGTH)["input_ids"]
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _first_batch(loader: Any) -> Any:
    """The first batch of ``loader``, leaving no iteration open behind."""
    iterator = iter(loader)
    try:
        return next(iterator)
    finally:
        # accelerate's prepared loaders register with the accelerator's GradientState when
        # iteration starts and leave only when it ends: a loader left registered would count
        # as the active one during training.
        end = getattr(loader, "end", None)
        if callable(end):
            end()


def _is_trainer(value: Any) -> bool:
    has_dataloader = callable(getattr(value, "get_train_dataloader", None))
    return has_dataloader and isinstance(getattr(value, "model", None), nn.Module)


def model_of(model_or_trainer: Any) -> Any:
    """The model a Trainer trains, or the argument itself."""
    return model_or_trainer.model if _is_trainer(model_or_trainer) else model_or_trainer


def subject_of(model_or_trainer: Any, batch: Mapping[str, Any] | None, pretrained: bool | None) -> tuple[Subject, str]:
    """The ``Subject`` for ``diagnose``'s arguments and a description of its batch. Call it
    inside ``examining(model_of(model_or_trainer))``: a trainer's dataloader draws from the RNG."""
    trainer = model_or_trainer if _is_trainer(model_or_trainer) else None
    model = model_of(model_or_trainer)
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose takes a transformers model or Trainer, got {type(model_or_trainer).__name__}")
    config = getattr(_transformers_model(model), "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"{type(model).__name__} is not a transformers model: it has no config or output head")
    if batch is not None:
        given, source = _check_batch(batch), "the batch given"
    elif trainer is not None:
        given = _check_batch(_first_batch(trainer.get_train_dataloader()))
        source = "a batch of the trainer's train dataloader"
    else:
        given, source = None, "random tokens (no batch given)"
    device = next(model.parameters()).device
    inputs = _on_device(given if given is not None else _random_batch(model), device)
    if pretrained is None:
        # from_pretrained (and AutoConfig.from_pretrained) record where the weights came from.
        pretrained = bool(getattr(config, "_name_or_path", ""))
    subject = Subject(model, inputs, trainer, given is not None, pretrained)
    shape = "x".join(map(str, inputs["input_ids"].shape))
    return subject, f"{source}, input_ids {shape}"
