"""Run under ``torchrun --nproc_per_node 2``: one :meth:`Trainer.step` per student and gradient sync on each rank's
half of a fixed batch; rank 0 writes the gradients and the collectives counted (tests/test_grad_sync.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from e2kd.losses import E2KDObjective
from e2kd.models import create_model
from e2kd.training._loop import Trainer, init_distributed
from e2kd.training._sync import count_collectives

CASES = {  # name → (model factory, explainer, input channels, map channels)
    "gradcam-resnet": (lambda: create_model("resnet18", 10, channels=(8, 16, 32, 64), stem_width=8), "gradcam", 3, 1),
    "bcos-resnet": (lambda: create_model("bcos:resnet18", 10, inplanes=8), "bcos", 6, 6),
    "gradcam-vit": (lambda: create_model("vit_tiny_patch16_224", 10, img_size=64, depth=2, embed_dim=48,
                                         num_heads=2), "gradcam", 3, 1),
}


def batch(case: str, n: int = 16) -> dict[str, torch.Tensor]:
    """The fixed global batch of ``case`` (the same in every process)."""
    _, _, channels, map_channels = CASES[case]
    g = torch.Generator().manual_seed(1)
    return {"x": torch.rand(n, channels, 64, 64, generator=g), "t_logits": torch.randn(n, 10, generator=g),
            "t_maps": torch.rand(n, map_channels, 4, 4, generator=g)}


def model(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]()


class Objective:
    def __init__(self, student: torch.nn.Module, explainer: str) -> None:
        self.e2kd = E2KDObjective(student, explainer, temperature=4.0, lam=1.0)

    def __call__(self, b: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
        return self.e2kd(b["x"], b["t_logits"], b["t_maps"])


def main(out: Path) -> None:
    rank, world = init_distributed()
    counts: dict[str, int] = {}
    for case in CASES:
        for sync in ("ddp", "allreduce"):
            student = model(case)
            optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
            trainer = Trainer(student, Objective(student, CASES[case][1]), optimizer, None, None, None, 1, 1,
                              torch.device("cpu"), rank, world, grad_sync=sync)
            counter = [0]
            if sync == "ddp":
                count_collectives(trainer._forward, counter)
            else:
                counter[0] = sum(1 for _ in student.parameters())
            half = len(batch(case)["x"]) // world
            trainer.step({k: v[rank * half:(rank + 1) * half] for k, v in batch(case).items()})
            counts[f"{case}/{sync}"] = counter[0]
            if rank == 0:
                np.savez(out / f"{case}-{sync}.npz", *[p.grad.numpy() for p in student.parameters()])
    if rank == 0:
        (out / "counts.json").write_text(json.dumps(counts))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
