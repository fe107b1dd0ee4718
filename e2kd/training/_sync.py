"""Gradient averaging over ranks (``torchrun``): DDP around the whole step objective, or one all-reduce per tensor.

``ddp`` (the default) wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel` whose forward is the
*whole* step objective — the student's forward, its explanation's inner gradient (``autograd.grad`` w.r.t.
activations or inputs, never parameters) and the loss terms — so DDP's reducer sees one forward and one backward per
step: gradients are flattened into buckets and all-reduced while the rest of the (double) backward still runs.
Checked against a single-process reference for GradCAM, B-cos and ViT students (``tests/test_grad_sync.py``).

``allreduce`` is the former hand-written sync (one blocking ``all_reduce`` per parameter tensor after the whole
backward); it stays as the reference the benchmark (``bench/bench_sync.py``) compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from e2kd.training._objectives import StepObjective

__all__ = ["GRAD_SYNCS", "StepForward", "step_forward", "average_gradients", "count_collectives"]

GRAD_SYNCS = ("ddp", "allreduce")
#: DDP's bucket size: PyTorch's default (25 MiB); a ResNet-18's 45 MB of gradients go in 3 buckets
BUCKET_CAP_MB = 25.0

StepForward = Callable[[dict[str, Any], torch.device], tuple[Tensor, dict[str, Tensor]]]


class _ObjectiveModule(nn.Module):
    """The model as DDP's module, its forward the whole step objective (the objective is not a submodule: a live
    teacher inside it is no parameter of DDP's)."""

    objective: StepObjective

    def __init__(self, model: nn.Module, objective: StepObjective) -> None:
        super().__init__()
        self.model = model
        self.__dict__["objective"] = objective

    def forward(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective(batch, device)


def step_forward(model: nn.Module, objective: StepObjective, world: int, grad_sync: str = "ddp",
                 static_graph: bool = True) -> StepForward:
    """What a training step calls for ``(total, parts)``: the objective itself on one rank or with ``allreduce``
    (then call :func:`average_gradients` after ``backward``), else DDP around it (gradients averaged by the
    backward). ``static_graph`` (DDP's option): every step uses the same parameters — DDP learns in the first step
    which ones the objective never uses (an unused head, say) instead of failing at the second step, at no cost
    per step (``bench/bench_sync.py``)."""
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"grad_sync must be one of {', '.join(GRAD_SYNCS)}, got {grad_sync!r}")
    if world == 1 or grad_sync == "allreduce":
        return objective
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # BatchNorm statistics stay per rank between steps (no broadcast before each forward, as before DDP); DDP
    # broadcasts rank 0's parameters and buffers once, here. Newer torch renames the option.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    module = _ObjectiveModule(model, objective)
    if newer:
        return DistributedDataParallel(module, bucket_cap_mb=BUCKET_CAP_MB, static_graph=static_graph,
                                       forward_sync_buffers=False)
    return DistributedDataParallel(module, bucket_cap_mb=BUCKET_CAP_MB, static_graph=static_graph,
                                   broadcast_buffers=False)


def average_gradients(model: nn.Module, world: int) -> None:
    """One blocking ``all_reduce`` per parameter tensor, then ÷ ``world``. A parameter without a gradient on this
    rank gets zeros: every rank must reduce the same tensors in the same order, or the collective deadlocks."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def count_collectives(forward: Any, counter: list[int]) -> None:
    """Count DDP's gradient all-reduces into ``counter[0]`` (a communication hook that all-reduces as DDP does)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):  # noqa: ANN001, ANN202 - DDP rejects string annotations (the future import)
        counter[0] += 1
        return allreduce_hook(state, bucket)

    forward.register_comm_hook(None, hook)
