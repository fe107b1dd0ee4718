"""Training and evaluating a model on a stream: one loop for teachers and students, objectives, evaluation.

Stages build a :class:`Trainer` (model, objective, optimiser, scheduler, loader) and call :meth:`Trainer.fit`;
:func:`evaluate_model` gives top-1, agreement with a cached teacher and explanation similarity.
"""

from e2kd.training._evaluation import evaluate_model
from e2kd.training._loop import Trainer, build_optimizer, check_run_dir, init_distributed
from e2kd.training._objectives import StudentObjective, SupervisedObjective
from e2kd.training._targets import CachedTargets, OnlineTeacherTargets

__all__ = ["Trainer", "build_optimizer", "check_run_dir", "init_distributed", "evaluate_model", "StudentObjective",
           "SupervisedObjective", "CachedTargets", "OnlineTeacherTargets"]
