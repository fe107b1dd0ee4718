"""Stage options from YAML config files and CLI flags, merged once: flags > file > defaults."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from e2kd._options import former_names

__all__ = ["load_yaml", "preset_path", "list_presets", "build_options", "parse_json_kwargs", "parse_size",
           "check_crop_scale", "check_range"]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def list_presets() -> list[str]:
    """Names of the YAML presets shipped inside the package (``e2kd/configs/<name>.yaml``)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("e2kd").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str | Path) -> Path:
    """A config file path as given, or the packaged preset of that name (``demo-digits``); works from a wheel."""
    if Path(name).exists():
        return Path(name)
    from importlib.resources import files

    stem = Path(name).name.removesuffix(".yaml")
    candidate = files("e2kd").joinpath("configs", f"{stem}.yaml")
    if stem in list_presets():
        return Path(str(candidate))
    raise ValueError(f"config {name!r}: no such file, and not a preset ({', '.join(list_presets())})")


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML mapping (``safe_load``) from a file or a packaged preset name; keys may use ``-`` or ``_``."""
    if path is None:
        return {}
    path = preset_path(path)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a YAML mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_options(cls: type[T], config: str | Path | None, flags: dict[str, Any]) -> T:
    """Build an options dataclass: explicit flags (not None) override the config file, which overrides defaults.

    Raises:
        ValueError: unknown keys in the config file, or required options missing.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    aliases: dict[str, str] = {**getattr(cls, "ALIASES", {}), **former_names(cls)}
    merged = _renamed(_flag_names_to_fields(load_yaml(config)), aliases, str(config))
    flags = _renamed({k: v for k, v in flags.items() if v is not None}, aliases, "flags")
    unknown = sorted(set(merged) - fields)
    if unknown:
        import difflib

        known = sorted(_yaml_key(f) for f in fields)
        named = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1)) else key
                 for key in map(_yaml_key, unknown)]
        raise ValueError(f"{config}: unknown option(s) {', '.join(named)}; known: {', '.join(known)}")
    merged.update({k: v for k, v in flags.items() if v is not None})
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if merged.get(name) is None]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    hints = typing.get_type_hints(cls)
    values = {k: _checked(k, v, hints[k]) for k, v in merged.items() if k in fields}
    return cls(**values)


def _renamed(values: dict[str, Any], aliases: dict[str, str], where: str) -> dict[str, Any]:
    """Options under a former name (``aliases``: old → new) take the new one; both at once is an error."""
    out = dict(values)
    for old, new in aliases.items():
        if old in out:
            if new in out and out[new] != out[old]:
                raise ValueError(f"{where}: {old} is the former name of {new}; give one of them")
            out[new] = out.pop(old)
    return out


def _yaml_key(field: str) -> str:
    """A field's YAML key: its flag's name with underscores (``lam`` → ``lambda``, ``progress`` → ``quiet``)."""
    return {"lam": "lambda", "progress": "quiet"}.get(field, field)


def _flag_names_to_fields(values: dict[str, Any]) -> dict[str, Any]:
    """YAML keys are the flag names: ``lambda`` is the ``lam`` field, ``quiet: true`` is ``progress: false``."""
    out = dict(values)
    if "lambda" in out:
        out["lam"] = out.pop("lambda")
    if "quiet" in out:
        quiet = out.pop("quiet")
        if not isinstance(quiet, bool):
            raise ValueError(f"--quiet: expected true/false, got {quiet!r}")
        out["progress"] = not quiet
    return out


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the option's type (an int for a float option, a list for a tuple), or ``ValueError``."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return None
    options = [h for h in typing.get_args(hint) if h is not type(None)] if _is_union(hint) else [hint]
    for option in options:
        ok, converted = _convert(value, option)
        if ok:
            return converted
    expected = " or ".join(_describe(o) for o in options)
    raise ValueError(f"{flag}: expected {expected}, got {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, str(value)  # YAML ``views: 8``
        return isinstance(value, str), value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) != len(value):
            return False, value
        items = [_convert(v, a) for v, a in zip(value, args, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if origin is list:
        return isinstance(value, list), value
    return True, value  # anything else is checked by the options class itself


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"{len(typing.get_args(hint))} values ({', '.join(_describe(a) for a in typing.get_args(hint))})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        hint, str(hint))


def check_range(flag: str, value: float | None, lo: float | None = None, hi: float | None = None,
                exclusive_lo: bool = False) -> None:
    """``ValueError`` naming ``flag`` unless ``value`` is None or within ``[lo, hi]`` (``(lo, hi]`` if exclusive)."""
    if value is None:
        return
    too_low = lo is not None and (value <= lo if exclusive_lo else value < lo)
    if too_low or (hi is not None and value > hi):
        bounds = f"{'(' if exclusive_lo else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{flag} must be in {bounds}, got {value}")


def check_crop_scale(scale: Sequence[float]) -> None:
    """A random-resized-crop area range: ``0 < min <= max <= 1``."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"--crop-scale must be two numbers with 0 < min <= max <= 1, got {list(scale)}")


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
