"""Hostile or odd inputs: random teachers, labels out of range, keys in two shards, 16-bit PNGs, brace lists."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, cache_options, shard_checksums

from e2kd.cli import main
from e2kd.pipeline._loader import plan_join, select_shots
from e2kd.pipeline._sources import decode_image, list_shards
from e2kd.stages._cache_teacher import run_cache_teacher
from e2kd.storage import open_store


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, samples: list[tuple[str, str | None]], seed: int = 0) -> str:
    """A tar of 64 px images: ``(key, cls text or None)``."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for key, cls in samples:
            members = [(f"{key}.png", _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))]
            if cls is not None:
                members.append((f"{key}.cls", cls.encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _random_teacher_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", data, "--out", str(out), "--teacher", "resnet18", "--num-classes", "10",
            "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--views", "2", "--input-size", "64", "--quiet", *extra]


def test_a_random_teacher_must_be_asked_for_and_is_the_same_in_every_actor_and_on_resume(
        train_urls: str, digits: Path, tmp_path: Path, fault_log) -> None:
    runner = CliRunner()
    result = runner.invoke(main, _random_teacher_args(train_urls, tmp_path / "refused"))
    assert result.exit_code == 1 and "--random-teacher" in result.output and not (tmp_path / "refused").exists()
    one = tmp_path / "one"
    assert runner.invoke(main, _random_teacher_args(train_urls, one, "--random-teacher", "--workers", "1",
                                                    "--seed", "3")).exit_code == 0
    two = tmp_path / "two"
    first = f"{digits}/train-{{000000..000002}}.tar"
    assert runner.invoke(main, _random_teacher_args(first, two, "--random-teacher", "--workers", "2",
                                                    "--seed", "3")).exit_code == 0
    resumed = runner.invoke(main, _random_teacher_args(train_urls, two, "--random-teacher", "--workers", "2",
                                                       "--seed", "3"))  # a new driver: same teacher, extends
    assert resumed.exit_code == 0, resumed.output
    assert shard_checksums(one) == shard_checksums(two)
    teacher = open_store(str(one)).manifest.teacher
    assert teacher["random_init_seed"] == 3 and len(teacher["checkpoint_sha256"]) == 64
    other_seed = runner.invoke(main, _random_teacher_args(train_urls, two, "--random-teacher", "--seed", "4"))
    assert other_seed.exit_code == 1 and "teacher" in other_seed.output
    fault_log.record("clear error")
    fault_log.record("fault survived", lost=len(open_store(str(one))) - len(open_store(str(two))))


def test_labels_out_of_range_are_kept_unlabelled_or_skipped_and_reported(tmp_path: Path, teacher_ckpt: Path,
                                                                         fault_log) -> None:
    samples = [(f"s{i:03d}", str(i % 10)) for i in range(20)]
    samples[3] = ("s003", "99999999999")  # outside int32: the sample is skipped and recorded
    samples[4] = ("s004", "99")  # ≥ num_classes: cached as unlabelled, recorded
    samples[5] = ("s005", "-5")  # < -1: cached as unlabelled, recorded
    data = _shard(tmp_path / "labels.tar", samples)
    store = tmp_path / "store"
    summary = run_cache_teacher(cache_options(data, store, teacher_ckpt, workers=1))
    assert summary["num_samples"] == 19 and summary["skipped"] == 1
    opened = open_store(str(store))
    reasons = {e["key"]: e["reason"] for e in opened.errors()}
    assert "out of range" in reasons["s003"] and "cached as unlabelled" in reasons["s004"]
    assert opened.read("s004")["label"] == -1 and opened.read("s005")["label"] == -1
    assert opened.read("s006")["label"] == 6
    result = CliRunner().invoke(main, ["inspect", str(store)])
    assert "skipped 1" in result.output and "bad labels 2" in result.output
    plan = plan_join(list_shards(data), opened)
    assert plan.num_samples == 19 and plan.cache_bad == 1
    assert {"s004", "s005"}.isdisjoint(select_shots(plan.keys, 5, 0))
    run = CliRunner().invoke(main, ["train-student", "--data", data, "--cache", str(store), "--student", "resnet18",
                                    "--student-kwargs", json.dumps(TEACHER_KWARGS), "--out", str(tmp_path / "run"),
                                    "--batch-size", "8", "--epochs", "1", "--ce-weight", "1", "--quiet"])
    assert run.exit_code == 0, run.output
    fault_log.record("skipped+recorded", lost=19 - len(opened))


def test_a_key_in_two_input_shards_is_refused_when_the_manifest_is_updated(tmp_path: Path, teacher_ckpt: Path,
                                                                          fault_log) -> None:
    a = _shard(tmp_path / "a.tar", [(f"k{i}", "1") for i in range(6)])
    b = _shard(tmp_path / "b.tar", [("k9", "1"), ("k3", "2"), ("k10", "3")], seed=1)
    store = tmp_path / "store"
    run_cache_teacher(cache_options(a, store, teacher_ckpt, workers=1))
    with pytest.raises(RuntimeError, match=r"b \(ValueError: key 'k3' is also in input shard a"):
        run_cache_teacher(cache_options(f"{a},{b}", store, teacher_ckpt, workers=1))
    opened = open_store(str(store))
    assert opened.shard_names == ["a"] and len(opened) == 6 and opened.verify() == []
    fault_log.record("clear error")


def test_16_bit_pngs_are_scaled_not_clipped(fault_log) -> None:
    from PIL import Image

    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    image = decode_image(buf.getvalue()).float()
    expected = np.rint(grey / 257.0)
    assert abs(float(image.mean()) - float(expected.mean())) < 1.0 and float(image.min()) == 0.0
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1)
    fault_log.record("fault survived")


def test_brace_lists_with_commas_expand(digits: Path, fault_log) -> None:
    shards = list_shards(f"{digits}/train-{{000000,000002}}.tar,{digits}/val-000000.tar")
    assert [s.name for s in shards] == ["train-000000", "train-000002", "val-000000"]
    with pytest.raises(ValueError, match="Unbalanced"):
        list_shards(f"{digits}/train-{{000000,000002.tar")
    fault_log.record("fault survived")
