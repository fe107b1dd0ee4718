"""The store's write path on its own (no teacher, no Ray): create_store → write_shard → record, resume, kills,
object storage, the typed manifest and the format registry."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from e2kd.storage import (
    CompatibilityError,
    Encoding,
    Manifest,
    ManifestError,
    ShardRecord,
    create_store,
    get_format,
    list_formats,
    open_store,
)
from e2kd.storage._files import StoreLockedError


def _manifest(fmt: str = "zarr", classes: int = 3, k: int = 2, policy: str = "random_resized_crop") -> Manifest:
    return Manifest(e2kd_version="test", format=fmt, teacher={"name": "t", "num_classes": classes, "kwargs": {}},
                    explainer={"name": "gradcam", "family": "gradcam"},
                    preprocessing={"input_size": [8, 8]}, views={"policy": policy, "k": k},
                    encoding=Encoding(num_classes=classes), precision="fp32")


def _columns(n: int, seed: int, k: int = 2, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k, classes)).astype(np.float32)
    cols = Encoding(num_classes=classes).encode(logits, rng.random((n, k, 1, 2, 2), dtype=np.float32))
    cols["labels"] = rng.integers(0, classes, n).astype(np.int32)
    cols["views"] = rng.random((n, k, 5), dtype=np.float32)
    return cols


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_shard_is_written_committed_and_visible_only_once_recorded(tmp_path: Path, fmt: str) -> None:
    uri = str(tmp_path / "store")
    cols, keys = _columns(5, seed=0), [f"s/{i}" for i in range(5)]
    with create_store(uri, _manifest(fmt)) as writer:
        record = writer.write_shard("part-0", cols, keys, [{"key": "bad", "shard": "part-0", "reason": "x"}],
                                    source="in/part-0.tar")
        assert record.num_samples == 5 and record.num_errors == 1 and record.map_shape == (1, 2, 2)
        assert (tmp_path / "store" / "shards" / "part-0").is_dir()  # committed ...
        assert len(open_store(uri)) == 0  # ... but not visible before the manifest records it
        with pytest.raises(StoreLockedError):
            create_store(uri, _manifest(fmt))  # one writer per store
        writer.record("part-0", record, keys, source_bytes=123)
        store = open_store(uri)
        assert sorted(store.keys()) == sorted(keys) and store.manifest.shards["part-0"].source_bytes == 123
        got_keys, got = store.shard_columns("part-0")
        assert got_keys == keys and all(np.array_equal(got[c], cols[c]) for c in cols)
        assert store.errors() == [{"key": "bad", "shard": "part-0", "reason": "x"}] and store.verify() == []
    with create_store(uri, _manifest(fmt)) as resumed:  # lock released; resume keeps the recorded shard
        assert resumed.complete == {"part-0"}
        with pytest.raises(ValueError, match="also in input shard part-0"):
            resumed.record("part-1", resumed.write_shard("part-1", _columns(1, 1), ["s/3"], [], source="b"), ["s/3"])
    assert open_store(uri).shard_names == ["part-0"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["manifest.json", "shards"]  # no .staging/


def test_resume_refuses_other_settings_and_overwrite_starts_over(tmp_path: Path) -> None:
    uri = str(tmp_path / "store")
    with create_store(uri, _manifest()) as writer:
        writer.record("a", writer.write_shard("a", _columns(2, 0), ["x", "y"], [], source="a"), ["x", "y"])
    other = _manifest()
    other = Manifest(**{**other.__dict__, "encoding": Encoding(num_classes=3, map_dtype="uint8")})
    with pytest.raises(ManifestError, match="different encoding: map_dtype='float16' in the store, 'uint8' now"):
        create_store(uri, other)
    with create_store(uri, other, overwrite=True) as writer:
        assert writer.complete == set() and not (tmp_path / "store" / "shards").exists()


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store_writer import _columns, _manifest
    import e2kd.storage._shards as shards
    from e2kd.storage import create_store

    writer = create_store({uri!r}, _manifest())
    writer.record("a", writer.write_shard("a", _columns(4, 0), list("abcd"), [], source="a"), list("abcd"))
    if {where!r} == "staging":  # killed while the shard is being staged
        def stuck(path):
            print("READY", flush=True)
            time.sleep(60)
        shards.checksum_local_dir = stuck
        writer.write_shard("b", _columns(4, 1), list("efgh"), [], source="b")
    else:  # killed after the commit, before the manifest records it
        writer.write_shard("b", _columns(4, 1), list("efgh"), [], source="b")
        print("READY", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("where", ["staging", "committed"])
def test_a_killed_write_leaves_no_visible_shard_and_resume_cleans_up(tmp_path: Path, where: str) -> None:
    uri = str(tmp_path / "store")
    script = _KILLED_WRITER.format(tests=str(Path(__file__).parent), uri=uri, where=where)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    leftover = tmp_path / "store" / (".staging" if where == "staging" else "shards/b")
    assert leftover.exists() and any(leftover.iterdir())  # the kill really left a half-written shard behind
    store = open_store(uri)
    assert store.shard_names == ["a"] and "e" not in store and store.verify() == []
    with create_store(uri, _manifest()) as writer:  # the dead writer's lock is taken over, leftovers removed
        assert writer.complete == {"a"}
        assert not (tmp_path / "store" / "shards" / "b").exists()
        assert not (tmp_path / "store" / ".staging").exists()
        writer.record("b", writer.write_shard("b", _columns(4, 1), list("efgh"), [], source="b"), list("efgh"))
    assert sorted(open_store(uri).keys()) == list("abcdefgh")


def test_object_storage_path_uploads_then_records(tmp_path: Path) -> None:
    """A non-local filesystem (fsspec memory://) goes through the upload commit and the remote lock."""
    uri = "memory://e2kd-writer-test/store"
    cols = _columns(3, 2)
    with create_store(uri, _manifest("wds")) as writer:
        assert writer.shard_writer().uri == uri
        writer.record("p", writer.write_shard("p", cols, ["k0", "k1", "k2"], [], source="p"), ["k0", "k1", "k2"])
    store = open_store(uri)
    assert store.verify() == [] and np.array_equal(store.shard_columns("p")[1]["maps"], cols["maps"])


def test_manifest_round_trip_and_student_checks() -> None:
    m = _manifest().with_shard("a", ShardRecord(source="a", num_samples=2, num_errors=0, sha256="0" * 64, nbytes=9,
                                                map_shape=(1, 2, 2)))
    assert Manifest.from_json(m.to_json()) == m and m.map_shape == (1, 2, 2) and m.num_samples == 2
    named = Manifest(**{**m.__dict__, "class_names": ("a", "b", "c")})
    assert Manifest.from_json(named.to_json()) == named and named.class_name(1) == "1 (b)" and m.class_name(1) == "1"
    with pytest.raises(ManifestError, match="class_names is not a list of 3 strings"):
        Manifest.from_json({**named.to_json(), "class_names": ["a"]})
    assert m.inputs["urls"] == ["a"] and m.inputs["fingerprint"]
    m.check_student(num_classes=3, explainer_family="gradcam", input_size=8)
    for kwargs, field in [({"num_classes": 4}, "num_classes"), ({"explainer_family": "bcos"}, "explainer"),
                          ({"input_size": 16}, "input_size")]:
        with pytest.raises(CompatibilityError, match=f"^{field}:"):
            m.check_student(**kwargs)
    full = _manifest(k=1, policy="full").with_shard("a", m.shards["a"])
    full.check_student(input_size=16)  # a full cache is joint-cropped at any student size
    with pytest.raises(CompatibilityError, match="incomplete store"):
        _manifest().check_student()
    bad = m.to_json()
    bad["shards"]["a"]["num_samples"] = -1
    with pytest.raises(ManifestError, match="shard 'a': bad num_samples"):
        Manifest.from_json(bad)


def test_format_registry_feeds_the_cli_and_wds_shards_are_webdataset_joinable(tmp_path: Path) -> None:
    import webdataset as wds

    from e2kd.cli import main

    cache_teacher = main.commands["cache-teacher"]
    choices = next(p for p in cache_teacher.params if p.name == "fmt").type.choices
    assert list(choices) == list_formats() == ["wds", "zarr"]
    with pytest.raises(ValueError, match="unknown store format 'hdf5'; available: wds, zarr"):
        get_format("hdf5")
    keys = ["cls-a/img1", "img.with.dots", "../escape"]  # the last two cannot be WebDataset keys
    cols = _columns(3, 3)
    get_format("wds").write(tmp_path, cols, keys, Encoding(num_classes=3))
    with tarfile.open(tmp_path / "data.tar.gz") as tar:  # one member per sample, in a gzip stream
        names = tar.getnames()
    assert all(not n.startswith(("/", "..")) for n in names) and len(names) == len(keys)
    samples = list(wds.WebDataset(str(tmp_path / "data.tar.gz"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["cls-a/img1", "00000001", "00000002"]
    assert all(np.array_equal(samples[r]["e2kd.npy"][c], cols[c][r]) for r in range(3) for c in cols)
    blob = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    read = get_format("wds").read(blob, ["labels"], "shard", None, keys)
    assert np.array_equal(read["labels"], cols["labels"])
    with pytest.raises(ValueError, match="refused tar member"):  # rows named by another shard's keys
        get_format("wds").read(blob, ["labels"], "shard", None, ["x", "y", "z"])


def test_wds_shards_of_e2kd_0_3_still_read(tmp_path: Path) -> None:
    """Shards of one member per column (``data.tar``) read unchanged, keys with and without member names."""
    from legacy_wds import write_column_members

    keys = ["cls-a/img1", "img.with.dots", "../escape"]
    cols = _columns(3, 3)
    write_column_members(None, tmp_path, cols, keys)
    read = get_format("wds").read({p.name: p.read_bytes() for p in tmp_path.iterdir()}, sorted(cols), "shard", None,
                                  keys)
    assert all(np.array_equal(read[c], cols[c]) for c in cols)


def test_wds_shards_of_e2kd_0_1_still_read(tmp_path: Path) -> None:
    """Version-1 stores named every row by its number: they read unchanged."""
    cols = _columns(2, 4)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in range(2):
            for name in sorted(cols):
                data = io.BytesIO()
                np.save(data, np.array(cols[name][row]), allow_pickle=False)
                info = tarfile.TarInfo(f"{row:08d}.{name}.npy")
                info.size = data.tell()
                data.seek(0)
                tar.addfile(info, data)
    read = get_format("wds").read({"data.tar": buf.getvalue()}, sorted(cols), "shard", None, ["k0", "k1"])
    assert all(np.array_equal(read[c], cols[c]) for c in cols)


def test_show_finds_images_of_a_handed_over_image_folder_cache(tmp_path: Path) -> None:
    from PIL import Image

    from e2kd.stages._figures import find_image

    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (9, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "cat" / "img0.png")
    uri = str(tmp_path / "store")
    with create_store(uri, _manifest()) as writer:  # the shard's source is the class directory, as cached
        record = writer.write_shard("class-cat", _columns(1, 0), ["cat/img0"], [], source=str(folder / "cat"))
        writer.record("class-cat", record, ["cat/img0"])
    store = open_store(uri)
    assert np.array_equal(find_image(store, "cat/img0").permute(1, 2, 0).numpy(), pixels)
    moved = tmp_path / "elsewhere"
    folder.rename(moved)  # handed over: the recorded path is gone
    with pytest.raises(ValueError, match="not reachable here .* pass --data"):
        find_image(store, "cat/img0")
    assert np.array_equal(find_image(store, "cat/img0", data=str(moved)).permute(1, 2, 0).numpy(), pixels)


# ---- integrity on every read: few objects per zarr shard, a checksum per chunk / member ------------------------
def _store_with_one_shard(tmp_path: Path, fmt: str, n: int, chunk_samples: int = 64) -> tuple[str, list[str]]:
    import dataclasses

    uri = str(tmp_path / f"store-{fmt}")
    manifest = _manifest(fmt)
    manifest = dataclasses.replace(manifest, encoding=dataclasses.replace(manifest.encoding,
                                                                          chunk_samples=chunk_samples))
    keys = [f"s/{i}" for i in range(n)]
    with create_store(uri, manifest) as writer:
        writer.record("part-0", writer.write_shard("part-0", _columns(n, seed=1), keys, [], source="x"), keys)
    return uri, keys


def test_a_zarr_shard_is_a_handful_of_objects_whatever_its_chunk_count(tmp_path: Path) -> None:
    uri, keys = _store_with_one_shard(tmp_path, "zarr", n=100, chunk_samples=8)  # 13 chunks per column
    shard = tmp_path / "store-zarr" / "shards" / "part-0"
    columns = _columns(100, seed=1)
    for column in columns:  # one (sharded) object per column, not one per chunk (13)
        objects = [p for p in (shard / "data.zarr" / column).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(objects) <= 1, (column, objects)
    assert sum(1 for p in shard.rglob("*") if p.is_file()) <= 2 * len(columns) + 3
    store = open_store(uri)
    assert all(np.array_equal(store.shard_columns("part-0")[1][k], v) for k, v in columns.items())
    assert [str(store.read(k)["label"]) for k in keys[:3]] == [str(v) for v in columns["labels"][:3]]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_damaged_chunk_is_named_by_array_when_it_is_read(tmp_path: Path, fmt: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from legacy_wds import write_column_members

    from e2kd.storage import StoreIntegrityError
    from e2kd.storage._wds_store import WdsFormat

    monkeypatch.setattr(WdsFormat, "write", write_column_members)  # wds: the e2kd 0.3 layout, one member per column
    uri, keys = _store_with_one_shard(tmp_path, fmt, n=20)
    shard = tmp_path / f"store-{fmt}" / "shards" / "part-0"
    if fmt == "zarr":
        target = next(p for p in (shard / "data.zarr" / "maps").rglob("*") if p.is_file() and p.name != "zarr.json")
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x10  # inside the first chunk's compressed bytes
    else:
        target = shard / "data.tar"
        data = bytearray(target.read_bytes())
        member = data.find(b"s/7.maps.npy")  # the member header; its payload starts 512 bytes later
        data[member + 512 + 130] ^= 0x10
    target.write_bytes(bytes(data))
    store = open_store(uri)
    with pytest.raises(StoreIntegrityError) as err:
        store.read(keys[0])
    message = str(err.value)
    assert "shard part-0" in message and "array 'maps' is damaged" in message and "\n" not in message, message
    assert fmt == "zarr" or "row 7" in message
    assert [p.split(": ")[0] for p in store.verify()] == ["part-0"]


def test_a_damaged_wds_record_is_named_by_row_and_nothing_else_reads(tmp_path: Path) -> None:
    """A byte changed inside a compressed wds shard: the shard is refused, naming it and the first row it spoils."""
    import gzip

    from e2kd.storage import StoreIntegrityError

    uri, keys = _store_with_one_shard(tmp_path, "wds", n=20)
    target = tmp_path / "store-wds" / "shards" / "part-0" / "data.tar.gz"
    plain = bytearray(gzip.decompress(target.read_bytes()))
    member = plain.find(b"s/7.e2kd.npy")  # the member header; its record starts 512 bytes later
    plain[member + 512 + 200] ^= 0x10  # inside the record's data, past its .npy header
    target.write_bytes(gzip.compress(bytes(plain), mtime=0))  # a consistent gzip stream: only row 7 is wrong
    store = open_store(uri)
    with pytest.raises(StoreIntegrityError) as err:
        store.read(keys[0])
    message = str(err.value)
    assert "shard part-0" in message and "row 7 is damaged" in message and "\n" not in message, message
    assert [p.split(": ")[0] for p in store.verify()] == ["part-0"]
    target.write_bytes(target.read_bytes()[:-40])  # truncated: the gzip stream ends early
    with pytest.raises(StoreIntegrityError, match="part-0"):
        open_store(uri).read(keys[0])
