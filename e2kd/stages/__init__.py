"""The commands as library calls: each stage takes its options dataclass (what the CLI builds from flags and YAML).

Imported on first use (a stage pulls in Ray or matplotlib): ``from e2kd.stages import train_student``. The
modules with a leading underscore are internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher
    from e2kd.stages._curves import plot_runs
    from e2kd.stages._demo import run_demo
    from e2kd.stages._evaluate import evaluate_against_caches, evaluate_weights
    from e2kd.stages._figures import show_key
    from e2kd.stages._inspect import summarise_store
    from e2kd.stages._train_student import TrainOptions, prepare_student, train_student
    from e2kd.stages._train_teacher import TeacherOptions, train_teacher

_WHERE = {"CacheTeacherOptions": "_cache_teacher", "run_cache_teacher": "_cache_teacher", "plot_runs": "_curves",
          "run_demo": "_demo", "evaluate_weights": "_evaluate", "evaluate_against_caches": "_evaluate",
          "show_key": "_figures", "summarise_store": "_inspect", "TrainOptions": "_train_student",
          "prepare_student": "_train_student", "train_student": "_train_student", "TeacherOptions": "_train_teacher",
          "train_teacher": "_train_teacher"}

__all__ = ["CacheTeacherOptions", "run_cache_teacher", "TrainOptions", "prepare_student", "train_student",
           "TeacherOptions", "train_teacher", "evaluate_weights", "evaluate_against_caches", "summarise_store",
           "show_key", "plot_runs", "run_demo"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'e2kd.stages' has no attribute {name!r}")
    return getattr(importlib.import_module(f"e2kd.stages.{_WHERE[name]}"), name)
