"""Run directories carry their model's settings: ``summary.json`` beside the weights records the model spec.

``train-teacher`` writes ``OUT/teacher.safetensors`` and ``train-student`` ``RUN_DIR/student.safetensors``, each with
a ``summary.json`` holding ``{"name", "num_classes", "kwargs"}`` under ``"teacher"`` / ``"student"``. Wherever a
model is named, a run directory can stand for name, class count, kwargs and weights (:func:`read_run`), and weights
loaded from a run are checked against the spec it recorded (:func:`check_recorded_spec`): a forgotten
``--teacher-kwargs`` would otherwise load the same tensors into a different network without a word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunModel", "read_run", "recorded_spec", "check_recorded_spec", "fill_from_run", "inherit_from_run",
           "INHERITED_OPTIONS"]

#: Options a cache depends on that a teacher run records (its ``summary.json`` options): a cache built from the run
#: takes them unless they are given, and warns where they are given differently.
INHERITED_OPTIONS = ("input_size",)

SUMMARY = "summary.json"
WEIGHTS = {"teacher": "teacher.safetensors", "student": "student.safetensors"}
_RUN_FILES = (*WEIGHTS.values(), "checkpoint.pt")


@dataclass(frozen=True)
class RunModel:
    """The model a run directory holds."""

    name: str
    num_classes: int
    kwargs: dict[str, Any]
    weights: Path


def _summary_spec(run: Path) -> tuple[str, dict[str, Any]] | None:
    """``(role, spec)`` from ``run/summary.json`` (role: teacher or student), or None without a summary."""
    path = run / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    for role in WEIGHTS:
        spec = summary.get(role) if isinstance(summary, dict) else None
        if isinstance(spec, dict) and {"name", "num_classes", "kwargs"} <= set(spec):
            return role, spec
    raise ValueError(f"{path} records no teacher or student model spec")


def read_run(run: str | Path) -> RunModel:
    """The model of a ``train-teacher`` / ``train-student`` run directory (spec from ``summary.json``).

    Raises:
        ValueError: not a run directory, or its summary or weights are missing.
    """
    run = Path(run)
    found = _summary_spec(run) if run.is_dir() else None
    if found is None:
        raise ValueError(f"{run} is not a run directory (no {SUMMARY}; train-teacher / train-student write one)")
    role, spec = found
    weights = run / WEIGHTS[role]
    if not weights.is_file():
        raise ValueError(f"{run}: {WEIGHTS[role]} missing (an unfinished run? --resume it first)")
    return RunModel(str(spec["name"]), int(spec["num_classes"]), dict(spec["kwargs"]), weights)


def recorded_spec(checkpoint: str | Path) -> dict[str, Any] | None:
    """The spec recorded for a run's weights file (``teacher/student.safetensors``, ``checkpoint.pt``), else None."""
    path = Path(checkpoint)
    if path.name not in _RUN_FILES:
        return None
    found = _summary_spec(path.parent)
    return found[1] if found else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def check_recorded_spec(checkpoint: str | Path, name: str, num_classes: int, kwargs: dict[str, Any]) -> None:
    """Refuse weights whose run recorded another model than the one being built (name, classes, kwargs).

    Raises:
        ValueError: naming the first field that differs, with both values.
    """
    spec = recorded_spec(checkpoint)
    if spec is None:
        return
    given = {"name": name, "num_classes": num_classes, "kwargs": kwargs}
    for field in ("name", "num_classes", "kwargs"):
        if _canonical(spec[field]) != _canonical(given[field]):
            raise ValueError(f"{checkpoint}: its run recorded {field}={_canonical(spec[field])}, but the model built "
                             f"has {_canonical(given[field])}; pass the run directory instead of the flags, or the "
                             f"matching flags")


def fill_from_run(run: str | Path | None, given: dict[str, Any], fields: dict[str, str], what: str) -> dict[str, Any]:
    """Fill model options from a run directory: ``fields`` maps option name → ``name | num_classes | kwargs |
    weights``. Options already given must agree with the run (``ValueError`` naming the option otherwise)."""
    if run is None:
        return given
    model = read_run(run)
    values = {"name": model.name, "num_classes": model.num_classes, "kwargs": model.kwargs,
              "weights": str(model.weights)}
    out = dict(given)
    for option, key in fields.items():
        mine = given.get(option)
        if mine is not None and _canonical(mine) != _canonical(values[key]):
            raise ValueError(f"{what} {run} holds {key}={_canonical(values[key])}, but --{option.replace('_', '-')} "
                             f"gives {_canonical(mine)}")
        out[option] = values[key]
    return out


def inherit_from_run(run: str | Path | None, given: dict[str, Any], what: str = "--teacher-run") -> dict[str, Any]:
    """``given`` with the :data:`INHERITED_OPTIONS` the run recorded filled in where ``given`` has None; a given
    value that differs warns (the teacher's outputs depend on it: a 96 px teacher cached at 224 px is another
    teacher)."""
    import warnings

    if run is None:
        return given
    try:
        recorded = json.loads((Path(run) / SUMMARY).read_text()).get("options") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    out = dict(given)
    for name in INHERITED_OPTIONS:
        value = recorded.get(name) if isinstance(recorded, dict) else None
        if value is None:
            continue
        if out.get(name) is None:
            out[name] = value
        elif _canonical(out[name]) != _canonical(value):
            warnings.warn(f"--{name.replace('_', '-')} {out[name]} differs from the {value} that {what} {run} was "
                          f"trained with: the cached outputs will not be that teacher's", UserWarning, stacklevel=2)
    return out

