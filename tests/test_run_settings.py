"""Runs keep their settings: a cache built from a teacher run takes the run's input size; a resumed run keeps the
schedule it was started with (a different --epochs is refused by name, not silently ignored)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEACHER_KWARGS

from e2kd.cli import main


def _teacher_run(tmp_path: Path, teacher_ckpt: Path, input_size: int) -> Path:
    """A train-teacher run directory as train-teacher writes it (summary with the model spec and its options)."""
    run = tmp_path / "teacher-run"
    run.mkdir()
    shutil.copy(teacher_ckpt, run / "teacher.safetensors")
    summary = {"teacher": {"name": "resnet18", "num_classes": 10, "kwargs": TEACHER_KWARGS},
               "options": {"input_size": input_size, "epochs": 25}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _captured_cache_options(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[object, str]:
    import e2kd.stages._cache_teacher as stage

    seen = {}

    def capture(opts: object) -> dict:
        seen["opts"] = opts
        return {"num_samples": 0, "shards": 0, "shards_cached_now": 0, "shards_already_complete": 0, "skipped": 0,
                "bytes_per_sample_view": 0.0, "samples_per_s": 0.0, "startup_seconds": 0.0}

    monkeypatch.setattr(stage, "run_cache_teacher", capture)
    result = CliRunner().invoke(main, ["cache-teacher", *args])
    assert result.exit_code == 0, result.output
    return seen["opts"], result.output


def test_cache_teacher_takes_the_teacher_runs_input_size(teacher_ckpt: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = _teacher_run(tmp_path, teacher_ckpt, input_size=96)
    base = ["--teacher-run", str(run), "--data", "x.tar", "--out", str(tmp_path / "store")]
    opts, out = _captured_cache_options(monkeypatch, *base)
    assert opts.input_size == 96 and opts.num_classes == 10 and "Warning" not in out
    opts, out = _captured_cache_options(monkeypatch, *base, "--input-size", "224")  # explicit: kept, but warned
    assert opts.input_size == 224
    assert "Warning: --input-size 224 differs from the 96 that --teacher-run" in out
    config = tmp_path / "c.yaml"
    config.write_text("input-size: 64\n")  # a config file's value is explicit too
    opts, out = _captured_cache_options(monkeypatch, *base, "--config", str(config))
    assert opts.input_size == 64 and "differs from the 96" in out


def _tree_sha(root: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.iterdir()) if p.is_file())).hexdigest()


def test_resume_refuses_a_different_schedule_and_changes_nothing(digits: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train-teacher", "--data", str(digits / "train-000000.tar"), "--teacher", "resnet18", "--num-classes",
            "10", "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--input-size", "64", "--batch-size", "16",
            "--warmup-epochs", "0", "--out", str(run), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    before = _tree_sha(run)
    for flag, value, words in (("--epochs", "3", "--epochs 1, now --epochs 3"),
                               ("--lr", "0.1", "--lr 0.003, now --lr 0.1")):
        epochs = [] if flag == "--epochs" else ["--epochs", "1"]
        result = CliRunner().invoke(main, [*args, *epochs, flag, value, "--resume"])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and lines[-1].startswith("Error: --resume:") and words in lines[-1], result.output
        assert "Traceback" not in result.output and _tree_sha(run) == before
    result = CliRunner().invoke(main, [*args, "--epochs", "1", "--resume"])  # the same schedule resumes (a no-op)
    assert result.exit_code == 0, result.output


def test_an_unknown_yaml_key_is_named_with_the_flag_it_resembles(tmp_path: Path) -> None:
    from e2kd._config import build_options
    from e2kd.stages._train_student import TrainOptions

    config = tmp_path / "run.yaml"
    config.write_text("lamda: 2\nepochs: 3\nbatchsize: 8\n")  # typos
    with pytest.raises(ValueError) as caught:
        build_options(TrainOptions, config, {})
    message = str(caught.value)
    assert "unknown option(s) batchsize (did you mean batch_size?), lamda (did you mean lambda?)" in message
    assert "lambda" in message.split("known: ")[1] and "quiet" in message and "'lam'" not in message
    config.write_text("lambda: 2\nquiet: true\n")
    opts = build_options(TrainOptions, config, {"data": "d", "cache": "c", "student": "s", "out": "o"})
    assert opts.lam == 2 and opts.progress is False


def test_train_teacher_on_unlabelled_data_says_so_not_lower_the_batch_size(tmp_path: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    from e2kd.stages._train_teacher import TeacherOptions, train_teacher

    with tarfile.open(tmp_path / "unlabelled-000000.tar", "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(buf, "PNG")
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    opts = dict(data=str(tmp_path / "unlabelled-000000.tar"), teacher="resnet18", num_classes=2,
                out=str(tmp_path / "t"), progress=False)
    with pytest.raises(ValueError, match=r"no labelled samples in --data \(3 sample\(s\), none with a class label"):
        train_teacher(TeacherOptions(**opts))
    assert not (tmp_path / "t").exists()


def test_train_teacher_counts_the_unreadable_samples_it_replaced(tmp_path: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(tmp_path / "labelled-000000.tar", "w") as tar:
        for i in range(16):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (i * 15, 255 - i * 15, 0)).save(buf, "PNG")
            data = buf.getvalue() if i != 5 else buf.getvalue()[:40]  # sample 5: a truncated PNG
            for name, payload in ((f"s{i:02d}.png", data), (f"s{i:02d}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "t"
    result = CliRunner().invoke(main, ["train-teacher", "--data", str(tmp_path / "labelled-000000.tar"), "--teacher",
                                       "resnet18", "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--num-classes",
                                       "2", "--input-size", "32", "--epochs", "2", "--batch-size", "8", "--workers",
                                       "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replaced_unreadable"] == 2  # the one unreadable sample, once per epoch, counted over 2 workers
    assert "skipped 2 unreadable sample read(s)" in result.output
