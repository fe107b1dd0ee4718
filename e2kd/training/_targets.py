"""Where a student step's teacher targets come from: the cache (no teacher) or a live teacher (baseline)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from e2kd.pipeline._loader import teacher_maps

__all__ = ["CachedTargets", "OnlineTeacherTargets", "TeacherTargets", "TeacherOutputs"]

#: A step's teacher logits ``[B, C]`` (``[B, T, C]`` for T teachers), maps (a list: one batch per teacher) and
#: explained classes.
TeacherOutputs = tuple[Tensor, Tensor | list[Tensor], Tensor]


class TeacherTargets(Protocol):
    """Where a student step's teacher targets come from."""

    online: bool  #: a live teacher runs each step (else they were cached)

    def __call__(self, batch: dict[str, Any], device: torch.device) -> TeacherOutputs: ...


class CachedTargets:
    """Teacher logits, maps and explained class as read from the cache by the loader."""

    online = False

    def __call__(self, batch: dict[str, Any], device: torch.device) -> TeacherOutputs:
        return batch["t_logits"].to(device).float(), teacher_maps(batch, device), batch["target"].to(device).long()


class OnlineTeacherTargets:
    """A live teacher: one forward + explanation of the student's own input per step (online e²KD)."""

    online = True

    def __init__(self, teacher: torch.nn.Module, explainer_name: str, with_maps: bool = True) -> None:
        from e2kd.explain import build_explainer
        from e2kd.models import input_transform

        self.teacher = teacher.eval().requires_grad_(False)
        self.transform = input_transform(teacher)
        self.explainer = build_explainer(explainer_name, self.teacher)
        self.with_maps = with_maps

    def __call__(self, batch: dict[str, Any], device: torch.device) -> TeacherOutputs:
        x = self.transform(batch["image"].to(device))
        if not self.with_maps:  # plain KD: the teacher's forward only
            with torch.no_grad():
                logits = self.teacher(x).float()
            return logits, logits.new_zeros(len(logits), 1, 1, 1), logits.argmax(1)
        maps, logits = self.explainer(x)
        return logits.float(), maps.float(), logits.argmax(1)
