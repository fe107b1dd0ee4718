"""The teacher of a cache, from one spec: the driver (which checks it before any work) and every Ray actor build it
with the same :meth:`TeacherSpec.build`, from the same weight bytes (no temporary files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from e2kd.models import create_model, load_state_bytes, model_spec

__all__ = ["TeacherSpec"]


@dataclass(frozen=True)
class TeacherSpec:
    """Name, class count and constructor kwargs of a teacher, and the format of its weights (``.safetensors``, or
    ``.pt``/``.pth`` for a torch state_dict)."""

    name: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    suffix: str = ".safetensors"

    @classmethod
    def from_dict(cls, spec: dict[str, Any], suffix: str = ".safetensors") -> TeacherSpec:
        """From a model spec ``{"name", "num_classes", "kwargs"}`` (what runs and manifests record)."""
        return cls(str(spec["name"]), int(spec["num_classes"]), dict(spec.get("kwargs") or {}), suffix)

    def build(self, weights: bytes | None, checkpoint: str | Path | None = None) -> torch.nn.Module:
        """The teacher with ``weights`` loaded strictly (None: constructor initialisation, e.g. for tests).

        ``checkpoint``: the file the weights were read from; a model other than the one its run recorded
        (``summary.json`` beside it) is refused before they are loaded."""
        model = create_model(self.name, self.num_classes, **self.kwargs)
        if checkpoint is not None:
            from e2kd._runs import check_recorded_spec

            check_recorded_spec(checkpoint, self.name, self.num_classes, model_spec(model)["kwargs"])
        if weights is not None:
            where = str(checkpoint) if checkpoint is not None else f"the weights of teacher {self.name}"
            load_state_bytes(model, weights, self.suffix, name=where)
        return model

    def random_weights(self, seed: int) -> bytes:
        """The weights (safetensors bytes) of this teacher initialised from ``seed`` — the same in every process."""
        from safetensors.torch import save

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = create_model(self.name, self.num_classes, **self.kwargs)
        return save({k: v.detach().contiguous() for k, v in model.state_dict().items()})
