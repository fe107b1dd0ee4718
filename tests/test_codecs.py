"""Every registered codec, through every registered format (a conformance suite, as zarr's ``StoreTests``): recorded
parameters rebuild the codec, encoding yields exactly its declared columns, decoding gives the values back within the
codec's precision, its checks accept what it wrote and refuse a non-finite value, and a shard round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from e2kd.storage import Encoding, get_codec, get_format, list_codecs, list_formats, register_codec
from e2kd.storage._codecs import Float16Maps, codec_class

CLASSES, VIEWS, N = 7, 2, 5
#: codecs whose defaults do not fit the test's values
PARAMS = {"logits-topk": {"k": 3, "num_classes": CLASSES},
          "logits-sampled": {"samples": 12, "num_classes": CLASSES, "temperature": 2.0}}


def _values(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (N, VIEWS, CLASSES) if kind == "logits" else (N, VIEWS, 1, 3, 4)
    values = (rng.normal(size=shape) * 3).astype(np.float32)
    return values if kind == "logits" else values - values.min()  # maps: e.g. non-negative GradCAM …


def _codec(name: str):
    return get_codec({"name": name, **PARAMS.get(name, {})})


def _close(codec, values: np.ndarray, decoded: torch.Tensor) -> None:
    if codec.name == "logits-topk":  # the k known classes: exact log-probabilities (float16 logits)
        log_p = torch.log_softmax(torch.from_numpy(values), -1)
        idx = torch.from_numpy(np.argsort(-values, -1, kind="stable")[..., :codec.k])
        torch.testing.assert_close(decoded.gather(-1, idx), log_p.gather(-1, idx), atol=2e-2, rtol=0)
        assert torch.allclose(decoded.exp().sum(-1), torch.ones(()), atol=2e-2)  # a distribution
    elif codec.name == "logits-sampled":  # temperature · log of the draws' empirical distribution
        q = (decoded / codec.temperature).exp()
        torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[:-1]))
        torch.testing.assert_close(q * codec.samples, (q * codec.samples).round(), atol=1e-4, rtol=0)
        assert ((q > 0).sum(-1) <= codec.samples).all()
    elif codec.name == "map-uint8-affine":
        span = np.ptp(values.reshape(N, VIEWS, -1), -1)[..., None, None, None]
        assert (np.abs(decoded.numpy() - values) <= span / 255 / 2 + 1e-6).all()
    else:
        np.testing.assert_allclose(decoded.numpy(), values, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list_codecs())
def test_a_codec_round_trips_its_values_columns_and_parameters(name: str) -> None:
    codec = _codec(name)
    assert get_codec(codec.to_dict()) == codec and codec.to_dict()["name"] == name
    values = _values(codec.kind)
    cols = codec.encode(values)
    specs = codec.columns(VIEWS, values.shape[2:])
    assert set(cols) == set(specs)
    for column, (dtype, row) in specs.items():
        assert str(cols[column].dtype) == dtype and cols[column].shape == (N, *row), column
    _close(codec, values, codec.decode(cols))
    assert codec.check(cols, CLASSES) is None
    floats = [c for c, (dtype, _) in specs.items() if dtype.startswith("float")]
    bad = {**cols, floats[0]: cols[floats[0]].copy()}
    bad[floats[0]].flat[0] = np.nan
    assert "non-finite" in codec.check(bad, CLASSES)


@pytest.mark.parametrize("fmt", list_formats())
@pytest.mark.parametrize("name", list_codecs())
def test_every_codec_round_trips_through_every_format(name: str, fmt: str, tmp_path: Path) -> None:
    from e2kd.storage._files import read_blobs, resolve

    codec = _codec(name)
    values = _values(codec.kind, seed=1)
    cols = codec.encode(values)
    keys = [f"k/{i}" for i in range(N)]
    shard = tmp_path / "shard"
    shard.mkdir()
    get_format(fmt).write(shard, cols, keys, Encoding(num_classes=CLASSES, chunk_samples=2))
    fs, root = resolve(str(shard))
    specs = codec.columns(VIEWS, values.shape[2:])
    back = get_format(fmt).read(read_blobs(fs, root), list(specs), "shard", specs, keys)
    assert set(back) == set(cols)
    for column in cols:
        np.testing.assert_array_equal(back[column], cols[column])


def test_unknown_codecs_and_parameters_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown codec 'logits-zip'"):
        get_codec({"name": "logits-zip"})
    with pytest.raises(ValueError, match="codec 'logits-topk'.*unexpected keyword argument 'kk'"):
        get_codec({"name": "logits-topk", "kk": 3})
    with pytest.raises(ValueError, match="topk must be in"):
        get_codec({"name": "logits-topk", "k": 9, "num_classes": 3})
    with pytest.raises(ValueError, match="already registered"):
        @register_codec
        class Again(Float16Maps):  # noqa: D401 - a second class under a taken name
            pass
    assert codec_class("map-float16") is Float16Maps


def test_the_encoding_uses_the_codecs_its_fields_name() -> None:
    assert Encoding(num_classes=CLASSES).logits_codec.name == "logits-float16"
    assert Encoding(num_classes=CLASSES, topk=2).logits_codec == get_codec({"name": "logits-topk", "k": 2,
                                                                            "num_classes": CLASSES})
    assert Encoding(num_classes=CLASSES, map_dtype="uint8").map_codec.name == "map-uint8-affine"
    assert Encoding(num_classes=CLASSES, topk=2, map_dtype="uint8").column_names() == [
        "labels", "views", "target", "topk_values", "topk_indices", "logsumexp", "maps", "map_scale", "map_offset"]
