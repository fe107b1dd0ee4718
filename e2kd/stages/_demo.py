"""``e2kd demo``: digits-shift end to end through the library — teacher, caches, KD vs e²KD students, results.

A workflow that composes the stages (the only module that does): it calls ``train_teacher``,
``run_cache_teacher``, ``train_student`` and ``evaluate_weights`` directly, with its settings from the
packaged ``demo-digits`` preset, so it runs from an installed wheel in any directory.

Methods (names used in every output): ``teacher`` (reference row), ``kd`` (λ=0 from the ``full`` cache),
``e2kd-frozen`` (❄: ``full`` cache, joint crop), ``e2kd-views`` (K-view cache, exact view replay) and
``e2kd-live`` (online teacher). Same student, same budget, several seeds each.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2kd._config import build_options
from e2kd.pipeline._datasets import make_digits_shift
from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher
from e2kd.stages._evaluate import evaluate_weights
from e2kd.stages._inspect import summarise_store
from e2kd.stages._train_student import TrainOptions, train_student
from e2kd.stages._train_teacher import TeacherOptions, train_teacher

__all__ = ["DemoPlan", "run_demo", "METHODS"]

METHODS = ("kd", "e2kd-frozen", "e2kd-views", "e2kd-live")
TEACHER_KWARGS = {"channels": [32, 64, 128, 256], "stem_width": 32, "output_stride": 16}
STUDENT_KWARGS = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}
PRESET = "demo-digits"


@dataclass(frozen=True)
class DemoPlan:
    """The demo's budget (``quick`` shrinks everything to check the pipeline, not the accuracies)."""

    teacher_epochs: int = 25
    student_epochs: int = 40
    steps_per_epoch: int = 5
    batch_size: int = 64
    views: int = 8
    lam: float = 5.0
    temperature: float = 4.0
    seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(teacher_epochs=2, student_epochs=2, steps_per_epoch=2, batch_size=32, views=2, seeds=(0,))


#: option fields whose flag is spelled differently
_FLAGS = {"lam": "--lambda", "format": "--format"}


def _echo(command: str, opts: Any, config: str | None = None, given: set[str] | None = None) -> None:
    """Print the CLI command equivalent to ``opts`` (shell-quoted, pasteable): the options that differ from the
    defaults, or only ``given`` ones when a ``config`` preset supplies the rest."""
    words = ["e2kd", command] + (["--config", config] if config else [])
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if (given is not None and f.name not in given) or (given is None and value == default):
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if f.name == "progress":
            words += [] if value else ["--quiet"]
        elif isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        elif isinstance(value, dict):
            words += [flag, json.dumps(value)]
        elif value is not None:
            words += [flag, str(value)]
    print("\n$ " + shlex.join(words), flush=True)


def _cache(data: str, out: Path, teacher: Path, views: str) -> int:
    """Cache the teacher on ``data`` (the demo owns ``out``: overwritten); return the store's bytes."""
    flags = {"data": data, "out": str(out), "teacher_checkpoint": str(teacher), "views": views,
             "crop_scale": (0.7, 1.0), "flip_p": 0.0, "overwrite": True, "progress": False}
    opts = build_options(CacheTeacherOptions, PRESET, flags)
    _echo("cache-teacher", opts, config=PRESET, given=set(flags))
    summary = run_cache_teacher(opts)
    info = summarise_store(str(out))
    print(f"cached {summary['num_samples']} samples, {info['bytes']} B ({info['bytes_per_sample_view']:.0f} B per "
          f"sample per view), map {info['map_shape']}", flush=True)
    return int(info["bytes"])


def _student_options(method: str, seed: int, d: dict[str, Any], plan: DemoPlan) -> TrainOptions:
    common = dict(data=d["train"], student="resnet18", student_kwargs=STUDENT_KWARGS,
                  out=str(d["runs"] / f"{method}-seed{seed}"), epochs=plan.student_epochs,
                  steps_per_epoch=plan.steps_per_epoch, batch_size=plan.batch_size, lr=3e-3,
                  temperature=plan.temperature, crop_scale=(0.7, 1.0), flip_p=0.0, seed=seed, progress=False,
                  lam=0.0 if method == "kd" else plan.lam, overwrite=True)  # the demo owns its --out
    if method == "e2kd-live":
        return TrainOptions(**common, online_teacher="resnet18", teacher_checkpoint=str(d["teacher"]),
                            teacher_kwargs=TEACHER_KWARGS, num_classes=10, explainer="gradcam", input_size=64)
    return TrainOptions(**common, cache=str(d["cache_views"] if method == "e2kd-views" else d["cache_full"]))


def _row(method: str, seed: int, weights: Path, d: dict[str, Any], kwargs: dict, sec: float,
         cache_bytes: int) -> dict[str, Any]:
    val = evaluate_weights(d["val"], "resnet18", str(weights), kwargs, cache=str(d["cache_val"]))
    ood = evaluate_weights(d["ood"], "resnet18", str(weights), kwargs, cache=str(d["cache_ood"]))
    return {"method": method, "seed": seed, "id_acc": val["top1"], "ood_acc": ood["top1"],
            "agreement": val["agreement"], "expl_sim": val["expl_sim"], "sec_per_epoch": sec,
            "cache_bytes": cache_bytes}


def _data(root: Path) -> dict[str, Any]:
    print("\n$ " + shlex.join(["e2kd", "make-dataset", "digits-shift", "--out", str(root / "data")]), flush=True)
    written = make_digits_shift(root / "data")
    d: dict[str, Any] = {split: ",".join(str(p) for p in sorted(paths)) for split, paths in written.items()}
    d.update(ood=d.pop("test-ood"), runs=root / "runs", teacher=root / "teacher" / "teacher.safetensors")
    return d


#: What the demo writes into its --out: anything else there means it is not a demo directory.
DEMO_ENTRIES = ("data", "teacher", "cache-full", "cache-views", "cache-val", "cache-ood", "runs", "results.json",
                "results.md", "explanations.png")


def _check_demo_dir(root: Path) -> None:
    """The demo replaces its own earlier output; a file, or a directory holding anything else, is refused."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"--out {root} is a file, not a directory")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in DEMO_ENTRIES) if root.is_dir() else []
    if foreign:
        raise FileExistsError(f"--out {root} holds entries the demo did not write ({', '.join(foreign[:3])}): "
                              f"e2kd never writes into a directory it does not own — choose another --out")


def run_demo(out: str | Path, quick: bool = False) -> list[dict[str, Any]]:
    """Run the whole demo into ``out``; return the rows written to ``results.json``."""
    plan = DemoPlan.quick() if quick else DemoPlan()
    root = Path(out)
    _check_demo_dir(root)
    t0 = time.time()
    d = _data(root)
    teacher = TeacherOptions(data=d["teacher-train"], teacher="resnet18", teacher_kwargs=TEACHER_KWARGS, num_classes=10,
                             input_size=64, epochs=plan.teacher_epochs, out=str(root / "teacher"), progress=False,
                             overwrite=True)
    _echo("train-teacher", teacher)
    train_teacher(teacher)
    sizes = {"full": _cache(d["train"], root / "cache-full", d["teacher"], "full"),
             "views": _cache(d["train"], root / "cache-views", d["teacher"], str(plan.views))}
    _cache(d["val"], root / "cache-val", d["teacher"], "full")
    _cache(d["ood"], root / "cache-ood", d["teacher"], "full")
    d.update(cache_full=root / "cache-full", cache_views=root / "cache-views", cache_val=root / "cache-val",
             cache_ood=root / "cache-ood")
    teacher_sec = _mean_sec(root / "teacher" / "metrics.jsonl")
    rows = [_row("teacher", 0, d["teacher"], d, TEACHER_KWARGS, teacher_sec, 0)]
    for method in METHODS:
        for seed in plan.seeds:
            opts = _student_options(method, seed, d, plan)
            _echo("train-student", opts)
            train_student(opts)
            run = d["runs"] / f"{method}-seed{seed}"
            nbytes = {"kd": sizes["full"], "e2kd-frozen": sizes["full"], "e2kd-views": sizes["views"]}.get(method, 0)
            rows.append(_row(method, seed, run / "student.safetensors", d, STUDENT_KWARGS,
                             _mean_sec(run / "metrics.jsonl"), nbytes))
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    table = results_table(rows, plan, time.time() - t0)
    (root / "results.md").write_text(table)
    print("\n" + table)
    from e2kd.stages._figures import explanation_grid

    explanation_grid(d["ood"], d["cache_ood"], {m: d["runs"] / f"{m}-seed{plan.seeds[0]}" / "student.safetensors"
                                                 for m in ("kd", "e2kd-frozen", "e2kd-views")},
                     "resnet18", STUDENT_KWARGS, root / "explanations.png")
    return rows


def _mean_sec(metrics: Path) -> float:
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return statistics.fmean(ln["sec_per_epoch"] for ln in lines)


def _cell(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.3f}"
    lo, hi = min(values) * scale, max(values) * scale
    return f"{mean:.1f} [{lo:.1f}, {hi:.1f}]" if pct else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def results_table(rows: list[dict[str, Any]], plan: DemoPlan, seconds: float) -> str:
    """Markdown: per method mean [min, max] over seeds."""
    lines = ["# e2kd demo: digits-shift (real digits + label-coloured patch)", "",
             f"Teacher {plan.teacher_epochs} epochs; students {plan.student_epochs} epochs × {plan.steps_per_epoch} "
             f"steps, batch {plan.batch_size}, T={plan.temperature}, λ={plan.lam} (kd: λ=0), explanation cosine at "
             f"the input size, seeds {list(plan.seeds)}; {plan.views}-view cache for e2kd-views. "
             f"Total {seconds / 60:.1f} min. "
             "Accuracies in %, mean [min, max] over seeds; agreement and explanation similarity on val.", "",
             "| method | ID acc (val) | OOD acc (test-ood) | agreement | expl. sim. | s/epoch | cache bytes |",
             "|---|---|---|---|---|---|---|"]
    for method in ("teacher", *METHODS):
        group = [r for r in rows if r["method"] == method]
        if not group:
            continue
        lines.append(f"| {method} | {_cell([r['id_acc'] for r in group])} | {_cell([r['ood_acc'] for r in group])} "
                     f"| {_cell([r['agreement'] for r in group])} | {_cell([r['expl_sim'] for r in group], False)} "
                     f"| {statistics.fmean(r['sec_per_epoch'] for r in group):.2f} | {group[0]['cache_bytes']} |")
    return "\n".join(lines) + "\n"
