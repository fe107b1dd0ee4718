"""Stage options from YAML config files and CLI flags, merged once: flags > file > defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["load_yaml", "build_options", "parse_json_kwargs", "parse_size"]

T = TypeVar("T")


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML mapping (``safe_load``); keys may use ``-`` or ``_``."""
    if path is None:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a YAML mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_options(cls: type[T], config: str | Path | None, flags: dict[str, Any]) -> T:
    """Build an options dataclass: explicit flags (not None) override the config file, which overrides defaults.

    Raises:
        ValueError: unknown keys in the config file, or required options missing.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    merged = load_yaml(config)
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ValueError(f"{config}: unknown option(s) {unknown}; known: {sorted(fields)}")
    merged.update({k: v for k, v in flags.items() if v is not None})
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if merged.get(name) is None]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**{k: v for k, v in merged.items() if k in fields})


def parse_json_kwargs(text: str | dict | None) -> dict[str, Any] | None:
    """``'{"channels": [16, 32, 64, 128]}'`` → dict (None stays None)."""
    if text is None or isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def parse_size(text: str | int | list | None) -> tuple[int, int] | None:
    """``"7"`` → (7, 7); ``"7x5"`` → (7, 5)."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return int(text[0]), int(text[1])
    parts = str(text).lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        h = w = None
    if h is None or w is None or h < 1 or w < 1:
        raise ValueError(f"expected a size H or HxW, got {text!r}")
    return h, w
