"""``--tensorboard DIR``: TensorBoard event files of a training run (rank 0), as timm and Lightning users expect.

Scalars ``train/<part>`` (loss, kd, expl, ce, …) and ``train/lr`` per optimiser step; ``epoch/<metric>`` at each
epoch's last step (the values ``metrics.jsonl`` records, validation included; ``epoch/epoch`` its number); and per
epoch a few explanation images of the epoch's last batch: ``explanations/image``, ``explanations/teacher`` and
``explanations/student`` (each map min–max scaled, upsampled to the image). Needs the ``tensorboard`` package
(``pip install 'e2kd[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TensorBoardLog", "heat_images", "explanation_images", "require_tensorboard", "IMAGES_PER_EPOCH"]

IMAGES_PER_EPOCH = 4


class TensorBoardLog:
    """One run's TensorBoard writer (open it on rank 0 only).

    Raises:
        RuntimeError: the ``tensorboard`` package is not installed (one line saying how to install it).
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        SummaryWriter = require_tensorboard()  # noqa: N806 - a class
        # a resumed run rewrites the steps after its checkpoint (purge_step) instead of drawing them twice
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def step(self, step: int, parts: dict[str, float], lr: float) -> None:
        for name, value in parts.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{name}", value, step)
        self.writer.flush()

    def images(self, step: int, images: dict[str, Tensor]) -> None:
        """``name → [N, C, H, W]`` images in ``[0, 1]`` under ``explanations/<name>``."""
        for name, batch in images.items():
            self.writer.add_images(f"explanations/{name}", batch.float().clamp(0, 1).cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require_tensorboard() -> Any:
    """torch's ``SummaryWriter`` class.

    Raises:
        RuntimeError: the ``tensorboard`` package is missing (one line saying how to install it).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'e2kd[tensorboard]' "
                           "(or pip install tensorboard)") from None
    return SummaryWriter


def heat_images(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, C_e, h, w]`` maps → ``[N, 1, H, W]`` in ``[0, 1]``: channels summed, upsampled, each min–max scaled."""
    m = F.interpolate(maps.detach().float().sum(1, keepdim=True).cpu(), size=size, mode="bilinear",
                      align_corners=False)
    lo = m.amin(dim=(1, 2, 3), keepdim=True)
    hi = m.amax(dim=(1, 2, 3), keepdim=True)
    return (m - lo) / (hi - lo + 1e-12)


def explanation_images(batch: dict[str, Any], student_maps: Tensor | None, teacher: Tensor | None,
                       n: int = IMAGES_PER_EPOCH) -> dict[str, Tensor]:
    """The first ``n`` images of a batch with the teacher's and the student's maps (those given)."""
    images = batch["image"][:n].float()
    images = images / 255.0 if batch["image"].dtype == torch.uint8 else images
    size = tuple(images.shape[-2:])
    out = {"image": images}
    if teacher is not None:
        out["teacher"] = heat_images(teacher[:n], size)
    if student_maps is not None:
        out["student"] = heat_images(student_maps[:n], size)
    return out
