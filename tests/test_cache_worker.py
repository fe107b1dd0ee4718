"""The teacher worker without Ray: B-cos maps, quantisation, pooling, top-k, image folders, object storage reads."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS

from e2kd._config import build_options
from e2kd.cli import main
from e2kd.explain import build_explainer
from e2kd.models import create_model, input_transform
from e2kd.pipeline._sources import iter_shard, list_shards
from e2kd.pipeline._views import ViewPolicy, render_view
from e2kd.stages._cache_teacher import CacheTeacherOptions
from e2kd.stages._cache_teacher.worker import TeacherWorker, WorkerSpec
from e2kd.storage import Encoding, ShardWriter, open_store

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, teacher: dict, explainer: str, encoding: Encoding, views: int = 2) -> WorkerSpec:
    return WorkerSpec(teacher=teacher, explainer={"name": explainer},
                      views=ViewPolicy(k=views, scale=(0.5, 1.0), flip_p=0.5, seed=1).to_dict(),
                      input_size=(32, 32), encoding=encoding, writer=ShardWriter(str(tmp_path), "zarr", encoding))


def test_bcos_maps_pooled_and_quantised_match_a_direct_computation(digits: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = {"name": "bcos:resnet18", "num_classes": 10, "kwargs": {"inplanes": 8}}
    enc = Encoding(num_classes=10, map_dtype="uint8", map_size=(8, 8), topk=3)
    worker = TeacherWorker(_spec(tmp_path, teacher, "bcos", enc))
    shard = list_shards(f"{digits}/val-000000.tar")[0]
    cols, keys, errors = worker.compute(shard)
    assert not errors and cols["maps"].dtype == np.uint8 and cols["maps"].shape[1:] == (2, 6, 8, 8)
    model = worker.model
    samples = {s.key: s for s in iter_shard(shard)}
    for row in (0, 17):
        sample = samples[keys[row]]
        x = torch.stack([render_view(sample.image, v, (32, 32)) for v in cols["views"][row]])
        maps, _ = build_explainer("bcos", model)(input_transform(model)(x))
        pooled = torch.nn.functional.adaptive_avg_pool2d(maps, (8, 8))
        decoded = enc.decode_maps({k: v[row] for k, v in cols.items()})
        step = (pooled.flatten(1).amax(1) - pooled.flatten(1).amin(1)) / 255
        assert ((decoded - pooled).abs().flatten(1).amax(1) <= step * 0.5 + 1e-3 * step + 1e-7).all()
        assert decoded.min() < 0  # signed B-cos weights survive quantisation
        top3 = model(input_transform(model)(x)).topk(3, dim=1).indices
        assert np.array_equal(cols["topk_indices"][row], top3.numpy())


def test_image_folder_source_keys_and_labels(tmp_path: Path) -> None:
    from PIL import Image

    for cls, names in {"cat": ["a", "b"], "dog": ["c"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / cls / f"{n}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    shards = list_shards(str(tmp_path))
    assert [s.name for s in shards] == ["class-cat", "class-dog"]
    items = [item for s in shards for item in iter_shard(s)]
    good = {i.key: i.label for i in items if hasattr(i, "image")}
    assert good == {"cat/a": 0, "cat/b": 0, "dog/c": 1}
    assert [i.key for i in items if not hasattr(i, "image")] == ["dog/broken"]
    from e2kd.pipeline._sources import class_names
    from e2kd.stages._cache_teacher.stage import _class_names

    assert class_names(shards) == ["cat", "dog"]
    opts = CacheTeacherOptions(data=str(tmp_path), out="o", teacher="resnet18", num_classes=2, random_teacher=True)
    assert _class_names(opts, shards) == ("cat", "dog")
    (tmp_path / "names.txt").write_text("# index = line\nfelis\ncanis\nbos\n")
    opts.class_names, opts.num_classes = str(tmp_path / "names.txt"), 2
    with pytest.raises(ValueError, match="gives 3 names for 2 classes"):
        _class_names(opts, shards)


def test_stores_are_readable_through_fsspec_urls(cache: Path) -> None:
    fs = fsspec.filesystem("memory")
    for root, _, files in os.walk(cache):
        for f in files:
            path = Path(root) / f
            fs.pipe_file(f"/remote-cache/{path.relative_to(cache)}", path.read_bytes())
    local, remote = open_store(str(cache)), open_store("memory://remote-cache")
    assert remote.verify() == [] and len(remote) == len(local)
    key = sorted(local.keys())[5]
    for field in ("logits", "maps", "views", "target"):
        assert torch.equal(local.read(key)[field], remote.read(key)[field])


def test_yaml_config_and_flag_overrides(tmp_path: Path) -> None:
    opts = build_options(CacheTeacherOptions, ROOT / "configs" / "demo-digits.yaml",
                         {"data": "x.tar", "out": "o", "views": "4", "workers": None})
    assert opts.views == "4" and opts.teacher == "resnet18" and opts.input_size == 64 and opts.flip_p == 0.0
    build_options(CacheTeacherOptions, ROOT / "configs" / "imagenet-resnet50-gradcam.yaml",
                  {"data": "x.tar", "out": "o"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: resnet18\nnum_clases: 3\n")
    result = CliRunner().invoke(main, ["cache-teacher", "--config", str(bad), "--data", "x", "--out", "o"])
    assert result.exit_code == 1 and "num_clases" in result.output


def test_cli_errors_are_one_line(tmp_path: Path, digits: Path, teacher_ckpt: Path) -> None:
    result = CliRunner().invoke(main, ["cache-teacher", "--data", str(tmp_path / "none.tar"), "--out",
                                       str(tmp_path / "o"), "--teacher", "resnet18", "--num-classes", "3",
                                       "--random-teacher"])
    assert result.exit_code == 1 and "input shard not found" in result.output
    result = CliRunner().invoke(main, ["cache-teacher", "--data", "x", "--out", "o", "--teacher", "bcos:resnet18",
                                       "--num-classes", "3", "--random-teacher"])
    assert result.exit_code == 1 and "does not fit teacher" in result.output
    result = CliRunner().invoke(main, ["cache-teacher", "--data", f"{digits}/val-000000.tar", "--out",
                                       str(tmp_path / "o"), "--teacher", "resnet18", "--num-classes", "7",
                                       "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--checkpoint",
                                       str(teacher_ckpt)])
    assert result.exit_code == 1 and "class count: checkpoint 10, model 7" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("teacher_kwargs", [TEACHER_KWARGS])
def test_worker_matches_model_spec(teacher_kwargs: dict, tmp_path: Path) -> None:
    teacher = {"name": "resnet18", "num_classes": 10, "kwargs": teacher_kwargs}
    worker = TeacherWorker(_spec(tmp_path, teacher, "gradcam", Encoding(10)))
    assert sum(p.numel() for p in worker.model.parameters()) == sum(
        p.numel() for p in create_model("resnet18", 10, **teacher_kwargs).parameters())
    assert not any(p.requires_grad for p in worker.model.parameters())


def test_a_truncated_tar_yields_its_intact_samples_then_a_recorded_error(digits: Path, tmp_path: Path) -> None:
    from e2kd.pipeline._sources import iter_keys

    data = (digits / "train-000001.tar").read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(data[: len(data) // 3])
    shard = list_shards(str(tmp_path / "cut-000000.tar"))[0]
    items = list(iter_shard(shard))
    good = [i for i in items if hasattr(i, "image")]
    assert 0 < len(good) < 50 and items[-1].key == "*" and "unreadable shard" in items[-1].reason
    assert [k for k, _ in iter_keys(shard)] == [g.key for g in good]


def test_explainer_parameters_travel_from_the_options_through_the_manifest_to_the_worker(
        digits: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    from e2kd.explain._gradcam import GradCAM
    from e2kd.explain._registry import _REGISTRY, register_explainer
    from e2kd.stages._cache_teacher.stage import _build_teacher

    @register_explainer
    class ScaledGradCAM(GradCAM):
        name = "scaled_gradcam_test"

        def __init__(self, model: torch.nn.Module, scale: float = 1.0) -> None:
            super().__init__(model)
            self.scale = scale

        @property
        def params(self) -> dict:
            return {"scale": self.scale}

        def explain(self, inputs, targets, create_graph):
            logits, maps = super().explain(inputs, targets, create_graph)
            return logits, maps * self.scale

    try:
        opts = CacheTeacherOptions(data=f"{digits}/val-000000.tar", out=str(tmp_path / "o"), teacher="resnet18",
                                   num_classes=10, teacher_checkpoint=str(teacher_ckpt), teacher_kwargs=TEACHER_KWARGS,
                                   explainer="scaled_gradcam_test", explainer_kwargs={"scale": 3.0}, input_size=64)
        _, _, config = _build_teacher(opts)
        assert config == {"name": "scaled_gradcam_test", "family": "gradcam", "scale": 3.0}
        teacher = {"name": "resnet18", "num_classes": 10, "kwargs": TEACHER_KWARGS}
        spec = _spec(tmp_path, teacher, "gradcam", Encoding(10), views=1)
        spec.explainer = config
        worker = TeacherWorker(spec, (teacher_ckpt).read_bytes())
        assert isinstance(worker.explainer, ScaledGradCAM) and worker.explainer.scale == 3.0
        x = torch.rand(2, 3, 64, 64)
        plain, _ = build_explainer("gradcam", worker.model)(input_transform(worker.model)(x))
        scaled, _ = worker.explainer(input_transform(worker.model)(x))
        torch.testing.assert_close(scaled, 3.0 * plain)
    finally:
        _REGISTRY.pop("scaled_gradcam_test", None)


def test_maps_of_two_by_two_or_fewer_cells_warn_naming_size_and_stride(tmp_path: Path) -> None:
    from e2kd.stages._cache_teacher.stage import _build_teacher

    opts = CacheTeacherOptions(data="x.tar", out=str(tmp_path / "o"), teacher="resnet18", num_classes=10,
                               random_teacher=True, teacher_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8},
                               input_size=64)
    with pytest.warns(UserWarning, match=r"2×2 at --input-size 64 \(the model's stride is 32\)"):
        _build_teacher(opts)
    opts.teacher_kwargs = {**opts.teacher_kwargs, "output_stride": 16}  # 4×4: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build_teacher(opts)


def test_workers_report_progress_per_sample_and_the_bar_estimates_the_total(digits: Path, tmp_path: Path) -> None:
    from e2kd.stages._cache_teacher.stage import _SampleBar

    class Counter:  # stands in for the Ray actor handle: .add.remote(n)
        def __init__(self) -> None:
            self.calls: list[int] = []
            self.add = self

        def remote(self, n: int) -> None:
            self.calls.append(n)

    teacher = {"name": "resnet18", "num_classes": 10, "kwargs": TEACHER_KWARGS}
    spec = _spec(tmp_path, teacher, "gradcam", Encoding(10), views=2)
    spec.batch_size = 8
    counter = Counter()
    _, keys, _ = TeacherWorker(spec).compute(list_shards(f"{digits}/val-000000.tar")[0], counter)
    assert sum(counter.calls) == len(keys) == 50 and len(counter.calls) > 5 and min(counter.calls) >= 0
    shards = list_shards(f"{digits}/val-{{000000..000003}}.tar")
    bar = _SampleBar(shards, {s.name: 1000 for s in shards}, enabled=False)
    bar.samples(50)
    bar.shard_done(1000, 50)
    assert bar.bar.total == 200  # 50 samples per 1000 bytes, 4000 bytes to do
