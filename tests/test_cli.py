"""The command line entry point and the README example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from e2kd import __version__
from e2kd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_version() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "explainers" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_readme_example_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                         text=True, check=True, timeout=300)
    assert "'kd'" in out.stdout and "(8, 1, 2, 2) (8, 1, 4, 4)" in out.stdout


def test_packaged_presets_are_listed_and_shown() -> None:
    assert "demo-digits" in CliRunner().invoke(main, ["config", "list"]).output.split()
    shown = CliRunner().invoke(main, ["config", "show", "demo-digits"])
    assert shown.exit_code == 0 and "teacher: resnet18" in shown.output
    missing = CliRunner().invoke(main, ["config", "show", "nope"])
    assert missing.exit_code == 1 and "not a preset (demo-digits" in missing.output


def test_yaml_keys_are_the_flag_names_and_train_teacher_takes_a_config(tmp_path: Path) -> None:
    from e2kd.config import build_options
    from e2kd.stages.train_student import TrainOptions
    from e2kd.stages.train_teacher import TeacherOptions

    config = tmp_path / "run.yaml"
    config.write_text("lambda: 2.5\nquiet: true\nstudent: resnet18\n")
    opts = build_options(TrainOptions, config, {"data": "d", "out": "o", "cache": "c"})
    assert opts.lam == 2.5 and opts.progress is False and opts.student == "resnet18"
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text("model: resnet18\nnum_classes: 10\nopt: sgd\nweight_decay: 0.0\nwarmup_epochs: 0\n")
    t = build_options(TeacherOptions, teacher, {"data": "d", "out": "o", "lr": 0.1})
    assert (t.opt, t.weight_decay, t.warmup_epochs, t.lr, t.model) == ("sgd", 0.0, 0, 0.1, "resnet18")
    bad = CliRunner().invoke(main, ["train-teacher", "--config", str(teacher), "--data", "d", "--out", "o",
                                    "--label-smoothing", "1.5"])
    assert bad.exit_code == 1 and "--label-smoothing must be in [0, 1]" in bad.output
