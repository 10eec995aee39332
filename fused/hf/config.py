"""The leaves of a transformers config, by dotted path: the one walk every probe of a config uses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def config_leaves(config: Any) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every non-dict value of ``config.to_dict()``, nested configs walked:
    ``('config.text_config.vocab_size', 64)``. A config without ``to_dict`` has no leaves."""

    def walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{path}.{key}")
        else:
            yield path, value

    yield from walk(config.to_dict() if hasattr(config, "to_dict") else {}, "config")
