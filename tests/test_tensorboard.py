"""``--tensorboard DIR``: the event files hold the run's losses per step, its epoch metrics (equal to metrics.jsonl)
and the teacher/student explanation images; without the package the option is a one-line error before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TEACHER_KWARGS

from e2kd.stages._train_student import TrainOptions, train_student


def _events(log_dir: Path) -> object:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_runs_losses_metrics_and_explanations(cache: Path, train_urls: str,
                                                                    tmp_path: Path) -> None:
    run, board = tmp_path / "run", tmp_path / "tb"
    train_student(TrainOptions(data=train_urls, cache=str(cache), student="resnet18", student_kwargs=TEACHER_KWARGS,
                               out=str(run), epochs=2, steps_per_epoch=3, batch_size=8, progress=False,
                               tensorboard=str(board)))
    acc = _events(board)
    tags = acc.Tags()
    assert {"train/loss", "train/kd", "train/expl", "train/lr", "epoch/loss", "epoch/epoch"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_loss = acc.Scalars("epoch/loss")
    assert [e.step for e in epoch_loss] == [m["steps"] for m in metrics] == [3, 6]
    assert [e.value for e in epoch_loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1, 2]
    step_losses = [e.value for e in acc.Scalars("train/loss")]
    assert sum(step_losses[:3]) / 3 == pytest.approx(metrics[0]["loss"], rel=1e-5)  # the epoch is its steps' mean
    assert {"explanations/image", "explanations/teacher", "explanations/student"} <= set(tags["images"])
    import io

    import numpy as np
    from PIL import Image

    for name in ("image", "teacher", "student"):
        events = acc.Images(f"explanations/{name}")
        assert [e.step for e in events] == [3, 6], name
        assert (events[-1].width, events[-1].height) == (4 * 64, 64), name  # 4 images of 64 px, side by side
        tiles = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("L")).astype(int)
        for i in range(4):  # every image has content; each map is min-max scaled to the full range
            tile = tiles[:, 64 * i:64 * (i + 1)]
            assert tile.max() - tile.min() > (200 if name != "image" else 30), (name, i)


def test_without_the_package_the_option_is_one_line_before_any_work(cache: Path, train_urls: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"needs the tensorboard package: pip install 'e2kd\[tensorboard\]'"):
        train_student(TrainOptions(data=train_urls, cache=str(cache), student="resnet18",
                                   student_kwargs=TEACHER_KWARGS, out=str(tmp_path / "run"), epochs=1,
                                   steps_per_epoch=1, batch_size=8, progress=False, tensorboard=str(tmp_path / "tb")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
