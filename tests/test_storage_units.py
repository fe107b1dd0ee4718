"""Store building blocks without Ray: encodings, views, the WDS reader's refusals."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2kd.losses import kd_loss
from e2kd.pipeline.views import FULL_VIEW, ViewPolicy, draw_views, render_view
from e2kd.storage import Encoding, wds_store
from e2kd.storage.files import resolve


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


def test_render_view_full_equals_a_plain_antialiased_resize_and_flip_mirrors() -> None:
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = render_view(img, FULL_VIEW.as_list(), (32, 32))
    ref = F.interpolate(img[None].float() / 255, size=(32, 32), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(out, ref.clamp(0, 1))
    flipped = render_view(img, [0, 0, 1, 1, 1], (32, 32))
    torch.testing.assert_close(flipped, out.flip(-1))
    crop = render_view(img, [0.2, 0.1, 0.5, 0.5, 0], (25, 35))
    torch.testing.assert_close(crop, img[:, 10:35, 7:42].float() / 255)  # same size: no resampling


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
    from e2kd.pipeline.loader import select_shots

    keys = {f"k{i}": i % 3 for i in range(30)} | {"unlabelled": -1}
    a = select_shots(keys, 4, seed=1)
    assert len(a) == 12 and all(sum(v == c for v in a.values()) == 4 for c in range(3)) and "unlabelled" not in a
    assert select_shots(keys, 4, seed=1) == a and select_shots(keys, 4, seed=2) != a
    assert len(select_shots(keys, 50, seed=0)) == 30  # classes with fewer keep all
    with pytest.raises(ValueError, match="labelled"):
        select_shots({"x": -1}, 2, seed=0)
