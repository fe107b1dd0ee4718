"""Input sources: one class per kind (tar, image folder), key listing, pickling, URL expansion, decoding."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from e2kd.pipeline._sources import (
    BadSample,
    FolderShard,
    InputShard,
    Sample,
    TarShard,
    decode_image,
    input_sha256,
    input_size_bytes,
    iter_keys,
    iter_shard,
    list_shards,
)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Twelve 8x8 sklearn digits, scaled up to 32x32 uint8 grey."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:12]
    return np.stack([np.kron(d, np.ones((4, 4))) * (255 / 16) for d in images]).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey], axis=-1)


def _pil_reference(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def _corrupt_png(grey: np.ndarray) -> bytes:
    """A PNG whose IDAT fails zlib's data check (its chunk CRC recomputed, so only the pixel stream is bad)."""
    data = bytearray(_encode(_rgb(grey), "PNG"))
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4: at], "big")
    data[at + 4 + length - 1] ^= 0xFF  # last byte of the zlib stream: its adler32
    data[at + 4 + length: at + 8 + length] = zlib.crc32(bytes(data[at: at + 4 + length])).to_bytes(4, "big")
    return bytes(data)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def tar_shard(tmp_path: Path, digits: np.ndarray) -> TarShard:
    members: list[tuple[str, bytes]] = []
    for i, d in enumerate(digits[:6]):
        members += [(f"s{i}.png" if i % 2 else f"s{i}.jpg", _encode(d, "PNG" if i % 2 else "JPEG")),
                    (f"s{i}.cls", str(i).encode())]
    members += [("broken.png", _corrupt_png(digits[6])), ("broken.cls", b"1"),
                ("nolabel.png", _encode(digits[7], "PNG")), ("noimage.cls", b"3")]
    shard = list_shards(str(_tar(tmp_path / "part-000.tar", members)))[0]
    assert isinstance(shard, TarShard)
    return shard


@pytest.fixture()
def folder_root(tmp_path: Path, digits: np.ndarray) -> Path:
    root = tmp_path / "folder"
    for cls, names in {"cat": ["a", "sub/b"], "dog": ["c", "d"]}.items():
        for n in names:
            (root / cls / n).parent.mkdir(parents=True, exist_ok=True)
            (root / cls / f"{n}.png").write_bytes(_encode(digits[len(n)], "PNG"))
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_tar_key_listing_equals_the_decoded_samples(tar_shard: TarShard) -> None:
    items = list(iter_shard(tar_shard))
    keys = list(iter_keys(tar_shard))
    assert [k for k, _ in keys] == [i.key for i in items]
    assert {k: lab for k, lab in keys} == {**{f"s{i}": i for i in range(6)}, "broken": 1, "nolabel": -1, "noimage": 3}
    good = {i.key: i.label for i in items if isinstance(i, Sample)}
    assert good == {**{f"s{i}": i for i in range(6)}, "nolabel": -1}
    bad = {i.key: i.reason for i in items if isinstance(i, BadSample)}
    assert "undecodable png: OSError" in bad["broken"] and "no image member" in bad["noimage"]
    assert all(i.shard == "part-000" for i in items)


def test_folder_key_listing_equals_the_decoded_samples(folder_root: Path) -> None:
    shards = list_shards(str(folder_root))
    assert [type(s) for s in shards] == [FolderShard, FolderShard]
    assert [(s.name, s.label) for s in shards] == [("class-cat", 0), ("class-dog", 1)]
    items = [i for s in shards for i in iter_shard(s)]
    keys = [k for s in shards for k in iter_keys(s)]
    assert [k for k, _ in keys] == [i.key for i in items]
    assert {i.key: i.label for i in items if isinstance(i, Sample)} == {"cat/a": 0, "cat/sub/b": 0, "dog/c": 1,
                                                                       "dog/d": 1}
    assert [(i.key, i.reason.split(":")[0]) for i in items if isinstance(i, BadSample)] == [
        ("dog/broken", "undecodable image")]


def test_size_and_sha256_per_kind(tar_shard: TarShard, folder_root: Path) -> None:
    path = Path(tar_shard.url)
    assert input_size_bytes(tar_shard) == path.stat().st_size
    assert input_sha256(tar_shard) == hashlib.sha256(path.read_bytes()).hexdigest()
    dog = list_shards(str(folder_root))[1]
    assert input_size_bytes(dog) == sum(p.stat().st_size for p in (folder_root / "dog").iterdir()
                                        if p.suffix in (".png", ".jpg"))
    assert input_sha256(dog) is None
    piped = list_shards(f"pipe:cat {path}")[0]
    assert isinstance(piped, TarShard) and input_size_bytes(piped) is None and input_sha256(piped) is None
    assert [k for k, _ in iter_keys(piped)] == [k for k, _ in iter_keys(tar_shard)]


def test_shards_are_frozen_hashable_and_survive_pickling(tar_shard: TarShard, folder_root: Path) -> None:
    for shard in [tar_shard, *list_shards(str(folder_root))]:
        copy = pickle.loads(pickle.dumps(shard))
        assert copy == shard and hash(copy) == hash(shard) and type(copy) is type(shard)
        assert isinstance(copy, InputShard) and (copy.name, copy.url) == (shard.name, shard.url)
        assert list(iter_keys(copy)) == list(iter_keys(shard))
        with pytest.raises(dataclasses.FrozenInstanceError):
            copy.name = "other"  # type: ignore[misc]
    assert len({tar_shard, pickle.loads(pickle.dumps(tar_shard))}) == 1
    assert TarShard("a", "x/a.tar") != FolderShard("a", "x/a.tar")
    with pytest.raises(TypeError):
        InputShard("a", "x/a.tar")  # type: ignore[abstract]  # an abstract base: list_shards picks the kind


def test_brace_comma_and_newline_expansion(tmp_path: Path) -> None:
    for i in range(4):
        _tar(tmp_path / f"t-{i:03d}.tar", [])
    d = tmp_path
    assert [s.name for s in list_shards(f"{d}/t-{{000..002}}.tar")] == ["t-000", "t-001", "t-002"]
    assert [s.name for s in list_shards(f"{d}/t-{{000,003}}.tar,{d}/t-001.tar")] == ["t-000", "t-003", "t-001"]
    assert [s.name for s in list_shards(f"{d}/t-000.tar\n {d}/t-002.tar\n\n")] == ["t-000", "t-002"]
    assert [s.name for s in list_shards([f"{d}/t-00{{1,2}}.tar", f"{d}/t-003.tar"])] == ["t-001", "t-002", "t-003"]
    remote = list_shards("simplecache::memory://b/x-{0..1}.tar,memory://${X}/y.tar")  # "::" and "${" kept as-is
    assert [(s.name, s.url) for s in remote] == [("x-0", "simplecache::memory://b/x-0.tar"),
                                                 ("x-1", "simplecache::memory://b/x-1.tar"),
                                                 ("y", "memory://${X}/y.tar")]
    with pytest.raises(ValueError, match=r"input pattern '.*t-\{000,002\.tar'.*Unbalanced"):
        list_shards(f"{d}/t-{{000,002.tar")
    with pytest.raises(ValueError, match="input shard not found"):
        list_shards(f"{d}/t-009.tar")
    with pytest.raises(ValueError, match="no input shards"):
        list_shards(" , \n")


def test_glob_patterns_locally_and_on_fsspec_urls(tmp_path: Path) -> None:
    import fsspec

    for i in range(4):
        _tar(tmp_path / f"t-{i:03d}.tar", [])
    (tmp_path / "notes.txt").write_text("not a shard")
    d = tmp_path
    assert [s.name for s in list_shards(f"{d}/t-*.tar")] == ["t-000", "t-001", "t-002", "t-003"]  # sorted
    assert [s.name for s in list_shards(f"{d}/t-00?.tar")] == ["t-000", "t-001", "t-002", "t-003"]
    assert [s.name for s in list_shards(f"{d}/t-00[13].tar,{d}/t-{{000,002}}.tar")] == ["t-001", "t-003", "t-000",
                                                                                         "t-002"]
    with pytest.raises(ValueError, match=r"input pattern '.*/x-\*\.tar' matches nothing"):
        list_shards(f"{d}/x-*.tar")
    memory = fsspec.filesystem("memory")
    for i in range(3):
        memory.pipe(f"/globtest/r-{i}.tar", b"")
    found = list_shards("memory://globtest/r-*.tar")  # URLs in fsspec's own form (memory:///globtest/…)
    assert [s.name for s in found] == ["r-0", "r-1", "r-2"] and all(fsspec.open(s.url).open() for s in found)
    chained = list_shards("simplecache::memory://globtest/r-[02].tar")
    assert [s.name for s in chained] == ["r-0", "r-2"] and all(s.url.startswith("simplecache::memory://")
                                                               for s in chained)
    with pytest.raises(ValueError, match="matches nothing"):
        list_shards("memory://globtest/q-*.tar")


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("JPEG", {}), ("JPEG", {"quality": 50, "subsampling": 2}),
                                        ("JPEG", {"quality": 95, "subsampling": 0, "progressive": True})])
def test_decoding_matches_pil_for_8_bit_grey_and_rgb(digits: np.ndarray, fmt: str, kwargs: dict) -> None:
    for grey in digits[:6]:
        for array in (grey, _rgb(grey)):
            data = _encode(array, fmt, **kwargs)
            image = decode_image(data)
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
            np.testing.assert_array_equal(image.numpy(), _pil_reference(data))
            if fmt == "PNG":  # lossless: the pixels themselves, grey repeated over the 3 channels
                rgb = array if array.ndim == 3 else np.repeat(array[..., None], 3, axis=-1)
                np.testing.assert_array_equal(image.numpy(), rgb.transpose(2, 0, 1))


def test_torchvision_decoding_is_bit_identical_on_valid_8_bit_images(digits: np.ndarray) -> None:
    """Why a switch to torchvision was tempting (identical output): see the comment above ``decode_image``.

    Only valid images are given to torchvision here: on a corrupt PNG (``_corrupt_png``) torchvision 0.29
    crashes the process.
    """
    import torchvision.io as tvio  # a dependency of e2kd (timm needs it): no skip
    for grey in digits[:4]:
        for data in (_encode(_rgb(grey), "PNG"), _encode(_rgb(grey), "JPEG"), _encode(grey, "JPEG")):
            ours = decode_image(data)
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            theirs = tvio.decode_image(raw, mode=tvio.ImageReadMode.RGB)
            assert torch.equal(ours, theirs)


def test_corrupt_images_raise_a_clear_error(digits: np.ndarray) -> None:
    with pytest.raises(OSError, match="broken data stream"):
        decode_image(_corrupt_png(digits[0]))
    jpeg = _encode(digits[0], "JPEG")
    with pytest.raises(OSError, match="(?i)truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(OSError):
        decode_image(b"")


def test_an_input_that_cannot_be_opened_is_an_error_naming_it_not_an_empty_shard() -> None:
    from e2kd.pipeline._sources import InputShardError

    (shard,) = list_shards("memory://e2kd-sources-test/missing-000000.tar")  # URLs are not checked when listed
    for read in (lambda: list(iter_keys(shard)), lambda: list(iter_shard(shard))):
        with pytest.raises(InputShardError, match="cannot open input shard memory://e2kd-sources-test/missing"):
            read()


def test_local_inputs_are_listed_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray actors and DataLoader workers may run in another directory than the command that listed the shards."""
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "in-000000.tar", "w"):
        pass
    monkeypatch.chdir(tmp_path)
    (shard,) = list_shards("data/in-000000.tar")
    assert shard.url == str(tmp_path / "data" / "in-000000.tar") and shard.name == "in-000000"
