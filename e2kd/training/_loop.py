"""The training loop shared by teachers and students: steps, epochs, checkpoints, resume, metrics.

Under ``torchrun`` every rank runs the same number of steps per epoch; gradients are averaged by DDP around the
whole step objective (:mod:`e2kd.training._sync`), the reported losses are averaged over ranks, and only rank 0
writes files.

A checkpoint holds the stream's position (epoch, global batch within it, the order's seed, global batch and
partitions — see :mod:`e2kd.pipeline._order`): ``--checkpoint-every N`` writes one every N optimiser steps, SIGTERM
writes one after the current step and stops (:class:`Preempted`), and ``--resume`` continues at that very sample,
on any number of ranks and DataLoader workers with the same global batch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.utils import dispatch_clip_grad, random_seed

from e2kd.pipeline._order import Order
from e2kd.training._objectives import StepObjective
from e2kd.training._sync import StepForward, average_gradients, step_forward

__all__ = ["Trainer", "Preempted", "build_optimizer", "init_distributed", "seed_everything", "check_run_dir",
           "RUN_FILES", "SCHEDULE_OPTIONS", "recorded_order", "training_order", "order_record"]

#: Options that shape the optimiser's schedule: a resumed run must be given the values it started with (the
#: per-rank ``--batch-size`` may change with the number of ranks: the global batch is checked instead).
SCHEDULE_OPTIONS = ("epochs", "lr", "opt", "sched", "warmup_epochs", "weight_decay", "steps_per_epoch")


class Preempted(RuntimeError):
    """SIGTERM arrived: the run wrote a checkpoint after its current step and stopped (``--resume`` continues)."""


def recorded_order(out: Path) -> dict[str, int] | None:
    """The order a run's checkpoint was written with (``seed``, ``global_batch``, ``partitions``), if any."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    order = torch.load(path, map_location="cpu", weights_only=True).get("order")
    return (json.loads(order) or None) if isinstance(order, str) else None


def training_order(shard_keys: dict[str, list[str]], seed: int, batch_size: int, world: int, workers: int,
                   partitions: int | None = None, resume_from: Path | None = None) -> Order:
    """The run's sample order (:class:`~e2kd.pipeline._order.Order`); a resumed run keeps the seed and partitions its
    checkpoint records, and must keep its global batch (``batch_size`` × ``world``).

    The default partitions suit as many of the ``workers`` as can split each rank's share evenly
    (:func:`~e2kd.pipeline._train_stream.build_train_loader` uses that many).

    Raises:
        ValueError: one line — the layout does not fit (ranks must divide partitions, which must divide the global
            batch), or a resume changes the global batch, seed or partitions.
    """
    from e2kd.pipeline._order import DEFAULT_BLOCK, check_layout, default_partitions, usable_workers

    global_batch = batch_size * world
    readers = world * max(1, usable_workers(workers, world, global_batch))
    recorded = recorded_order(resume_from) if resume_from is not None else None
    if recorded:
        if recorded["global_batch"] != global_batch:
            raise ValueError(f"--resume: the run was started with a global batch of {recorded['global_batch']} "
                             f"(--batch-size × ranks), now {global_batch} (--batch-size {batch_size} × {world} "
                             f"rank(s)); the global batch cannot change on resume")
        for flag, value in (("--seed", seed), ("--partitions", partitions)):
            key = flag[2:]
            if value is not None and value != recorded[key]:
                raise ValueError(f"--resume: the run was started with {flag} {recorded[key]}, now {flag} {value}; "
                                 f"the sample order cannot change on resume")
        partitions = recorded["partitions"]
    partitions = partitions or default_partitions(global_batch, readers)
    check_layout(global_batch, partitions, world)
    total = sum(len(k) for k in shard_keys.values())
    if 0 < total < global_batch:  # fewer samples than one global batch (--steps-per-epoch): each pass repeats them
        times = -(-global_batch // total)
        shard_keys = {name: list(keys) * times for name, keys in shard_keys.items()}
        return Order(shard_keys, seed, global_batch, partitions, block=max(DEFAULT_BLOCK, 2 * global_batch))
    return Order(shard_keys, seed, global_batch, partitions)


def order_record(order: Order) -> dict[str, int]:
    """What a checkpoint records of the order (a resumed run rebuilds the same one from it and the plan)."""
    return {"seed": order.seed, "global_batch": order.global_batch, "partitions": order.partitions,
            "block": order.block}

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


class EpochStream(Protocol):
    """What the trainer's stream must do: start the next pass at global batch ``start`` of ``epoch``."""

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...


@dataclass
class Trainer:
    """A model, the objective of one batch, its optimiser and scheduler, and the stream that feeds it."""

    model: torch.nn.Module
    objective: StepObjective
    optimizer: Any
    scheduler: Any
    stream: EpochStream
    loader: Iterable[dict[str, Any]]
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
    order: dict[str, int] = field(default_factory=dict)  # the stream's seed, global batch, partitions (checkpoints)
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints (0: at epoch ends only)
    trace_keys: Path | None = None  # one JSON line per global step (rank 0): its keys in order
    grad_sync: str = "ddp"  # several ranks: "ddp" (bucketed, overlapped) or "allreduce" (per tensor, after backward)
    tensorboard: Path | None = None  # TensorBoard event files of the run (rank 0)
    snapshot: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # a batch → images to log per epoch
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _forward: StepForward = field(init=False, repr=False)
    _board: Any = field(default=None, init=False, repr=False)  # the open TensorBoardLog (rank 0)
    _last_batch: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._forward = step_forward(self.model, self.objective, self.world, self.grad_sync)
        if self.tensorboard is not None and self.rank == 0:
            from e2kd.training._tensorboard import require_tensorboard

            require_tensorboard()  # before any work: a missing package is one line now, not after set-up

    # ---- one step ------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the loss and its parts as floats.

        Raises:
            FloatingPointError: the loss is not finite (nothing is updated).
        """
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  enabled=self.amp and self.device.type == "cuda")
        with autocast:
            total, parts = self._forward(batch, self.device)
        floats = {k: float(v.detach()) for k, v in parts.items()}
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss {float(total.detach())} (parts {floats})")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.world > 1 and self.grad_sync == "allreduce":
            average_gradients(self.model, self.world)
        if self.clip_grad:
            dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode="norm")
        self.optimizer.step()
        return {"loss": float(total.detach()), **floats}

    # ---- epochs --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, num_updates: int, out: Path | None = None, start: int = 0,
                    carried: dict[str, float] | None = None) -> tuple[dict[str, float], int]:
        """Global batches ``start … steps_per_epoch−1`` of ``epoch``; returns (mean of each loss part over ranks and
        steps, throughput, lr) and the update count. ``carried``: the loss sums of the steps before ``start``.

        Raises:
            Preempted: SIGTERM arrived; a checkpoint at the next step was written into ``out``.
        """
        from e2kd._progress import progress

        self.model.train()
        self.stream.set_epoch(epoch, start) if start else self.stream.set_epoch(epoch)
        sums: dict[str, float] = dict(carried or {})
        seen, t0 = 0, time.time()
        it = iter(self.loader)
        bar = progress(range(start, self.steps_per_epoch), desc=f"{self.desc} {epoch + 1}/{self.epochs}", leave=False,
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        for step in bar:
            batch = next(it)
            parts = self._mean_over_ranks(self.step(batch))
            num_updates += 1
            self.scheduler.step_update(num_updates=num_updates)
            if self._board is not None:
                self._board.step(num_updates, parts, self.optimizer.param_groups[0]["lr"])
                self._last_batch = batch
            seen += len(batch["image"])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if self.trace_keys is not None:
                self._trace(epoch, step, list(batch["key"]))
            if out is not None and step + 1 < self.steps_per_epoch:
                stop = self._stop_requested()
                if stop or (self.checkpoint_every and num_updates % self.checkpoint_every == 0):
                    if self.rank == 0:
                        self.checkpoint(out, epoch, num_updates, position=(step + 1, sums))
                    if stop:
                        raise Preempted(f"stopped by SIGTERM at epoch {epoch + 1} step {step + 1} of "
                                        f"{self.steps_per_epoch}; checkpoint written to {out / 'checkpoint.pt'} — "
                                        f"run the same command with --resume to continue from that sample")
        del it
        elapsed = time.time() - t0
        metrics = {k: v / self.steps_per_epoch for k, v in sums.items()}
        metrics.update(samples_per_s=seen * self.world / elapsed, sec_per_epoch=elapsed,
                       lr=self.optimizer.param_groups[0]["lr"])
        return metrics, num_updates

    def _mean_over_ranks(self, parts: dict[str, float]) -> dict[str, float]:
        """The step's losses averaged over ranks (one all-reduce): what the run, not rank 0, optimised."""
        if self.world == 1:
            return parts
        values = torch.tensor(list(parts.values()), dtype=torch.float64)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(parts, values, strict=True)}

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM (ranks agree, so every rank stops after the same step)."""
        if self.world == 1:
            return self._stop.is_set()
        flag = torch.tensor([1 if self._stop.is_set() else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _trace(self, epoch: int, step: int, keys: list[str]) -> None:
        """Append the global batch's keys (gathered from the ranks, in rank order) to ``trace_keys`` (rank 0)."""
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, keys)
            keys = [k for part in gathered for k in part]
        if self.rank == 0:
            with open(self.trace_keys, "a") as f:  # type: ignore[arg-type]
                f.write(json.dumps({"epoch": epoch, "step": step, "keys": keys}) + "\n")

    def fit(self, out: Path, resume: bool = False) -> tuple[dict[str, float], int]:
        """Train to ``epochs`` writing ``metrics.jsonl`` and ``checkpoint.pt`` (every epoch, and every
        ``checkpoint_every`` steps) into ``out``.

        Without ``resume`` the run files of an earlier run in ``out`` are removed first (callers check with
        :func:`check_run_dir`). With ``resume`` and a checkpoint in ``out``, training continues exactly where it
        stopped (model, optimiser, scheduler, RNG states, the stream's position; metrics of later epochs dropped).
        Returns (last epoch's metrics, number of updates); a finished run resumed keeps its final metrics.

        Raises:
            Preempted: SIGTERM arrived (a checkpoint was written).
        """
        created = not out.exists()
        previous = self._catch_sigterm()
        try:
            return self._fit(out, resume)
        except BaseException:
            if created and self.rank == 0 and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run refused before it wrote anything leaves nothing behind
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _catch_sigterm(self) -> Any:
        """Turn SIGTERM into a checkpoint after the current step (main thread only); returns the former handler."""
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGTERM, lambda *_: self._stop.set())

    def _fit(self, out: Path, resume: bool) -> tuple[dict[str, float], int]:
        start_epoch, num_updates, start_step, carried = 0, 0, 0, None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if resume and (out / "checkpoint.pt").exists():
            start_epoch, num_updates, start_step, carried = self.restore(out)
        elif self.rank == 0:  # a fresh run (``check_run_dir`` passed): nothing of an older run may survive
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            if self.trace_keys is not None:
                self.trace_keys.unlink(missing_ok=True)
        if self.trace_keys is not None and self.rank == 0:
            _truncate_trace(self.trace_keys, start_epoch, start_step)
        if self.tensorboard is not None and self.rank == 0:
            from e2kd.training._tensorboard import TensorBoardLog

            # a fresh run hides what an earlier one left in the directory; a resumed one, its steps after the checkpoint
            self._board = TensorBoardLog(self.tensorboard, purge_step=num_updates + 1 if num_updates else 0)
        try:
            return self._epochs(out, start_epoch, num_updates, start_step, carried)
        finally:
            if self._board is not None:
                self._board.close()
                self._board = None

    def _epochs(self, out: Path, start_epoch: int, num_updates: int, start_step: int,
                carried: dict[str, float] | None) -> tuple[dict[str, float], int]:
        metrics = _last_metrics(out / "metrics.jsonl") if start_epoch else {}
        began = time.time()
        for epoch in range(start_epoch, self.epochs):
            begin = start_step if epoch == start_epoch else 0
            metrics, num_updates = self.train_epoch(epoch, num_updates, out, begin,
                                                    carried if epoch == start_epoch else None)
            if self.rank == 0:
                if self.validate is not None:
                    metrics.update(self.validate())
                done = epoch + 1 - start_epoch  # epochs of this process (validation included), for the run's ETA
                self._report(epoch, metrics, (time.time() - began) / done * (self.epochs - epoch - 1))
                self._log_epoch(epoch, metrics, num_updates)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"epoch": epoch + 1, "steps": num_updates, **metrics}) + "\n")
                self.checkpoint(out, epoch + 1, num_updates)
            if self.world > 1:
                torch.distributed.barrier()
            if epoch + 1 < self.epochs and self._stop_requested():
                raise Preempted(f"stopped by SIGTERM after epoch {epoch + 1}; checkpoint written to "
                                f"{out / 'checkpoint.pt'} — run the same command with --resume to continue")
        return metrics, num_updates

    def _log_epoch(self, epoch: int, metrics: dict[str, float], step: int) -> None:
        """The epoch's metrics and a few explanation images of its last batch into TensorBoard (if asked for), at
        the run's optimiser step (TensorBoard's x-axis; ``epoch/epoch`` says which epoch ended there)."""
        if self._board is None:
            return
        self._board.epoch(step, {"epoch": epoch + 1, **metrics})
        if self.snapshot is not None and self._last_batch is not None:
            self._board.images(step, self.snapshot(self._last_batch))

    def _report(self, epoch: int, metrics: dict[str, float], eta: float = 0.0) -> None:
        """One console line per epoch (stderr, with the progress bars): loss parts, validation metrics and, before
        the last epoch, the whole run's ETA (the mean time per epoch so far, validation included)."""
        if not self.progress:
            return
        shown = {k: v for k, v in metrics.items() if k not in ("samples_per_s", "lr")}
        parts = "  ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "sec_per_epoch")
        left = f", run ETA {_duration(eta)}" if epoch + 1 < self.epochs else ""
        print(f"{self.desc} {epoch + 1}/{self.epochs}  {parts}  ({metrics['sec_per_epoch']:.1f} s, "
              f"{metrics['samples_per_s']:.0f} samples/s{left})", file=sys.stderr, flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, out: Path, epoch: int, num_updates: int,
                   position: tuple[int, dict[str, float]] | None = None) -> None:
        """Write ``out/checkpoint.pt`` atomically (tensors and plain values only: loads with ``weights_only``).

        ``epoch`` epochs are complete; ``position`` — (the next global batch of epoch ``epoch``, the loss sums of
        the batches before it) — marks a checkpoint within that epoch."""
        step, sums = position if position is not None else (0, {})
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": epoch, "num_updates": num_updates,
                 "step": step, "epoch_sums": json.dumps(sums),
                 "torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1]),
                 "python_rng_version": random.getstate()[0], "options": json.dumps(self.options, default=str),
                 "steps_per_epoch": self.steps_per_epoch, "global_batch": self._global_batch(),
                 "order": json.dumps(self.order)}
        tmp = out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out / "checkpoint.pt")

    def _global_batch(self) -> int | None:
        batch = self.options.get("batch_size")
        return int(batch) * self.world if batch is not None else None

    def restore(self, out: Path) -> tuple[int, int, int, dict[str, float] | None]:
        """Load ``out/checkpoint.pt``; returns (epochs done, updates done, next global batch of the epoch in
        progress, the loss sums of its batches so far)."""
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
        step = int(state.get("step", 0))
        return state["epoch"], state["num_updates"], step, json.loads(state.get("epoch_sums") or "{}") or None

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
        recorded_batch, batch = state.get("global_batch"), self._global_batch()
        if recorded_batch is not None and batch is not None and int(recorded_batch) != batch:
            raise ValueError(f"--resume: the run was started with a global batch of {int(recorded_batch)} "
                             f"(--batch-size × ranks), now {batch} (--batch-size {self.options.get('batch_size')} × "
                             f"{self.world} rank(s)); the global batch cannot change on resume")
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


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min 05 s``, ``3 h 12 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _last_metrics(path: Path) -> dict[str, float]:
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return {k: v for k, v in lines[-1].items() if k not in ("epoch", "steps")} if lines else {}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["epoch"] <= epochs_done))


def _truncate_trace(path: Path, epoch: int, step: int) -> None:
    """Drop traced steps at or after (``epoch``, ``step``): a resumed run appends them again."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if (json.loads(ln)["epoch"], json.loads(ln)["step"]) < (epoch, step)]
        path.write_text("".join(ln + "\n" for ln in keep))
