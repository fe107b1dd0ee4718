"""--decode-on-device: images leave the workers encoded and are decoded and rendered per batch on the training device
(here the CPU: torchvision's libjpeg path, the same code as nvjpeg on a GPU)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from e2kd.pipeline._device_images import DeviceImages, decode_batch_images
from e2kd.pipeline._sources import decode_image
from e2kd.pipeline._views import draw_view, render_view, render_view_uint8, render_views_batch


def _photo(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth colour image with edges (a photo-like test pattern), uint8 [3, h, w]."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (1, 3, 6, 8), dtype=np.uint8)).float()
    image = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0]
    image[:, h // 3:h // 2, :] = 255.0  # a hard edge
    return image.clamp(0, 255).round().to(torch.uint8)


def _jpeg(image: torch.Tensor, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format=fmt, quality=92)
    return buf.getvalue()


def test_a_batch_rendered_at_once_equals_each_view_rendered_alone() -> None:
    sizes = [(375, 500), (500, 375), (64, 64), (97, 203), (9, 7)]
    images = [_photo(h, w, i) for i, (h, w) in enumerate(sizes)]
    views = [draw_view(0, f"k{i}", 0, h, w, flip_p=0.5).as_list() for i, (h, w) in enumerate(sizes)]
    views[0] = [0.0, 0.0, 1.0, 1.0, 1.0]  # the whole image, flipped
    views[4] = [0.9, 0.9, 0.05, 0.05, 0.0]  # a one-pixel crop
    out = render_views_batch(images, torch.tensor(views, dtype=torch.float64), (56, 48))
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 56, 48)
    for image, view, got in zip(images, views, out, strict=True):
        floats = render_view(image, view, (56, 48), dtype="float32") * 255  # torch's float resampling
        assert (got.float() - floats).abs().max() <= 0.5 + 1e-3  # the same weights, rounded once
        fixed = render_view_uint8(image, view, (56, 48)).float()  # the workers' fixed-point kernel
        assert (got.float() - fixed).abs().max() <= 1.0
    assert not torch.equal(out[0], out[0].flip(-1))  # the flip is applied (the pattern is not symmetric)


def test_a_batch_of_encoded_images_decodes_as_the_workers_would_and_a_bad_one_is_named() -> None:
    images = [_photo(80, 120, 0), _photo(120, 80, 1), _photo(64, 64, 2)]
    encoded = [_jpeg(images[0]), _jpeg(images[1]), _jpeg(images[2], "PNG")]  # the PNG goes the CPU way
    views = torch.tensor([draw_view(1, f"k{i}", 0, *img.shape[1:], flip_p=0.5).as_list()
                          for i, img in enumerate(images)], dtype=torch.float64)
    batch = {"key": ["a", "b", "c"], "encoded": list(encoded), "view": views,
             "jpeg": torch.tensor([True, True, False]), "label": torch.tensor([1, 2, 3])}
    out = decode_batch_images(dict(batch), torch.device("cpu"), (48, 48))
    assert set(out) == {"key", "image", "label"} and out["image"].shape == (3, 3, 48, 48)
    for data, view, got in zip(encoded, views.tolist(), out["image"], strict=True):
        ref = render_view_uint8(decode_image(data), view, (48, 48)).float()
        assert (got.float() - ref).abs().max() <= 1.0  # same decoder family, float vs fixed-point resampling
    broken = dict(batch, encoded=[encoded[0], encoded[1][:200], encoded[2]])
    with pytest.raises(ValueError, match="sample 'b' cannot be decoded"):
        decode_batch_images(broken, torch.device("cpu"), (48, 48))


def _as_jpeg_shards(src: list[Path], out: Path) -> str:
    """The digits shards re-encoded as JPEG, same names and keys (the cache joins them by key)."""
    from PIL import Image

    out.mkdir()
    for path in src:
        with tarfile.open(path) as tin, tarfile.open(out / path.name, "w") as tout:
            for member in tin.getmembers():
                data = tin.extractfile(member).read()  # type: ignore[union-attr]
                name = member.name
                if name.endswith(".png"):
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
                    data, name = buf.getvalue(), name[:-4] + ".jpg"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return f"{out}/train-{{000000..000005}}.tar"


def test_the_training_stream_with_images_decoded_on_the_device_matches_the_workers(
        cache: Path, digits: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from e2kd.pipeline._loader import StreamSpec, plan_join
    from e2kd.pipeline._order import Order
    from e2kd.pipeline._sources import list_shards
    from e2kd.pipeline._train_stream import TrainStream
    from e2kd.storage import open_store

    urls = _as_jpeg_shards(sorted(digits.glob("train-*.tar")), tmp_path / "jpeg")
    store, shards = open_store(str(cache)), list_shards(urls)
    plan = plan_join(shards, store)
    spec = StreamSpec(shards=shards, keys=set(plan.keys), input_size=(64, 64), cache_uri=str(cache),
                      trusted=frozenset(plan.trusted), cache_shards=(tuple(store.shard_names),))
    order = Order(plan.keys_by_shard(), seed=0, global_batch=16, partitions=8)
    workers, device = TrainStream(spec, order, 4, 0), TrainStream(replace(spec, decode_on_device=True), order, 4, 0)
    sent = next(iter(device))
    assert "image" not in sent and len(sent["encoded"]) == 16 and sent["jpeg"].all()  # bytes, not pixels, travel
    device.set_epoch(0)
    compared = 0
    for a, b in zip(workers, DeviceImages(device, "cpu", (64, 64)), strict=True):
        assert a["key"] == b["key"] and torch.equal(a["t_logits"], b["t_logits"])
        assert torch.equal(a["view_index"], b["view_index"]) and torch.equal(a["label"], b["label"])
        diff = (a["image"].float() - b["image"].float()).abs()
        assert diff.max() <= 1.0 and diff.mean() < 0.2, (diff.max(), diff.mean())
        compared += 1
    assert compared == 4


def test_train_student_with_decode_on_device_feeds_the_trainer_what_the_workers_would(
        cache: Path, digits: Path, tmp_path: Path) -> None:
    """The stage's wiring (one DataLoader worker, batches collated across processes): every batch the trainer gets
    holds the same keys, targets, maps, labels and views as without ``--decode-on-device``, images within one grey
    level. (Trained weights are not compared: on these flat digit images a random-init student's gradient is that
    sensitive to its input — ±1 grey level of noise changes the first step's gradient by ~120% of its norm, the KD
    part's by ~40% in train mode and 2% in eval mode (batch norm of near-constant channels), the losses by 1e-3.)"""
    from dataclasses import replace

    from e2kd.stages import TrainOptions
    from e2kd.stages._train_student import prepare_student

    urls = _as_jpeg_shards(sorted(digits.glob("train-*.tar")), tmp_path / "jpeg")
    opts = TrainOptions(data=urls, cache=(str(cache),), student="resnet18", out=str(tmp_path / "run"),
                        student_kwargs={"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16},
                        batch_size=16, workers=1, epochs=1, progress=False)
    loaders = [prepare_student(replace(opts, decode_on_device=on)).trainer.loader for on in (False, True)]
    batches = 0
    for a, b in zip(*loaders, strict=True):
        assert set(a) == set(b) and a["key"] == b["key"]
        for name in set(a) - {"key", "image"}:
            same = torch.equal(a[name], b[name]) if isinstance(a[name], torch.Tensor) else a[name] == b[name]
            assert same, name
        assert a["image"].dtype == b["image"].dtype == torch.uint8 and a["image"].shape == b["image"].shape
        diff = (a["image"].float() - b["image"].float()).abs()
        assert diff.max() <= 1.0 and diff.mean() < 0.3, (diff.max(), diff.mean())
        batches += 1
    assert batches == 300 // 16
