"""Store building blocks without Ray: encodings, views, the WDS reader's refusals."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvF

from e2kd.losses import kd_loss
from e2kd.pipeline._views import (
    FULL_VIEW,
    RENDER_SPEC,
    ViewPolicy,
    crop_map,
    draw_views,
    pixel_view,
    render_view,
    render_view_uint8,
    resample_dtype,
    to_unit_float,
)
from e2kd.storage import Encoding
from e2kd.storage import _wds_store as wds_store
from e2kd.storage._files import resolve


def test_topk_encoding_with_k_equal_c_reproduces_the_full_kd_loss() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 2, 10)).astype(np.float32) * 3
    full = Encoding(num_classes=10).decode_logits(Encoding(num_classes=10).encode(logits, np.zeros((5, 2, 1, 2, 2))))
    enc = Encoding(num_classes=10, topk=10)
    topk = enc.decode_logits(enc.encode(logits, np.zeros((5, 2, 1, 2, 2), np.float32)))
    student = torch.randn(10, 10)
    assert float(kd_loss(student, topk.reshape(10, 10), 2.0)) == pytest.approx(
        float(kd_loss(student, full.reshape(10, 10), 2.0)), rel=1e-3)


def test_uint8_maps_keep_signed_values_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(4, 3, 6, 8, 8)).astype(np.float32) - 0.5  # signed, like B-cos maps
    enc = Encoding(num_classes=3, map_dtype="uint8")
    cols = enc.encode(np.zeros((4, 3, 3), np.float32), maps)
    decoded = enc.decode_maps(cols).numpy()
    step = (maps.reshape(4, 3, -1).max(-1) - maps.reshape(4, 3, -1).min(-1)) / 255
    assert (np.abs(decoded - maps).reshape(4, 3, -1).max(-1) <= step / 2 + 1e-6).all()
    assert decoded.min() < 0


def test_encoding_validates_its_values() -> None:
    with pytest.raises(ValueError, match="topk"):
        Encoding(num_classes=5, topk=6)
    with pytest.raises(ValueError, match="Got 12 instead"):
        Encoding(num_classes=5, clevel=12)
    assert Encoding.from_dict(Encoding(num_classes=5, map_size=(3, 4)).to_dict()) == Encoding(5, map_size=(3, 4))


def test_pooling_is_area_averaging() -> None:
    maps = torch.rand(2, 6, 8, 8)
    torch.testing.assert_close(Encoding(3, map_size=(4, 4)).pool_maps(maps), F.avg_pool2d(maps, 2))


def test_views_depend_only_on_seed_key_and_index() -> None:
    a = draw_views(3, "img-7", 4, 100, 80)
    assert draw_views(3, "img-7", 6, 100, 80)[:4] == a  # more views do not change earlier ones
    assert draw_views(3, "img-8", 4, 100, 80) != a and draw_views(4, "img-7", 4, 100, 80) != a
    assert ViewPolicy(k=0).views_for("x", 10, 10) == [FULL_VIEW]
    assert not any(v.flip for v in draw_views(0, "k", 20, 64, 64, flip_p=0.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_render_view_full_equals_a_plain_antialiased_resize_and_flip_mirrors(layout: str) -> None:
    hwc = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8)
    img = hwc.permute(2, 0, 1) if layout == "channels-last" else hwc.permute(2, 0, 1).contiguous()  # decode's layout
    ref = F.interpolate(img[None].float() / 255, size=(32, 32), mode="bilinear", antialias=True)[0]
    legacy = render_view(img, FULL_VIEW.as_list(), (32, 32), dtype="float32")  # caches from before 0.2
    torch.testing.assert_close(legacy, ref.clamp(0, 1))
    out = render_view(img, FULL_VIEW.as_list(), (32, 32))  # resampled in uint8: within one grey level of float
    assert (out - ref).abs().max() <= 1 / 255 + 1e-6 and (out * 255).eq((out * 255).round()).all()
    tv = tvF.resize(img.contiguous(), [32, 32], antialias=True)  # torchvision's uint8 resize, an independent caller
    assert torch.equal(render_view_uint8(img, FULL_VIEW.as_list(), (32, 32)), tv)
    assert torch.equal(out, to_unit_float(tv))
    for dtype in ("uint8", "float32"):
        flipped = render_view(img, [0, 0, 1, 1, 1], (32, 32), dtype=dtype)
        torch.testing.assert_close(flipped, render_view(img, FULL_VIEW.as_list(), (32, 32), dtype=dtype).flip(-1))
        crop = render_view(img, [0.2, 0.1, 0.5, 0.5, 0], (25, 35), dtype=dtype)
        torch.testing.assert_close(crop, img[:, 10:35, 7:42].float() / 255)  # same size: no resampling


def test_resample_dtype_of_a_manifest_render_entry() -> None:
    assert resample_dtype(RENDER_SPEC) == "uint8"
    legacy = {k: v for k, v in RENDER_SPEC.items() if k != "resample_dtype"}
    assert resample_dtype(legacy) == "float32" and resample_dtype(None) == "float32"
    with pytest.raises(ValueError, match="cannot be replayed exactly"):
        resample_dtype({**RENDER_SPEC, "interpolation": "bicubic"})
    with pytest.raises(ValueError, match="cannot be replayed exactly"):
        resample_dtype({**RENDER_SPEC, "resample_dtype": "float16"})


def test_crop_map_equals_torchvisions_roi_align_in_float64() -> None:
    """The separable joint crop is RoIAlign (aligned, adaptive sampling): same values as torchvision's kernel, in
    float64, for random boxes (small to whole-image), any output size, with and without a flip."""
    from torchvision.ops import roi_align

    gen = torch.Generator().manual_seed(0)
    for i in range(200):
        h, w = [(7, 7), (4, 6), (1, 1), (56, 56)][i % 4]
        image_hw = [(375, 500), (64, 64), (500, 375)][i % 3]
        maps = torch.randn(1 + 5 * (i % 2), h, w, generator=gen, dtype=torch.float64)
        view = draw_views(i, "k", 1, *image_hw, scale=(0.01, 1.0))[0].as_list()
        size = [None, (224, 224), (7, 7), (3, 5)][i % 4]
        s = pixel_view(view, *image_hw)
        box = torch.tensor([[0.0, s.left * w, s.top * h, (s.left + s.width) * w, (s.top + s.height) * h]],
                           dtype=torch.float64)
        ref = roi_align(maps[None], box, output_size=size or (h, w), sampling_ratio=-1, aligned=True)[0]
        torch.testing.assert_close(crop_map(maps, view, image_hw, size), ref.flip(-1) if s.flip else ref,
                                   rtol=1e-12, atol=1e-12)


def test_a_batch_of_crop_weights_equals_each_samples_and_roi_align() -> None:
    """The batched weights (the loader hands over views, the weights are made per batch) are the per-sample ones
    exactly, and applied they equal torchvision's roi_align in float64: mixed box sizes (so bins hold different
    sample counts), flips, up- and downsampling."""
    from torchvision.ops import roi_align

    from e2kd.pipeline._views import apply_crop, crop_weights, crop_weights_batch

    gen = torch.Generator().manual_seed(1)
    for h, w, size, image_hw in [(7, 7, (224, 224), (375, 500)), (56, 56, (7, 7), (64, 64)), (4, 6, None, (500, 375))]:
        views = [draw_views(i, "k", 1, *image_hw, scale=(0.01, 1.0))[0].as_list() for i in range(12)]
        views = [v[:4] + [float(i % 2)] for i, v in enumerate(views)]
        snapped = [pixel_view(v, *image_hw) for v in views]
        batch = torch.tensor([[s.top, s.left, s.height, s.width, float(s.flip)] for s in snapped], dtype=torch.float64)
        rows, cols = crop_weights_batch(batch, (h, w), size)
        maps = torch.randn(len(views), 2, h, w, generator=gen, dtype=torch.float64)
        cropped = apply_crop(maps, rows, cols)
        for b, (v, s) in enumerate(zip(views, snapped, strict=True)):
            r, c = crop_weights(v, image_hw, (h, w), size)
            assert torch.equal(rows[b], r) and torch.equal(cols[b], c)
            box = torch.tensor([[0.0, s.left * w, s.top * h, (s.left + s.width) * w, (s.top + s.height) * h]],
                               dtype=torch.float64)
            ref = roi_align(maps[b:b + 1], box, output_size=size or (h, w), sampling_ratio=-1, aligned=True)[0]
            torch.testing.assert_close(cropped[b], ref.flip(-1) if s.flip else ref, rtol=1e-12, atol=1e-12)


def test_wds_reader_refuses_path_traversal_and_foreign_members(tmp_path: Path) -> None:
    for bad in ("../evil.npy", "00000000.maps.pkl", "/etc/passwd"):
        shard = tmp_path / bad.replace("/", "_")
        shard.mkdir()
        with tarfile.open(shard / wds_store.DATA_NAME, "w") as tar:
            info = tarfile.TarInfo(bad)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        fs, root = resolve(shard)
        with pytest.raises(ValueError, match="refused tar member"):
            wds_store.read_columns(fs, root, ["maps"])


def test_shots_draw_n_per_class_reproducibly() -> None:
    from e2kd.pipeline._loader import select_shots

    keys = {f"k{i}": i % 3 for i in range(30)} | {"unlabelled": -1}
    a = select_shots(keys, 4, seed=1)
    assert len(a) == 12 and all(sum(v == c for v in a.values()) == 4 for c in range(3)) and "unlabelled" not in a
    assert select_shots(keys, 4, seed=1) == a and select_shots(keys, 4, seed=2) != a
    assert len(select_shots(keys, 50, seed=0)) == 30  # classes with fewer keep all
    with pytest.raises(ValueError, match="labelled"):
        select_shots({"x": -1}, 2, seed=0)
