"""CLI misuse: one `Error:` line, never a traceback, caught before any work (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEACHER_KWARGS

from e2kd.cli import main

STUDENT_KWARGS = json.dumps({"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16})


def _cache_args(digits: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", f"{digits}/train-000000.tar", "--out", str(out), "--teacher", "resnet18",
            "--num-classes", "10", "--checkpoint", str(ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS),
            "--input-size", "64", "--views", "2", "--quiet", *extra]


def _train_args(digits: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--data", f"{digits}/train-{{000000..000005}}.tar", "--cache", str(cache),
            "--student", "resnet18", "--student-kwargs", STUDENT_KWARGS, "--out", str(out), "--batch-size", "16",
            "--epochs", "1", "--quiet", *extra]


def _one_error_line(result, *words: str) -> None:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and lines and lines[-1].startswith("Error: "), result.output
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[-1], (word, lines[-1])


CACHE_MISUSE = {
    "bogus teacher kwarg": (["--teacher-kwargs", '{"bogus": 1}'], "bogus"),
    "crop scale 0 5": (["--crop-scale", "0", "5"], "--crop-scale"),
    "flip-p 7": (["--flip-p", "7"], "--flip-p"),
    "map size larger than the map": (["--map-size", "9"], "--map-size"),
    "garbage checkpoint": (["--checkpoint", "GARBAGE"], "not a readable checkpoint"),
}


@pytest.mark.parametrize("case", list(CACHE_MISUSE))
def test_cache_teacher_misuse(case: str, digits: Path, teacher_ckpt: Path, tmp_path: Path, fault_log) -> None:
    extra, word = CACHE_MISUSE[case]
    if "GARBAGE" in extra:
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(b"\x00\x01 not a checkpoint" * 10)
        extra = ["--checkpoint", str(garbage)]
    out = tmp_path / "store"
    _one_error_line(CliRunner().invoke(main, _cache_args(digits, out, teacher_ckpt, *extra)), word)
    assert not (out / "manifest.json").exists()
    fault_log.record("clear error")


def test_bad_config_files_get_one_line(digits: Path, teacher_ckpt: Path, tmp_path: Path, fault_log) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("teacher: [resnet18\nviews: 2\n")
    _one_error_line(CliRunner().invoke(main, _cache_args(digits, tmp_path / "a", teacher_ckpt, "--config",
                                                        str(bad_yaml))), "not valid YAML")
    typed = tmp_path / "typed.yaml"
    typed.write_text("num_classes: ten\n")
    args = _cache_args(digits, tmp_path / "b", teacher_ckpt)
    args.remove("--num-classes")
    args.remove("10")
    _one_error_line(CliRunner().invoke(main, [*args, "--config", str(typed)]), "--num-classes", "ten")
    fault_log.record("clear error")


TRAIN_MISUSE = {
    "bogus student kwarg": (["--student-kwargs", '{"bogus": 1}'], "bogus"),
    "crop scale 0 5": (["--crop-scale", "0", "5"], "--crop-scale"),
    "flip-p 7 (ignored by a K-view cache, still checked)": (["--flip-p", "7"], "--flip-p"),
    "input size 7": (["--input-size", "7"], "--input-size"),
    "steps per epoch 0": (["--steps-per-epoch", "0"], "--steps-per-epoch"),
    "steps per epoch -2": (["--steps-per-epoch", "-2"], "--steps-per-epoch"),
    "shots 0": (["--shots", "0"], "--shots"),
    "nonexistent val data": (["--val-data", "/nonexistent/val-000000.tar"], "--val-data"),
}


@pytest.mark.parametrize("case", list(TRAIN_MISUSE))
def test_train_student_misuse_is_caught_before_anything_is_written(case: str, digits: Path, cache: Path,
                                                                  tmp_path: Path, fault_log) -> None:
    extra, word = TRAIN_MISUSE[case]
    args = _train_args(digits, cache, tmp_path / "run", *extra)
    if "--student-kwargs" in extra:
        i = args.index("--student-kwargs")
        del args[i:i + 2]
    _one_error_line(CliRunner().invoke(main, args), word)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
    fault_log.record("clear error")


def test_resuming_a_finished_run_keeps_its_final_metrics(digits: Path, cache: Path, tmp_path: Path, fault_log) -> None:
    args = _train_args(digits, cache, tmp_path / "run", "--steps-per-epoch", "2")
    assert CliRunner().invoke(main, args).exit_code == 0
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    assert final and "loss" in final
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"] == final
    fault_log.record("fault survived")
