"""``e2kd plot``: the curves drawn are the runs' metrics, the figure holds them (SVG text, PNG colours)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TEACHER_KWARGS

from e2kd.cli import main
from e2kd.stages._curves import plot_runs


def _run(root: Path, name: str, lines: list[dict]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    a = _run(tmp_path, "kd-run", [{"epoch": e, "steps": 10 * e, "loss": 2.0 / e, "kd": 1.5 / e, "expl": 0.5 / e,
                                  "ce": 0.0, "lr": 1e-3 * (4 - e), "samples_per_s": 100.0, "top1": 0.2 * e,
                                  "agreement": 0.25 * e, "expl_sim": 0.1 * e} for e in (1, 2, 3)])
    b = _run(tmp_path, "e2kd-run", [{"epoch": 1, "steps": 5, "loss": 1.0, "ce": 1.0, "lr": 5e-4}])  # one epoch
    return [a, b]


def test_the_curves_are_the_runs_metrics_and_the_figure_holds_them(two_runs: list[Path], tmp_path: Path) -> None:
    curves = plot_runs(two_runs, tmp_path / "curves.svg")
    assert curves["loss"]["kd-run kd"] == [(1, 1.5), (2, 0.75), (3, 0.5)]
    assert curves["loss"]["e2kd-run loss"] == [(1, 1.0)] and curves["loss"]["e2kd-run ce"] == [(1, 1.0)]
    assert set(curves["learning rate"]) == {"kd-run lr", "e2kd-run lr"}
    assert set(curves["validation"]) == {"kd-run top1", "kd-run agreement", "kd-run expl_sim"}
    assert "samples_per_s" not in json.dumps(curves) and "kd-run ce" not in curves["loss"]  # unused: all zero
    svg = (tmp_path / "curves.svg").read_text()
    for text in ("kd-run kd", "e2kd-run ce", "kd-run top1", "learning rate", "validation", "epoch",
                 "kd-run  vs  e2kd-run"):
        assert text in svg, text
    from PIL import Image

    plot_runs(two_runs, tmp_path / "curves.png")
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
    assert image.shape[0] > 300 and image.shape[1] > 900
    for rgb in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 and C1: one colour per run
        assert (np.abs(image - rgb).sum(-1) < 30).sum() > 50, rgb


@pytest.fixture(scope="module")
def real_run(cache: Path, train_urls: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from e2kd.stages._train_student import TrainOptions, train_student

    run = tmp_path_factory.mktemp("real") / "run"
    train_student(TrainOptions(data=train_urls, cache=str(cache), student="resnet18", student_kwargs=TEACHER_KWARGS,
                               out=str(run), epochs=1, steps_per_epoch=1, batch_size=8, progress=False))
    return run


def test_plot_cli_on_a_real_run_and_a_directory_that_is_not_one(real_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["plot", str(real_run), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0 and "wrote" in result.output and (tmp_path / "c.png").stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "d.png")])
    assert result.exit_code != 0 and "no metrics.jsonl" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "d.png").exists()


def test_evaluate_a_run_needs_no_flag_the_run_records(real_run: Path, train_urls: str) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--data", train_urls, "--run", str(real_run), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["eval_samples"] > 0 and 0 <= metrics["top1"] <= 1
