"""train-student: no teacher built, joint crop, exact view replay, online = cached, compatibility, resume, DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, cache_options

import e2kd.models
from e2kd.cli import main
from e2kd.explain import build_explainer
from e2kd.pipeline._loader import StreamSpec, StudentStream, plan_join
from e2kd.pipeline._sources import iter_shard, list_shards
from e2kd.pipeline._views import View, ViewPolicy, crop_map, render_view, to_unit_float
from e2kd.stages._cache_teacher import run_cache_teacher
from e2kd.stages._train_student import TrainOptions, train_student
from e2kd.storage import CompatibilityError, open_store

STUDENT_KWARGS = {"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16}
E2KD = [sys.executable, "-m", "e2kd.cli"]


def _train_args(data: str, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--data", data, "--cache", str(cache), "--student", "resnet18", "--student-kwargs",
            json.dumps(STUDENT_KWARGS), "--out", str(out), "--batch-size", "16", "--lr", "3e-3",
            "--temperature", "2", "--quiet", *extra]


def test_training_from_a_cache_never_builds_the_teacher_and_its_loss_falls(cache: Path, train_urls: str,
                                                                          tmp_path: Path, monkeypatch) -> None:
    built: list[str] = []
    real = e2kd.models.create_model

    def recording(name, *args, **kwargs):
        built.append(name)
        return real(name, *args, **kwargs)

    import timm

    real_timm = timm.create_model
    timm_built: list[dict] = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: timm_built.append(k) or real_timm(*a, **k))
    monkeypatch.setattr("e2kd.stages._train_student.create_model", recording)
    monkeypatch.setattr("e2kd.models.create_model", recording)
    opts = TrainOptions(data=train_urls, cache=str(cache), student="resnet18", student_kwargs=STUDENT_KWARGS,
                        out=str(tmp_path / "run"), epochs=4, batch_size=32, lr=3e-3, temperature=2.0, lam=1.0,
                        progress=False)
    summary = train_student(opts)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["expl_resolution"] == written["expl_resolution"] == "input"
    assert built == ["resnet18"] and all(k.get("channels") == STUDENT_KWARGS["channels"] for k in timm_built)
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3, 4]
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"] and lines[-1]["expl"] < lines[0]["expl"]
    assert summary["steps"] == 4 * (300 // 32)
    state = __import__("safetensors.torch").torch.load_file(str(tmp_path / "run" / "student.safetensors"))
    real_timm("resnet18", num_classes=10, **STUDENT_KWARGS).load_state_dict(state, strict=True)


class _PixelwiseNet(torch.nn.Module):
    """A model whose input×gradient map at a pixel depends only on that pixel: it commutes with cropping."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).sum(dim=(2, 3))


@pytest.mark.parametrize("flip", [False, True])
def test_joint_crop_of_a_full_map_equals_the_map_of_the_cropped_image(flip: bool) -> None:
    model = _PixelwiseNet()
    explainer = build_explainer("input_x_gradient", model)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    full = render_view(image, View(0, 0, 1, 1, False).as_list(), (64, 64))
    full_map = explainer(full[None], torch.tensor([2]))[0][0]
    view = View(10 / 64, 21 / 64, 32 / 64, 32 / 64, flip).as_list()  # a 32×32 px crop: no resampling
    cropped = render_view(image, view, (32, 32))
    direct = explainer(cropped[None], torch.tensor([2]))[0][0]
    torch.testing.assert_close(crop_map(full_map, view, (64, 64), (32, 32)), direct, rtol=1e-5, atol=1e-6)
    if flip:
        unflipped = crop_map(full_map, View(10 / 64, 21 / 64, 0.5, 0.5, False).as_list(), (64, 64))
        torch.testing.assert_close(crop_map(full_map, view, (64, 64)), unflipped.flip(-1))
        assert not torch.allclose(unflipped, unflipped.flip(-1))


def test_k_view_replay_is_bit_identical_to_the_teachers_input(cache: Path, train_urls: str) -> None:
    store = open_store(str(cache))
    policy = ViewPolicy.from_dict(store.manifest.views)
    shards = list_shards(train_urls)[:2]
    plan = plan_join(shards, store, allow_missing=True)
    images = {s.key: s.image for shard in shards for s in iter_shard(shard)}
    stream = StudentStream(StreamSpec(shards=shards, keys=set(plan.keys), input_size=(64, 64), cache_uri=str(cache),
                                      shuffle_buffer=8, seed=3))
    used_views = set()
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        for item, _ in zip(stream, range(40), strict=False):
            v = int(item["view_index"])
            used_views.add(v)
            teacher_view = policy.views_for(item["key"], *images[item["key"]].shape[1:])[v]
            teacher_input = render_view(images[item["key"]], teacher_view.as_list(), (64, 64))
            assert item["image"].dtype == torch.uint8 and torch.equal(to_unit_float(item["image"]), teacher_input)
            record = store.read(item["key"])
            assert torch.equal(item["t_map"], record["maps"][v]) and torch.equal(item["t_logits"], record["logits"][v])
    assert used_views == {0, 1}


def _with_render(cache: Path, out: Path, render: dict | None) -> Path:
    """A copy of ``cache`` whose manifest records ``render`` (None: no entry, as caches before 0.2)."""
    import shutil

    shutil.copytree(cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["preprocessing"].pop("render", None)
    if render is not None:
        manifest["preprocessing"]["render"] = render
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_cache_rendered_in_float32_is_replayed_in_float32_and_an_unknown_render_is_refused(
        cache: Path, train_urls: str, tmp_path: Path) -> None:
    """Caches from before 0.2 resampled views in float32 (no ``resample_dtype`` recorded): the stream renders them
    that way (float images), bit-identical to the float path — not with today's uint8 resampling."""
    from e2kd.pipeline._views import RENDER_SPEC

    legacy = {k: v for k, v in RENDER_SPEC.items() if k != "resample_dtype"}
    old = _with_render(cache, tmp_path / "old", legacy)
    store = open_store(str(old))
    policy = ViewPolicy.from_dict(store.manifest.views)
    shards = list_shards(train_urls)[:1]
    images = {s.key: s.image for shard in shards for s in iter_shard(shard)}
    stream = StudentStream(StreamSpec(shards=shards, keys=set(plan_join(shards, store, allow_missing=True).keys),
                                      input_size=(64, 64), cache_uri=str(old), shuffle_buffer=1))
    for item, _ in zip(stream, range(6), strict=False):
        view = policy.views_for(item["key"], *images[item["key"]].shape[1:])[int(item["view_index"])].as_list()
        assert item["image"].dtype == torch.float32
        assert torch.equal(item["image"], render_view(images[item["key"]], view, (64, 64), dtype="float32"))
        assert not torch.equal(item["image"], render_view(images[item["key"]], view, (64, 64)))
    odd = _with_render(cache, tmp_path / "odd", {**RENDER_SPEC, "interpolation": "bicubic"})
    opts = TrainOptions(data=train_urls, cache=str(odd), student="resnet18", student_kwargs=STUDENT_KWARGS,
                        out=str(tmp_path / "run"), epochs=1, steps_per_epoch=1, progress=False)
    with pytest.raises(CompatibilityError, match="bicubic.*cannot be replayed exactly"):
        train_student(opts)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_online_and_cached_training_give_the_same_first_step_loss(digits: Path, teacher_ckpt: Path,
                                                                  tmp_path: Path) -> None:
    data = f"{digits}/train-{{000000..000001}}.tar"
    full_cache = tmp_path / "full"
    run_cache_teacher(cache_options(data, full_cache, teacher_ckpt, views="full"))
    common = dict(data=data, student="resnet18", student_kwargs=STUDENT_KWARGS, epochs=1, steps_per_epoch=1,
                  batch_size=16, temperature=2.0, lam=1.0, crop_scale=(1.0, 1.0), seed=5, progress=False)
    cached = train_student(TrainOptions(cache=str(full_cache), out=str(tmp_path / "c"), **common))
    online = train_student(TrainOptions(online_teacher="resnet18", teacher_checkpoint=str(teacher_ckpt),
                                        teacher_kwargs=TEACHER_KWARGS, num_classes=10, explainer="gradcam",
                                        input_size=64, out=str(tmp_path / "o"), **common))
    assert cached["final"]["loss"] == pytest.approx(online["final"]["loss"], rel=5e-3)
    assert cached["final"]["kd"] == pytest.approx(online["final"]["kd"], rel=2e-2, abs=1e-4)
    assert cached["final"]["expl"] == pytest.approx(online["final"]["expl"], rel=5e-3)


@pytest.mark.parametrize(("extra", "field"), [
    (["--num-classes", "7"], "num_classes"),
    (["--explainer", "bcos"], "explainer"),
    (["--input-size", "32"], "input_size"),
])
def test_compatibility_errors_name_the_field_and_write_nothing(cache: Path, train_urls: str, tmp_path: Path,
                                                               extra: list[str], field: str) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, _train_args(train_urls, cache, out, *extra))
    assert result.exit_code == 1 and result.output.startswith(f"Error: {field}:")
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_missing_keys_are_an_error_unless_allowed(cache: Path, digits: Path, tmp_path: Path) -> None:
    data = f"{digits}/train-{{000000..000001}}.tar,{digits}/val-000000.tar"  # val keys were never cached
    out = tmp_path / "run"
    result = CliRunner().invoke(main, _train_args(data, cache, out, "--epochs", "1"))
    assert result.exit_code == 1 and result.output.startswith("Error: keys:") and not out.exists()
    result = CliRunner().invoke(main, _train_args(data, cache, out, "--epochs", "1", "--allow-missing"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 100 and summary["skipped_missing"] == 50


def test_kill_and_resume_finishes_with_the_same_steps(cache: Path, train_urls: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _train_args(train_urls, cache, out, "--epochs", "5", "--steps-per-epoch", "6")
    proc = subprocess.Popen([*E2KD, *args], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            metrics = out / "metrics.jsonl"
            if (out / "checkpoint.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 2 <= done < 5
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3, 4, 5] and lines[-1]["steps"] == 30


def test_torchrun_two_cpu_ranks_with_uneven_shards_finishes(cache: Path, digits: Path, tmp_path: Path) -> None:
    data = f"{digits}/train-{{000000..000002}}.tar"  # 3 shards over 2 ranks: 100 vs 50 samples
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "e2kd.cli", *_train_args(data, cache, out, "--epochs", "2", "--allow-missing")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 * (150 // 32)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_an_existing_run_is_neither_overwritten_nor_mixed_and_each_epoch_prints_one_line(
        cache: Path, train_urls: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    opts = dict(data=train_urls, cache=str(cache), student="resnet18", student_kwargs=STUDENT_KWARGS, out=str(out),
                epochs=2, steps_per_epoch=1, batch_size=8)
    train_student(TrainOptions(**opts))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if re.match(r"epoch \d+/\d+  loss=", ln)]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"] and all("kd=" in ln and "expl=" in ln for ln in lines)
    assert re.search(r"run ETA \d+ s\)$", lines[0]) and "ETA" not in lines[1]  # the whole run's, until its end
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already holds a run .*--resume continues it, --overwrite replaces it"):
        train_student(TrainOptions(**opts, progress=False))
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost
    train_student(TrainOptions(**opts, progress=False, overwrite=True))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    from e2kd.stages._train_teacher import TeacherOptions, train_teacher

    with pytest.raises(FileExistsError, match="already holds a run"):  # checked before any work
        train_teacher(TeacherOptions(data=train_urls, teacher="resnet18", num_classes=10, out=str(out)))


def test_augmentation_flags_ignored_by_a_k_view_cache_warn(cache: Path, train_urls: str, tmp_path: Path) -> None:
    from e2kd.stages._train_student import prepare_student

    opts = dict(data=train_urls, cache=str(cache), student="resnet18", student_kwargs=STUDENT_KWARGS,
                out=str(tmp_path / "r"), batch_size=8, progress=False)
    with pytest.warns(UserWarning, match=r"--flip-p ignored: the cache holds 2 views per sample"):
        prepare_student(TrainOptions(**opts, flip_p=0.5))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_student(TrainOptions(**opts))  # defaults: no warning


def test_cached_shards_missing_from_data_warn(cache: Path, digits: Path, tmp_path: Path) -> None:
    from e2kd.stages._train_student import prepare_student

    opts = TrainOptions(data=f"{digits}/train-000000.tar", cache=str(cache), student="resnet18",
                        student_kwargs=STUDENT_KWARGS, out=str(tmp_path / "r"), batch_size=8, progress=False)
    with pytest.warns(UserWarning, match=r"5 cached shard\(s\) are not in --data and go unused"):
        prepare_student(opts)


# ---- the first step in O(number of shards): the cache's key index, trusted where the input's size matches --------
def _rename_first_key_in_place(path: Path) -> str:
    """Change the last character of the first sample's key, keeping the tar's size (header checksums redone)."""
    import tarfile

    with tarfile.open(path) as tar:
        key = tar.getmembers()[0].name.split(".", 1)[0]
    new_key = key[:-1] + ("x" if key[-1] != "x" else "y")
    data = bytearray(path.read_bytes().replace(key.encode() + b".", new_key.encode() + b"."))
    for offset in range(0, len(data), 512):  # header blocks (incl. PAX headers): checksum over the new name
        header = data[offset:offset + 512]
        if header[257:262] == b"ustar":
            header[148:156] = b" " * 8
            header[148:156] = f"{sum(header):06o}\0 ".encode()
            data[offset:offset + 512] = header
    path.write_bytes(bytes(data))
    return new_key


def test_the_plan_trusts_the_key_index_of_unchanged_shards_and_the_stream_checks_them(
        cache: Path, digits: Path, train_urls: str, tmp_path: Path, monkeypatch) -> None:
    import shutil

    import e2kd.pipeline._loader as loader

    store, shards = open_store(str(cache)), list_shards(train_urls)
    listed = {k: v for s in shards for k, v in s.keys()}
    monkeypatch.setattr(loader, "iter_keys", lambda shard: pytest.fail(f"{shard.name} was read to plan"))
    plan = plan_join(shards, store, labels=True)
    assert sorted(plan.trusted) == sorted(s.name for s in shards)
    assert plan.keys == listed and sum(plan.shard_counts.values()) == 300  # the same plan as listing every tar
    assert set(plan_join(shards, store, labels=False).keys) == set(listed)
    monkeypatch.undo()

    data = tmp_path / "data"
    shutil.copytree(digits, data, ignore=shutil.ignore_patterns("teacher-*", "val-*", "test-*"))
    size = (data / "train-000002.tar").stat().st_size
    renamed = _rename_first_key_in_place(data / "train-000002.tar")
    assert (data / "train-000002.tar").stat().st_size == size  # same size: the plan trusts it, the stream finds it
    urls = f"{data}/train-{{000000..000005}}.tar"
    assert "train-000002" in plan_join(list_shards(urls), store).trusted
    result = CliRunner().invoke(main, _train_args(urls, cache, tmp_path / "run", "--epochs", "1"))
    assert result.exit_code == 1 and "1 input key(s) have no cached output" in result.output, result.output
    assert renamed in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, _train_args(urls, cache, tmp_path / "run", "--epochs", "1", "--allow-missing",
                                                  "--overwrite"))
    assert result.exit_code == 0 and "skipped (--allow-missing)" in result.output, result.output
