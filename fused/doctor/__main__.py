"""``python -m fused.doctor MODEL``: the loss doctor from a terminal.

MODEL is a model directory (``config.json``, with weights if present: ``from_pretrained``,
else random weights from the config), a ``config.json`` file, or a model type name
(``llama``: transformers' default config, full size unless ``--set`` shrinks it). With
``--text`` the batch is those texts, tokenized by the directory's tokenizer and right-padded
with -100 labels on the padding, as a correct collator makes it; without, random tokens.
Exit status 1 when a check finds a problem.

    python -m fused.doctor path/to/model --text "Hello there." "A longer second text." --patch
    python -m fused.doctor llama --set hidden_size=64 intermediate_size=128 num_hidden_layers=2 vocab_size=1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fused.doctor.checklist import diagnose
from fused.doctor.findings import Status
from reference.causal_lm_loss import IGNORE_INDEX


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value pairs, got {pair!r}")
        overrides[key] = _value(value)
    return overrides


def load(model: str, overrides: dict[str, Any]):
    """``(model, tokenizer or None)`` for the MODEL argument (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if path.is_dir():
        config = AutoConfig.from_pretrained(path, **overrides)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        loaded = (
            AutoModelForCausalLM.from_pretrained(path, config=config)
            if has_weights
            else AutoModelForCausalLM.from_config(config)
        )
        tokenizer = AutoTokenizer.from_pretrained(path) if any(path.glob("tokenizer*")) else None
        return loaded, tokenizer
    if path.is_file():
        values = {**json.loads(path.read_text()), **overrides}
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    else:
        try:
            config = AutoConfig.for_model(model, **overrides)
        except ValueError as error:
            raise SystemExit(f"{model!r} is neither a directory, a config file nor a model type: {error}") from error
    return AutoModelForCausalLM.from_config(config), None


def text_batch(tokenizer, texts: list[str]) -> dict:
    """The texts right-padded, labels equal to input_ids with -100 on the padding."""
    if tokenizer is None:
        raise SystemExit("--text needs a model directory with a tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model directory, a config.json file or a model type name")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (JSON values)")
    parser.add_argument("--text", nargs="*", help="texts for the batch (needs the directory's tokenizer)")
    parser.add_argument("--patch", action="store_true", help="apply fused.patch_model first")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", dest="pretrained", action="store_const", const=True)
    weights.add_argument("--random-weights", dest="pretrained", action="store_const", const=False)
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model, _overrides(args.set))
    batch = text_batch(tokenizer, args.text) if args.text else None
    if args.patch:
        from fused.hf.patch import patch_model

        print(patch_model(model))
    diagnosis = diagnose(model, batch, pretrained=args.pretrained)
    print(diagnosis)
    return 1 if diagnosis.with_status(Status.PROBLEM) else 0


if __name__ == "__main__":
    sys.exit(main())
