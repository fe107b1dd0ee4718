"""The training loop shared by teachers and students: steps, epochs, checkpoints, resume, metrics.

Under ``torchrun`` every rank runs the same number of steps per epoch; gradients are averaged by hand
(see :meth:`Trainer.step`) and only rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.utils import dispatch_clip_grad, random_seed

from e2kd.training.objectives import StepObjective

__all__ = ["Trainer", "build_optimizer", "init_distributed", "seed_everything", "check_run_dir", "RUN_FILES",
           "SCHEDULE_OPTIONS"]

#: Options that shape the optimiser's schedule: a resumed run must be given the values it started with.
SCHEDULE_OPTIONS = ("epochs", "batch_size", "lr", "opt", "sched", "warmup_epochs", "weight_decay",
                    "steps_per_epoch")

#: Files that make a directory a run: training into it again needs ``--resume`` or ``--overwrite``.
RUN_FILES = ("metrics.jsonl", "checkpoint.pt", "summary.json", "student.safetensors", "teacher.safetensors")


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into an existing run unless it is resumed or explicitly overwritten, and refuse — with or
    without ``--overwrite`` — a file, or a non-empty directory that holds no run (nothing lost silently). Checks
    only: nothing is created.

    Raises:
        FileExistsError: ``out`` is a file, holds something that is not a run, or holds a run and neither
            ``resume`` nor ``overwrite`` is set.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found and out.is_dir() and any(out.iterdir()):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise FileExistsError(f"--out {out} is not empty and holds no e2kd run ({shown}, …): e2kd never writes into "
                              f"or cleans a directory it did not create — empty it yourself or choose another --out")
    if found and not resume and not overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): --resume continues it, --overwrite "
                              f"replaces it, or choose another --out")


def init_distributed() -> tuple[int, int]:
    """``(rank, world size)``; joins the process group when launched by ``torchrun`` with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Python, NumPy and torch RNGs (timm's ``random_seed``: ``seed + rank``)."""
    random_seed(seed, rank)


def build_optimizer(model: torch.nn.Module, *, opt: str, lr: float, weight_decay: float, sched: str, epochs: int,
                    warmup_epochs: int, steps_per_epoch: int) -> tuple[Any, Any]:
    """timm's optimiser and per-update scheduler from their names."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


@dataclass
class Trainer:
    """A model, the objective of one batch, its optimiser and scheduler, and the stream that feeds it."""

    model: torch.nn.Module
    objective: StepObjective
    optimizer: Any
    scheduler: Any
    stream: Any  # has set_epoch(epoch)
    loader: Any
    steps_per_epoch: int
    epochs: int
    device: torch.device
    rank: int = 0
    world: int = 1
    clip_grad: float | None = None
    amp: bool = False  # bf16 autocast, on CUDA only
    progress: bool = True
    desc: str = "epoch"
    validate: Callable[[], dict[str, float]] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # recorded in checkpoints

    # ---- one step ------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the loss and its parts as floats.

        Raises:
            FloatingPointError: the loss is not finite (nothing is updated).
        """
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  enabled=self.amp and self.device.type == "cuda")
        with autocast:
            total, parts = self.objective(batch, self.device)
        floats = {k: float(v.detach()) for k, v in parts.items()}
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss {float(total.detach())} (parts {floats})")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.world > 1:
            self._average_gradients()
        if self.clip_grad:
            dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode="norm")
        self.optimizer.step()
        return {"loss": float(total.detach()), **floats}

    def _average_gradients(self) -> None:
        """All-reduce every gradient by hand instead of wrapping the model in DDP: the explanation loss
        differentiates through a gradient (double backward), which DDP's reducer hooks do not support.
        A parameter without a gradient on this rank (unused this step) gets zeros: every rank must call
        ``all_reduce`` for the same tensors in the same order, or the collective deadlocks."""
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world

    # ---- epochs --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, num_updates: int) -> tuple[dict[str, float], int]:
        """``steps_per_epoch`` steps; returns (mean of each loss part, throughput, lr) and the update count."""
        from tqdm import tqdm

        self.model.train()
        self.stream.set_epoch(epoch)
        sums: dict[str, float] = {}
        seen, t0 = 0, time.time()
        it = iter(self.loader)
        bar = tqdm(range(self.steps_per_epoch), desc=f"{self.desc} {epoch + 1}/{self.epochs}", leave=False,
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        for _ in bar:
            batch = next(it)
            out = self.step(batch)
            num_updates += 1
            self.scheduler.step_update(num_updates=num_updates)
            seen += len(batch["image"])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{out['loss']:.4f}")
        del it
        elapsed = time.time() - t0
        metrics = {k: v / self.steps_per_epoch for k, v in sums.items()}
        metrics.update(samples_per_s=seen * self.world / elapsed, sec_per_epoch=elapsed,
                       lr=self.optimizer.param_groups[0]["lr"])
        return metrics, num_updates

    def fit(self, out: Path, resume: bool = False) -> tuple[dict[str, float], int]:
        """Train to ``epochs`` writing ``metrics.jsonl`` and ``checkpoint.pt`` (every epoch) into ``out``.

        Without ``resume`` the run files of an earlier run in ``out`` are removed first (callers check with
        :func:`check_run_dir`). With ``resume`` and a checkpoint in ``out``, training continues exactly where it
        stopped (model, optimiser, scheduler, RNG states; metrics of later epochs dropped). Returns (last epoch's
        metrics, number of updates); a finished run resumed keeps its final metrics.
        """
        created = not out.exists()
        try:
            return self._fit(out, resume)
        except BaseException:
            if created and self.rank == 0 and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run refused before it wrote anything leaves nothing behind
            raise

    def _fit(self, out: Path, resume: bool) -> tuple[dict[str, float], int]:
        start_epoch, num_updates = 0, 0
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if resume and (out / "checkpoint.pt").exists():
            start_epoch, num_updates = self.restore(out)
        elif self.rank == 0:  # a fresh run (``check_run_dir`` passed): nothing of an older run may survive
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        metrics = _last_metrics(out / "metrics.jsonl") if start_epoch else {}
        for epoch in range(start_epoch, self.epochs):
            metrics, num_updates = self.train_epoch(epoch, num_updates)
            if self.rank == 0:
                if self.validate is not None:
                    metrics.update(self.validate())
                self._report(epoch, metrics)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"epoch": epoch + 1, "steps": num_updates, **metrics}) + "\n")
                self.checkpoint(out, epoch + 1, num_updates)
            if self.world > 1:
                torch.distributed.barrier()
        return metrics, num_updates

    def _report(self, epoch: int, metrics: dict[str, float]) -> None:
        """One console line per epoch (stderr, with the progress bars): loss parts and validation metrics."""
        if not self.progress:
            return
        shown = {k: v for k, v in metrics.items() if k not in ("samples_per_s", "lr")}
        parts = "  ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "sec_per_epoch")
        print(f"{self.desc} {epoch + 1}/{self.epochs}  {parts}  ({metrics['sec_per_epoch']:.1f} s, "
              f"{metrics['samples_per_s']:.0f} samples/s)", file=sys.stderr, flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, out: Path, epoch: int, num_updates: int) -> None:
        """Write ``out/checkpoint.pt`` atomically (tensors and plain values only: loads with ``weights_only``)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": epoch, "num_updates": num_updates,
                 "torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1]),
                 "python_rng_version": random.getstate()[0], "options": json.dumps(self.options, default=str),
                 "steps_per_epoch": self.steps_per_epoch}
        tmp = out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out / "checkpoint.pt")

    def restore(self, out: Path) -> tuple[int, int]:
        """Load ``out/checkpoint.pt``; returns (epochs done, updates done)."""
        path = out / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self._check_same_schedule(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        random.setstate((state["python_rng_version"], tuple(state["python_rng"]), None))
        _truncate_metrics(out / "metrics.jsonl", state["epoch"])
        return state["epoch"], state["num_updates"]

    def _check_same_schedule(self, state: dict[str, Any]) -> None:
        """A resumed run keeps the schedule it was started with: an option that shapes it (epochs, batch size,
        learning rate, …) given differently is refused by name — the old schedule would silently win."""
        try:
            recorded = json.loads(state.get("options") or "{}")
        except ValueError:
            recorded = {}
        for name in SCHEDULE_OPTIONS:
            if name in recorded and name in self.options and recorded[name] != self.options[name]:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"--resume: the run was started with {flag} {recorded[name]}, now {flag} "
                                 f"{self.options[name]}; options that shape the schedule cannot change on resume "
                                 f"(give the original value, or start a new run with --overwrite or another --out)")
        steps = state.get("steps_per_epoch")
        if steps is not None and int(steps) != self.steps_per_epoch:
            raise ValueError(f"--resume: the run was started with {int(steps)} steps per epoch, now "
                             f"{self.steps_per_epoch} (different data, --shots or --steps-per-epoch); the schedule "
                             f"cannot change on resume")

    def save_weights(self, path: Path) -> None:
        """The model's weights as safetensors (rank 0 only)."""
        from safetensors.torch import save_file

        if self.rank == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(path))


def _last_metrics(path: Path) -> dict[str, float]:
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return {k: v for k, v in lines[-1].items() if k not in ("epoch", "steps")} if lines else {}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["epoch"] <= epochs_done))
