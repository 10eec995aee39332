"""One TRL ``SFTTrainer`` training step (forward, backward, optimizer step): TRL's own fused
LM head against the same trainer on a patched model.

``python -m bench.trl_step`` builds a randomly initialised model from a config
(``bench.e2e.MODEL_SHAPES``, Llama-3.2-1B's shape by default; nothing is downloaded) in
bfloat16, a word-level tokenizer over its whole vocabulary and a text dataset of random
words made locally, and an ``SFTTrainer`` around it (which installs TRL's fused head). The
variants:

- ``trl``: that trainer as TRL builds it, its head computing the per-token outputs;
- ``fused``: the model patched (``fused.patch_model``) before the trainer is built, so TRL's
  head wraps the patch and its ``fused_lm_head=True`` calls are served by the project's kernel.

Each timed step is ``trainer.training_step`` on one batch from the trainer's own dataloader
(forward and backward) and the trainer's optimizer's ``step``; ``zero_grad`` between steps is
not timed. ``bench.measure`` takes the median
of ``--reps`` after ``--warmup`` and the peak memory above what was allocated before the timed
steps (weights, optimizer state). One JSON line: per variant the median ``ms``, ``peak_mib``
(None off CUDA), the last step's ``loss`` and, for ``fused``, the patch's call counters (the
kernel ran when ``fused`` counts every step). ``--tiny`` runs a tiny model on the CPU in
float32, for the test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from bench.e2e import MODEL_SHAPES, build_model
from bench.kernels import MIB
from bench.measure import measure

VARIANTS = ("trl", "fused")


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose word ``t{i}`` is token ``i``, split on whitespace: text made
    of these words tokenizes to exactly its words, with no hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.pad_token, tokenizer.eos_token = "t0", "t2"
    return tokenizer


def text_dataset(vocab: int, *, rows: int, words: int) -> Any:
    """``rows`` texts of ``words`` random words each (seeded), as ``datasets.Dataset``."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (rows, words), generator=generator)
    return Dataset.from_dict({"text": [" ".join(f"t{i}" for i in row.tolist()) for row in ids]})


def sft_trainer(model: torch.nn.Module, *, batch: int, seq: int, output_dir: str, cpu: bool) -> Any:
    """An ``SFTTrainer`` over ``batch * 2`` texts of ``seq`` words (``max_length=seq``: ``seq``
    tokens a row), with the optimizer TRL configures by default."""
    from trl import SFTConfig, SFTTrainer

    vocab = model.config.vocab_size
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=batch, max_length=seq, report_to=[], use_cpu=cpu,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True,
    )
    dataset = text_dataset(vocab, rows=batch * 2, words=seq)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=word_tokenizer(vocab))


def time_variant(variant: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The record of one variant: median ms, peak MiB, last loss, and the patch's counters."""
    import fused

    model = build_model(args.model, max_positions=args.seq, device=device, dtype=dtype)
    report = None
    if variant == "fused":
        report = fused.patch_model(model)
        if not report.patched:
            return {"refused": report.reason}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sft_trainer(model, batch=args.batch, seq=args.seq, output_dir=output_dir, cpu=device.type == "cpu")
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # what train() sets before its steps
        inputs = next(iter(trainer.get_train_dataloader()))

        def step() -> torch.Tensor:
            loss = trainer.training_step(trainer.model, inputs)
            trainer.optimizer.step()
            return loss.detach()

        timing = measure(
            step, lambda: trainer.optimizer.zero_grad(set_to_none=True), device, reps=args.reps, warmup=args.warmup
        )
    record = {
        "ms": round(timing.ms, 3),
        "peak_mib": None if timing.peak_bytes is None else round(timing.peak_bytes / MIB, 1),
        "loss": float(timing.last),
        "tokens": int(inputs["input_ids"].numel()),
    }
    if report is not None:
        calls = report.calls
        record["calls"] = {"fused": calls.fused, "stock": calls.stock, "fallback": calls.fallback}
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.trl_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--batch", type=int, default=2, help="rows per step")
    p.add_argument("--seq", type=int, default=4096, help="tokens per row")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {VARIANTS}")
    p.add_argument("--tiny", action="store_true", help="tiny-llama on the CPU in float32, 2 x 32 tokens (a test)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the variants and print (and return) one JSON line."""
    args = parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose among {VARIANTS}")
    if args.tiny:
        args.model, args.seq = "tiny-llama", 32
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("no CUDA device: run with --tiny on the CPU")
    import transformers
    import trl

    result: dict[str, Any] = {
        "bench": "trl_sft_step", "model": args.model, "batch": args.batch, "seq": args.seq, "dtype": str(dtype),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "reps": args.reps, "warmup": args.warmup,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    for variant in variants:
        result[variant] = time_variant(variant, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
