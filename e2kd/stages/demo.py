"""``e2kd demo``: digits-shift end to end through the real CLI — teacher, caches, KD vs e²KD students, results.

Methods (names used in every output): ``teacher`` (reference row), ``kd`` (λ=0 from the ``full`` cache),
``e2kd-frozen`` (❄: ``full`` cache, joint crop), ``e2kd-views`` (K-view cache, exact view replay) and
``e2kd-live`` (online teacher). Same student, same budget, several seeds each.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoPlan", "run_demo", "METHODS"]

METHODS = ("kd", "e2kd-frozen", "e2kd-views", "e2kd-live")
TEACHER_KWARGS = {"channels": [32, 64, 128, 256], "stem_width": 32, "output_stride": 16}
STUDENT_KWARGS = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}


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


def _cli(*args: str, capture: bool = False) -> str:
    """Run one e2kd command through the real click CLI (in-process: one Ray session for the whole demo)."""
    from e2kd.cli import main

    print(f"\n$ e2kd {' '.join(args)}", flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        main.main(args=list(args), prog_name="e2kd", standalone_mode=False)
    return buf.getvalue()


def _cache(data: str, out: Path, teacher: Path, views: str, plan: DemoPlan) -> int:
    _cli("cache-teacher", "--config", str(_config()), "--data", data, "--out", str(out), "--checkpoint", str(teacher),
         "--views", views, "--crop-scale", "0.7", "1.0", "--flip-p", "0", "--overwrite", "--quiet")  # demo owns DIR
    _cli("inspect", str(out))
    return json.loads(_cli("inspect", str(out), "--json", capture=True))["bytes"]


def _config() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "demo-digits.yaml"


def _student_args(method: str, seed: int, d: dict[str, Any], plan: DemoPlan) -> list[str]:
    args = ["train-student", "--data", d["train"], "--student", "resnet18", "--student-kwargs",
            json.dumps(STUDENT_KWARGS), "--out", str(d["runs"] / f"{method}-seed{seed}"), "--epochs",
            str(plan.student_epochs), "--steps-per-epoch", str(plan.steps_per_epoch), "--batch-size",
            str(plan.batch_size), "--lr", "3e-3", "--temperature", str(plan.temperature), "--crop-scale", "0.7",
            "1.0", "--flip-p", "0", "--seed", str(seed), "--quiet",
            "--lambda", "0" if method == "kd" else str(plan.lam)]
    if method == "e2kd-live":
        return args + ["--online-teacher", "resnet18", "--teacher-checkpoint", str(d["teacher"]), "--teacher-kwargs",
                       json.dumps(TEACHER_KWARGS), "--num-classes", "10", "--explainer", "gradcam",
                       "--input-size", "64"]
    return args + ["--cache", str(d["cache_views"] if method == "e2kd-views" else d["cache_full"])]


def _evaluate(weights: Path, data: str, cache: Path, model: str, kwargs: dict) -> dict[str, float]:
    return json.loads(_cli("evaluate", "--data", data, "--cache", str(cache), "--student", model, "--student-kwargs",
                           json.dumps(kwargs), "--weights", str(weights), "--json", capture=True))


def _row(method: str, seed: int, weights: Path, d: dict[str, Any], model: str, kwargs: dict, sec: float,
         cache_bytes: int) -> dict[str, Any]:
    val = _evaluate(weights, d["val"], d["cache_val"], model, kwargs)
    ood = _evaluate(weights, d["ood"], d["cache_ood"], model, kwargs)
    return {"method": method, "seed": seed, "id_acc": val["top1"], "ood_acc": ood["top1"],
            "agreement": val["agreement"], "expl_sim": val["expl_sim"], "sec_per_epoch": sec,
            "cache_bytes": cache_bytes}


def run_demo(out: str | Path, quick: bool = False) -> list[dict[str, Any]]:
    """Run the whole demo into ``out``; return the rows written to ``results.json``."""
    plan = DemoPlan.quick() if quick else DemoPlan()
    root = Path(out)
    t0 = time.time()
    _cli("make-dataset", "digits-shift", "--out", str(root / "data"))
    shards = {split: sorted((root / "data").glob(f"{split}-*.tar")) for split in ("teacher-train", "train", "val",
                                                                                   "test-ood")}
    d: dict[str, Any] = {k: ",".join(str(p) for p in v) for k, v in shards.items()}
    d.update(val=d.pop("val"), ood=d.pop("test-ood"), runs=root / "runs", teacher=root / "teacher" /
             "teacher.safetensors")
    _cli("train-teacher", "--data", d["teacher-train"], "--model", "resnet18", "--model-kwargs",
         json.dumps(TEACHER_KWARGS), "--num-classes", "10", "--input-size", "64", "--epochs", str(plan.teacher_epochs),
         "--out", str(root / "teacher"), "--quiet")
    sizes = {"full": _cache(d["train"], root / "cache-full", d["teacher"], "full", plan),
             "views": _cache(d["train"], root / "cache-views", d["teacher"], str(plan.views), plan)}
    _cache(d["val"], root / "cache-val", d["teacher"], "full", plan)
    _cache(d["ood"], root / "cache-ood", d["teacher"], "full", plan)
    d.update(cache_full=root / "cache-full", cache_views=root / "cache-views", cache_val=root / "cache-val",
             cache_ood=root / "cache-ood")
    teacher_sec = _mean_sec(root / "teacher" / "metrics.jsonl")
    rows = [_row("teacher", 0, d["teacher"], d, "resnet18", TEACHER_KWARGS, teacher_sec, 0)]
    for method in METHODS:
        for seed in plan.seeds:
            _cli(*_student_args(method, seed, d, plan))
            run = d["runs"] / f"{method}-seed{seed}"
            nbytes = {"kd": sizes["full"], "e2kd-frozen": sizes["full"], "e2kd-views": sizes["views"]}.get(method, 0)
            rows.append(_row(method, seed, run / "student.safetensors", d, "resnet18", STUDENT_KWARGS,
                             _mean_sec(run / "metrics.jsonl"), nbytes))
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    table = results_table(rows, plan, time.time() - t0)
    (root / "results.md").write_text(table)
    print("\n" + table)
    from e2kd.stages.figures import explanation_grid

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
