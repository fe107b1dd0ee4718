"""Benchmark of train-student: step time from the cache vs targets in memory (floor) vs a live teacher.

Run: ``make bench`` (or ``.venv/bin/python bench/bench_train.py --out bench/RESULTS_train.md``).

Side by side in one run, on the same student/teacher pair and the same batches:
- **cache**: the real loader (images decoded, joined by key with the cache, joint crop) + the e²KD step;
- **floor**: the same batches already in memory, e²KD step only;
- **online**: the same batches in memory, plus a live teacher forward + GradCAM backward per step.
Ratios: cache/floor (goal ≤ 1.05) and online/cache (the speed-up of caching). Three pairs: the demo pair
(narrow ResNet-18s) and ResNet-50 → ResNet-18 at 64 px, and ResNet-50 → ResNet-18 at 224 px (ImageNet's size:
fewer, smaller batches, so that it runs in minutes on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from report import write_section  # noqa: E402

from e2kd.models import create_model  # noqa: E402
from e2kd.pipeline._datasets import make_digits_shift  # noqa: E402
from e2kd.pipeline._train_stream import endless_batches  # noqa: E402
from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher  # noqa: E402
from e2kd.stages._train_student import TrainOptions, prepare_student  # noqa: E402
from e2kd.training import OnlineTeacherTargets  # noqa: E402

#: name → (teacher, student, input size px, batch, timed steps); None: the command line's batch / steps
PAIRS = {
    "demo (ResNet-18 w32–256 → ResNet-18 w16–128), 64 px": (
        ("resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32, "output_stride": 16}),
        ("resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}), 64, None, None),
    "ResNet-50 → ResNet-18, 64 px": (("resnet50", {"output_stride": 16}), ("resnet18", {"output_stride": 16}), 64,
                                     None, None),
    "ResNet-50 → ResNet-18, 224 px": (("resnet50", {}), ("resnet18", {}), 224, 8, 6),
}


def _time_steps(trainer, batches, steps: int) -> float:
    trainer.step(batches[0])  # warm-up
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.step(batches[(i + 1) % len(batches)])
    return (time.perf_counter() - t0) / steps


def _time_loader_steps(trainer, it, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(next(it))
    return (time.perf_counter() - t0) / steps


def bench_pair(name: str, teacher: tuple, student: tuple, data: str, work: Path, steps: int, batch_size: int,
               size: int = 64) -> dict:
    cache = work / f"cache-{teacher[0]}-{size}"
    run_cache_teacher(CacheTeacherOptions(data=data, out=str(cache), teacher=teacher[0], num_classes=10,
                                          teacher_kwargs=teacher[1], views="full", input_size=size, flip_p=0.0,
                                          progress=False, overwrite=True, random_teacher=True))
    opts = TrainOptions(data=data, cache=str(cache), student=student[0], student_kwargs=student[1],
                        out=str(work / "run"), batch_size=batch_size, lr=1e-3, temperature=4.0, lam=1.0,
                        crop_scale=(0.7, 1.0), progress=False, workers=1)
    run = prepare_student(opts)
    trainer = run.trainer
    it = endless_batches(trainer.stream, trainer.loader)  # more steps than an epoch may have
    batches = [next(it) for _ in range(steps)]
    _time_steps(trainer, batches, 3)  # warm-up: allocator, oneDNN primitives, loader worker start
    floor = _time_steps(trainer, batches, steps)
    cached = _time_loader_steps(trainer, it, steps)
    floor = min(floor, _time_steps(trainer, batches, steps))  # interleaved twice, best of two each: on a shared
    cached = min(cached, _time_loader_steps(trainer, it, steps))  # 2-core machine single runs vary by ±20 %
    run.objective.targets = OnlineTeacherTargets(create_model(teacher[0], 10, **teacher[1]), "gradcam")
    online = _time_steps(trainer, batches, steps)
    return {"pair": name, "size": size, "batch": batch_size, "steps": steps, "cache_s": cached, "floor_s": floor,
            "online_s": online, "cache_over_floor": cached / floor, "online_over_cache": online / cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    # The step gets one core and the DataLoader worker the other: the shape of a GPU machine, where the step
    # runs on the accelerator while CPU cores feed it. (With both on the same cores the loader steals the step's.)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    work = Path(tempfile.mkdtemp(prefix="e2kd-bench-train-"))
    try:
        rows = []
        for name, (teacher, student, size, batch, steps) in PAIRS.items():
            root = work / f"data-{size}"
            if not root.exists():
                make_digits_shift(root, image_size=size, shard_size=100 if size <= 64 else 40)
            data = f"{root}/teacher-train-{{000000..{10 if size <= 64 else 2:06d}}}.tar"
            rows.append(bench_pair(name, teacher, student, data, work, steps or args.steps, batch or args.batch, size))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=1, default=repr))
    if args.out:
        lines = ["## train-student", "", f"Command: `{' '.join(sys.argv)}` (via `make bench`), {os.cpu_count()} CPU "
                 f"cores, no GPU (step on {max(1, (os.cpu_count() or 2) - 1)} core(s), "
                 f"1 DataLoader worker on the other), digits-shift, λ=1 GradCAM e²KD, `full` cache with joint crop; "
                 f"{time.strftime('%Y-%m-%d')}.", "",
                 "| pair | batch × timed steps | cache s/step | floor s/step | online s/step "
                 "| cache/floor (goal ≤ 1.05) | online/cache (speed-up) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['pair']} | {r['batch']} × {r['steps']} | {r['cache_s']:.3f} | {r['floor_s']:.3f} | "
                         f"{r['online_s']:.3f} | "
                         f"{r['cache_over_floor']:.2f} | {r['online_over_cache']:.2f}× |")
        write_section(args.out, "train-student", "\n".join(lines))


if __name__ == "__main__":
    main()
