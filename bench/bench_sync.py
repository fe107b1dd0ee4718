"""Benchmark of keeping ranks and workers busy: gradient sync at 2 ranks, and DataLoader workers across epochs.

Run: ``.venv/bin/python bench/bench_sync.py [--out bench/RESULTS.md]`` (part of ``make bench``; ~3 min on 2 cores).

1. **Gradient sync** (``torchrun --nproc_per_node 2``, gloo, CPU, one thread per rank): the train-student step
   (ResNet-18 student, GradCAM e²KD with its double backward, cached targets, batches already in memory) with
   DDP around the whole objective (``ddp``, the default, with DDP's ``static_graph``; also without it) against the
   former hand sync (``allreduce``: one blocking all-reduce per parameter tensor after the backward). The modes
   take turns on the same model and batches, so machine noise hits all alike; s/step is the median. Collectives per
   step count the gradient all-reduces (the loop adds two small ones: the losses' mean and the SIGTERM flag).
2. **Workers across epochs**: time from the start of epoch 2 to its first batch with the DataLoader workers kept
   (persistent, the default) and re-forked per epoch (as before), side by side, 2 workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))

from report import write_section  # noqa: E402

STUDENT = ("resnet18", {"output_stride": 16})  # full width: 11.7 M parameters in 62 tensors, 45 MB of gradients
TEACHER = ("resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16})
ROUNDS, STEPS_PER_TURN = 5, 2


def _options(work: Path, batch: int, workers: int) -> object:
    from e2kd.stages._train_student import TrainOptions

    return TrainOptions(data=f"{work}/digits/teacher-train-{{000000..000010}}.tar", cache=str(work / "cache"),
                        student=STUDENT[0], student_kwargs=STUDENT[1], out=str(work / "run"), batch_size=batch,
                        lr=1e-3, temperature=4.0, lam=1.0, progress=False, workers=workers)


def prepare(work: Path) -> None:
    from e2kd.pipeline._datasets import make_digits_shift
    from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher

    make_digits_shift(work / "digits", image_size=64, shard_size=100)
    run_cache_teacher(CacheTeacherOptions(
        data=f"{work}/digits/teacher-train-{{000000..000010}}.tar", out=str(work / "cache"), teacher=TEACHER[0],
        teacher_kwargs=TEACHER[1], num_classes=10, views="full", input_size=64, progress=False, random_teacher=True))


def rank_worker(work: Path, batch: int) -> None:
    """One rank of the gradient-sync comparison (under torchrun); rank 0 writes ``sync.json``."""
    import torch

    from e2kd.pipeline._train_stream import endless_batches
    from e2kd.stages._train_student import prepare_student
    from e2kd.training._sync import count_collectives, step_forward

    torch.set_num_threads(1)
    run = prepare_student(_options(work, batch, 0))
    ddp = run.trainer
    it = endless_batches(ddp.stream, ddp.loader)
    batches = [next(it) for _ in range(STEPS_PER_TURN)]
    hand = dataclasses.replace(ddp, grad_sync="allreduce")
    dynamic = dataclasses.replace(ddp, grad_sync="allreduce")
    dynamic.grad_sync, dynamic._forward = "ddp", step_forward(ddp.model, ddp.objective, ddp.world, "ddp",
                                                              static_graph=False)
    modes = {"ddp (static graph: the default)": ddp, "ddp (dynamic graph)": dynamic, "allreduce (before)": hand}
    counters = {name: [0] for name in modes}
    for name, trainer in modes.items():
        trainer.step(batches[0])  # warm-up (DDP's first step also builds its buckets)
        if trainer.grad_sync == "ddp":
            count_collectives(trainer._forward, counters[name])
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(ROUNDS):
        for name, trainer in modes.items():
            for b in batches:
                torch.distributed.barrier()
                t0 = time.perf_counter()
                trainer.step(b)
                times[name].append(time.perf_counter() - t0)
    steps = ROUNDS * len(batches)
    params = sum(1 for _ in ddp.model.parameters())
    result = {name: {"s_per_step": statistics.median(t),
                     "collectives": counters[name][0] / steps if modes[name].grad_sync == "ddp" else params}
              for name, t in times.items()}
    if ddp.rank == 0:
        (work / "sync.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def bench_sync(work: Path, batch: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           __file__, "--rank-worker", str(work), "--batch", str(batch)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((work / "sync.json").read_text())


def bench_workers(work: Path, batch: int, workers: int = 2, rounds: int = 3) -> dict[str, float]:
    """Seconds from the start of epoch 2 to its first batch, workers kept vs re-forked (median of ``rounds``)."""
    from e2kd.pipeline._train_stream import build_train_loader
    from e2kd.stages._train_student import prepare_student

    run = prepare_student(_options(work, batch, workers))
    base = run.trainer.stream
    result: dict[bool, list[float]] = {}
    for persistent in (True, False) * rounds:
        stream, loader = build_train_loader(base.spec, base.order, base.steps, workers, persistent=persistent)
        stream.set_epoch(0)
        for _ in loader:
            pass
        stream.set_epoch(1)
        t0 = time.perf_counter()
        next(iter(loader))
        result.setdefault(persistent, []).append(time.perf_counter() - t0)
        del loader
    return {"kept": statistics.median(result[True]), "re-forked": statistics.median(result[False])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the tables into this RESULTS.md")
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_worker(Path(args.rank_worker), args.batch)
    work = Path(tempfile.mkdtemp(prefix="e2kd-bench-sync-"))
    try:
        prepare(work)
        sync = bench_sync(work, args.batch)
        workers = bench_workers(work, 32)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"sync": sync, "workers": workers}, indent=1))
    if args.out:
        base = sync["allreduce (before)"]["s_per_step"]
        lines = ["## gradient sync and workers", "",
                 f"Command: `{' '.join(sys.argv)}` (via `make bench`), {os.cpu_count()} CPU cores, no GPU; "
                 f"{time.strftime('%Y-%m-%d')}. Gradient sync: 2 ranks (torchrun, gloo, one thread each), "
                 f"ResNet-18 student (11.7 M parameters, 62 tensors) × {args.batch} per rank at 64 px, GradCAM "
                 f"e²KD from a cache, batches in memory, median of {ROUNDS * STEPS_PER_TURN} steps per mode taken "
                 f"in turns.", "",
                 "| gradient sync | s/step | vs allreduce | gradient collectives per step |", "|---|---|---|---|"]
        for name, r in sync.items():
            lines.append(f"| {name} | {r['s_per_step']:.3f} | {r['s_per_step'] / base:.2f}× | "
                         f"{r['collectives']:g} |")
        lines += ["", "Workers across epochs (2 DataLoader workers, batch 32, digits-shift cache; median of 3 "
                  "alternations):", "", "| DataLoader workers | s to the first batch of epoch 2 |", "|---|---|",
                  f"| kept (persistent, now) | {workers['kept']:.3f} |",
                  f"| re-forked every epoch (before) | {workers['re-forked']:.3f} |"]
        write_section(args.out, "grad-sync", "\n".join(lines))


if __name__ == "__main__":
    main()
