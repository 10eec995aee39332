"""End to end: one training step (forward + backward) of a transformers causal LM.

Models with the shapes of real ones, randomly initialised from configs (no weights are
downloaded), bf16, SDPA attention. The batch is ``tokens // seq`` rows of ``seq`` random
token ids, with the first quarter of each row's labels ignored. Variants: ``stock``,
``fused`` (``fused.patch_model``) and ``liger_flce`` (Liger's patch with only its fused
linear cross entropy on), and ``body_only``: the decoder's forward and backward with no head
and no loss, a scalar of its last hidden states in their place. That is the floor under any
loss implementation's step: what it must keep (the activations, the decoder's gradients)
without anything of its own. Peak memory is above the weights: it includes the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bench.kernels import MIB, Record, Refused, RunSettings, guarded
from bench.measure import measure
from bench.problems import IGNORE_INDEX

# Architecture fields of each model; the vocabulary is what the loss sees.
MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": (
        "llama",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    ),
    # For the CPU smoke run only.
    "tiny-llama": (
        "llama",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=160, tie_word_embeddings=True),
    ),
}
VARIANTS = ("stock", "body_only", "fused", "liger_flce")
IGNORED_PREFIX = 0.25


def build_model(name: str, *, max_positions: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised ``name`` model (a key of ``MODEL_SHAPES``), seeded, in train mode."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_SHAPES)}")
    import transformers

    model_type, fields = MODEL_SHAPES[name]
    config = transformers.AutoConfig.for_model(model_type, max_position_embeddings=max_positions, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).train()


def _patch_fused(model: torch.nn.Module) -> object:
    import fused

    report = fused.patch_model(model)
    if getattr(report, "patched", True) is False:
        raise Refused(str(report))
    return report  # its text, read after the timing, counts the calls that took the fused path


def _patch_liger(model: torch.nn.Module) -> object:
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

    patch = {"llama": apply_liger_kernel_to_llama, "qwen2": apply_liger_kernel_to_qwen2}[model.config.model_type]
    # model= patches this instance only; every other kernel off, so the loss alone differs.
    patch(rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
    return "liger fused_linear_cross_entropy only"


# Each patches a model in place and returns what to record as its note (read after the timing).
PATCHES: dict[str, Callable[[torch.nn.Module], object] | None] = {
    "stock": None,
    "body_only": None,
    "fused": _patch_fused,
    "liger_flce": _patch_liger,
}


def unavailable_reason(variant: str) -> str | None:
    """Why ``variant``'s patch cannot be applied here (its package is missing), or None."""
    try:
        if variant == "fused":
            import fused

            fused.patch_model
        elif variant == "liger_flce":
            from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2  # noqa: F401
    except Exception as e:  # a broken install fails in many ways, not only ImportError
        return f"{type(e).__name__}: {e}"[:300]
    return None


def batch(vocab: int, *, tokens: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` ``(tokens // seq, seq)``; the first quarter of each row of
    labels is ``IGNORE_INDEX`` (a prompt)."""
    if tokens % seq or tokens <= 0:
        raise ValueError(f"tokens ({tokens}) must be a positive multiple of seq ({seq})")
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (tokens // seq, seq), device=device)
    labels = ids.clone()
    labels[:, : int(seq * IGNORED_PREFIX)] = IGNORE_INDEX
    return ids, labels


def _time_step(name: str, variant: str, tokens: int, seq: int, settings: RunSettings) -> Record:
    model = build_model(name, max_positions=seq, device=settings.device, dtype=settings.dtype)
    patch = PATCHES[variant]
    note = patch(model) if patch is not None else variant
    ids, labels = batch(model.config.vocab_size, tokens=tokens, seq=seq, device=settings.device)

    def step() -> torch.Tensor:
        if variant == "body_only":
            loss = model.get_decoder()(input_ids=ids).last_hidden_state.float().mean()
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    t = measure(step, lambda: model.zero_grad(set_to_none=True), settings.device, reps=settings.reps, warmup=settings.warmup)
    return {
        "ms": round(t.ms, 3),
        "peak_mib": None if t.peak_bytes is None else round(t.peak_bytes / MIB, 1),
        "loss": float(t.last),
        "note": str(note)[:500],
    }


def measure_model(
    name: str, variants: tuple[str, ...], settings: RunSettings, *, tokens: int, seq: int, emit: Callable[[Record], None]
) -> None:
    """Time a training step of model ``name`` for each of ``variants``; ``emit`` each record."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    fields = MODEL_SHAPES[name][1]
    for variant in variants:
        record: Record = {
            "bench": "e2e",
            "model": name,
            "variant": variant,
            "tokens": tokens,
            "seq": seq,
            "hidden": fields["hidden_size"],
            "vocab": fields["vocab_size"],
        }
        missing, stop = unavailable_reason(variant), settings.stop_reason()
        if missing is not None:
            emit({**record, "status": "unavailable", "reason": missing})
        elif stop is not None:
            emit({**record, "status": "skipped", "reason": stop})
        else:
            emit(guarded(record, lambda: _time_step(name, variant, tokens, seq, settings), settings.device))
