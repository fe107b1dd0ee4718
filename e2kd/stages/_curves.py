"""``e2kd plot``: training curves of train-student / train-teacher runs (their ``metrics.jsonl``), overlaid.

One figure, three panels — the loss and its parts, the learning rate, the validation metrics — with epochs on the
x-axis; each run has its colour (legend: its directory name) and each quantity its line style. A run of a single
epoch shows as markers; a loss term that is 0 throughout (unused) is left out; a panel no run has data for says so
instead of staying blank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PANELS", "read_metrics", "plot_runs", "run_labels"]

#: panel title → the metrics.jsonl fields drawn in it (those a run has)
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "kd", "expl", "ce"),
    "learning rate": ("lr",),
    "validation": ("top1", "agreement", "expl_sim"),
}
_STYLES = ("-", "--", ":", "-.")

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # panel → line label → (epoch, value) points


def read_metrics(run: str | Path) -> list[dict[str, float]]:
    """The per-epoch lines of a run's ``metrics.jsonl``.

    Raises:
        FileNotFoundError: ``run`` holds no ``metrics.jsonl`` (not a train-student or train-teacher run, or none of
            its epochs has finished yet).
        ValueError: a line is not a JSON object with an ``epoch``.
    """
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl — not a train-student / train-teacher run directory, or "
                                f"its first epoch has not finished")
    lines = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(line, dict) or not isinstance(line.get("epoch"), int):
            raise ValueError(f"{path}:{n}: not a metrics line (no integer 'epoch')")
        lines.append(line)
    return lines


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Legend names: each run's directory name, with its parent where two names would be equal."""
    paths = [Path(r).resolve() for r in runs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def collect(runs: Sequence[str | Path]) -> Curves:
    """What :func:`plot_runs` draws: per panel, per ``"<run> <metric>"`` line, its ``(epoch, value)`` points."""
    curves: Curves = {panel: {} for panel in PANELS}
    for label, run in zip(run_labels(runs), runs, strict=True):
        lines = read_metrics(run)
        for panel, keys in PANELS.items():
            for key in keys:
                points = [(int(m["epoch"]), float(m[key])) for m in lines if isinstance(m.get(key), (int, float))]
                if panel == "loss" and key != "loss" and all(v == 0 for _, v in points):
                    continue  # a term the run does not use (KD's expl, a ce weight of 0): no line of zeros
                if points:
                    curves[panel][f"{label} {key}"] = points
    return curves


def plot_runs(runs: Sequence[str | Path], out: str | Path) -> Curves:
    """Draw the runs' curves into ``out`` (any format matplotlib writes: ``.png``, ``.svg``, ``.pdf``); returns
    what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # an SVG keeps its text as text (searchable, smaller)
    if not runs:
        raise ValueError("give at least one run directory")
    curves = collect(runs)
    labels = run_labels(runs)
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 4.2), constrained_layout=True)
    for ax, (panel, keys) in zip(axes, PANELS.items(), strict=True):
        for name, points in curves[panel].items():
            run, key = name.rsplit(" ", 1)
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, _STYLES[keys.index(key) % len(_STYLES)], marker="o", markersize=4,
                    color=colours[run], label=name)
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        if curves[panel]:
            ax.legend(fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, "no data\n(no validation: --val-data)" if panel == "validation" else "no data",
                    ha="center", va="center", transform=ax.transAxes, color="grey")
    if curves["learning rate"]:
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle("  vs  ".join(labels) if len(labels) > 1 else labels[0])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return curves
