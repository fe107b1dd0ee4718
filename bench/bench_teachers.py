"""A student taught by two teachers against one: train-student's step time from one cache and from two caches of the
same inputs (KD towards the mixture, one explanation term per teacher), measured side by side.

Run: ``.venv/bin/python bench/bench_teachers.py [--out bench/RESULTS.md]`` (also part of ``make bench``).
Two narrow ResNet-18 teachers (different weights) cached with 2 views on digits-shift at 64 px; narrow ResNet-18
student, GradCAM, λ = 1, batch 32; the same pre-loaded batches for both, interleaved, best of three.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from e2kd.models import create_model  # noqa: E402
from e2kd.pipeline._datasets import make_digits_shift  # noqa: E402
from e2kd.pipeline._train_stream import endless_batches  # noqa: E402
from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher  # noqa: E402
from e2kd.stages._train_student import TrainOptions, prepare_student  # noqa: E402

KWARGS = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}
STEPS, BATCH = 8, 32


def _caches(work: Path) -> tuple[str, list[str]]:
    from safetensors.torch import save_file

    make_digits_shift(work / "data", image_size=64, shard_size=100)
    data = f"{work}/data/train-{{000000..000002}}.tar"
    caches = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpt = work / f"teacher{seed}.safetensors"
        save_file(create_model("resnet18", 10, **KWARGS).state_dict(), ckpt)
        out = work / f"cache{seed}"
        run_cache_teacher(CacheTeacherOptions(data=data, out=str(out), teacher="resnet18", num_classes=10,
                                              teacher_checkpoint=str(ckpt), teacher_kwargs=KWARGS, views="2",
                                              input_size=64, actors=1, progress=False, flip_p=0.0))
        caches.append(str(out))
    return data, caches


def _seconds_per_step(data: str, caches: list[str], work: Path) -> tuple[float, float]:
    opts = TrainOptions(data=data, cache=caches if len(caches) > 1 else caches[0], student="resnet18",
                        student_kwargs=KWARGS, out=str(work / f"run{len(caches)}"), batch_size=BATCH, epochs=1,
                        progress=False, overwrite=True)
    run = prepare_student(opts)
    run.trainer.stream.set_epoch(0)
    it = endless_batches(run.trainer.stream, run.trainer.loader)  # more steps than an epoch may have
    batches = [next(it) for _ in range(4)]
    run.trainer.step(batches[0])  # warm-up
    t0, explanations = time.perf_counter(), 0.0
    for i in range(STEPS):
        explanations += run.trainer.step(batches[(i + 1) % len(batches)]).get("student_explanations", 1.0)
    return (time.perf_counter() - t0) / STEPS, explanations / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write a Markdown report here (default: print only)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="e2kd-bench-") as tmp:
        work = Path(tmp)
        data, caches = _caches(work)
        best = {1: (float("inf"), 0.0), 2: (float("inf"), 0.0)}
        for _ in range(3):  # interleaved: the machine's noise hits both alike
            for n in (1, 2):
                s, expl = _seconds_per_step(data, caches[:n], work)
                best[n] = min(best[n], (s, expl))
    result = {"one_teacher_s_per_step": best[1][0], "two_teachers_s_per_step": best[2][0],
              "ratio": best[2][0] / best[1][0], "student_explanations_per_step": best[2][1]}
    print(json.dumps(result, indent=1))
    if args.out:
        write_section(args.out, "teachers", report(result, " ".join(["bench/bench_teachers.py", *sys.argv[1:]])))


def report(r: dict, command: str) -> str:
    return "\n".join([
        "## One student, two teachers (train-student --cache A --cache B)", "",
        f"Command: `.venv/bin/python {command}`. Step time (forward, explanations, double backward, optimiser) on "
        f"the same pre-loaded batches of {BATCH}, narrow ResNet-18 teachers and student at 64 px, GradCAM, λ = 1, "
        f"best of 3 interleaved, {torch.get_num_threads()} torch threads.", "",
        "| teachers | s/step |", "|---|---|",
        f"| one (`--cache A`) | {r['one_teacher_s_per_step']:.3f} |",
        f"| two (`--cache A --cache B`) | {r['two_teachers_s_per_step']:.3f} |", "",
        f"Ratio **{r['ratio']:.2f}×**. The cost is the student's explanations: one per distinct set of teacher "
        f"classes in a batch — here {r['student_explanations_per_step']:.2f} per step (two randomly initialised "
        f"teachers disagree on most samples; teachers that agree on every sample of a batch share one)."])


if __name__ == "__main__":
    main()
