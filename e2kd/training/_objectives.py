"""What one training step minimises, given a batch: the student's e²KD objective or a plain supervised one.

A step objective is called as ``total, parts = objective(batch, device)``; :class:`~e2kd.training.Trainer`
does the rest (autocast, backward, gradient averaging, clipping, optimiser and scheduler steps).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from e2kd.losses import E2KDObjective
from e2kd.models import input_transform
from e2kd.training._targets import TeacherTargets

__all__ = ["StepObjective", "StudentObjective", "SupervisedObjective"]


class StepObjective(Protocol):
    def __call__(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, named parts)`` of one batch."""
        ...


class StudentObjective:
    """KD + λ·explanation (+ CE) against teacher targets from the cache or a live teacher (``targets``)."""

    def __init__(self, objective: E2KDObjective, targets: TeacherTargets) -> None:
        self.objective, self.targets = objective, targets
        self.transform = input_transform(objective.student)

    def __call__(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        t_logits, t_maps, targets = self.targets(batch, device)
        x = self.transform(batch["image"].to(device))
        return self.objective(x, t_logits, t_maps if self.objective.lam > 0 else None, batch["label"].to(device),
                              targets=targets)


class SupervisedObjective:
    """Cross-entropy on the batch's labels (with label smoothing): teacher training."""

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0) -> None:
        self.model, self.label_smoothing = model, label_smoothing
        self.transform = input_transform(model)

    def __call__(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(self.transform(batch["image"].to(device)))
        loss = F.cross_entropy(logits, batch["label"].to(device), label_smoothing=self.label_smoothing)
        return loss, {"ce": loss}
