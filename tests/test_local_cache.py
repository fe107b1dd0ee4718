"""``--local-cache DIR --local-cache-gb N``: remote cache and input shards kept on local disk across epochs and runs,
bounded, verified on every use (a damaged copy is fetched again), never touching what e2kd did not write."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import S3, TEACHER_KWARGS

from e2kd.storage._files import checksum_blobs
from e2kd.storage._local_cache import LocalCache, LocalCacheError


def _blobs(i: int, size: int = 1000) -> dict[str, bytes]:
    return {"keys.json": json.dumps([f"k{i}"]).encode(), "data/c/0": bytes([i % 256]) * size}


class Remote:
    """A fake remote: counts fetches."""

    def __init__(self) -> None:
        self.fetches = 0

    def shard(self, cache: LocalCache, i: int, size: int = 1000) -> dict[str, bytes]:
        want = _blobs(i, size)
        checksum = checksum_blobs(want)[0]

        def fetch() -> dict[str, bytes]:
            self.fetches += 1
            return dict(want)

        blobs, ok = cache.blobs(checksum, fetch, lambda b: checksum_blobs(b)[0] == checksum)
        assert ok and blobs == want
        return blobs


def test_a_shard_is_fetched_once_and_a_damaged_copy_again(tmp_path: Path) -> None:
    cache, remote = LocalCache.create(tmp_path / "lc", 1.0), Remote()
    for _ in range(3):
        remote.shard(cache, 1)
    assert remote.fetches == 1
    (entry,) = (tmp_path / "lc" / "entries").iterdir()
    (entry / "data" / "c" / "0").write_bytes(b"\x00" * 999)  # bit rot / truncation on the local disk
    with pytest.warns(UserWarning, match="dropped and fetched again"):
        remote.shard(cache, 1)
    assert remote.fetches == 2
    remote.shard(cache, 1)
    assert remote.fetches == 2


def test_bounded_least_recently_used_first_and_an_oversize_shard_is_not_kept(tmp_path: Path) -> None:
    cache, remote = LocalCache(str(LocalCache.create(tmp_path / "lc", 1.0).root), 3500), Remote()
    for i in range(3):  # ~1 KB each: all three fit
        remote.shard(cache, i)
        time.sleep(0.01)
    remote.shard(cache, 0)  # used again: now the most recent
    time.sleep(0.01)
    remote.shard(cache, 3)  # a fourth: the least recently used (1) goes
    assert cache.total_bytes() <= 3500
    fetches = remote.fetches
    remote.shard(cache, 0), remote.shard(cache, 3)
    assert remote.fetches == fetches  # still there
    remote.shard(cache, 1)
    assert remote.fetches == fetches + 1  # evicted, fetched again
    remote.shard(cache, 9, size=10_000)  # larger than the whole budget: read, not kept
    assert cache.total_bytes() <= 3500 and not any("tmp" in p.name for p in (tmp_path / "lc" / "entries").iterdir())
    assert not list((tmp_path / "lc" / "tmp").iterdir())


def test_files_are_copied_once_and_checked_by_sha256(tmp_path: Path) -> None:
    cache = LocalCache.create(tmp_path / "lc", 1.0)
    calls = []

    def fetch(to: Path) -> None:
        calls.append(to)
        to.write_bytes(b"tar bytes" * 100)

    first = cache.file("s3://b/x.tar\x00900\x00etag1", fetch)
    assert first is not None and first.read_bytes() == b"tar bytes" * 100
    assert cache.file("s3://b/x.tar\x00900\x00etag1", fetch) == first and len(calls) == 1
    assert cache.file("s3://b/x.tar\x00900\x00etag2", fetch) != first and len(calls) == 2  # a new version
    first.write_bytes(b"tar bytes" * 99)
    with pytest.warns(UserWarning, match="sha256 changed"):
        again = cache.file("s3://b/x.tar\x00900\x00etag1", fetch)
    assert len(calls) == 3 and again.read_bytes() == b"tar bytes" * 100
    small = LocalCache(cache.root, 100)
    assert small.file("s3://b/y.tar\x00900\x00e", fetch) is None  # does not fit: the caller reads the remote


def test_a_directory_e2kd_did_not_make_is_refused_and_nothing_in_it_touched(tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(LocalCacheError, match="not an e2kd local cache"):
        LocalCache.create(mine, 1.0)
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    with pytest.raises(LocalCacheError, match="must be > 0"):
        LocalCache.create(tmp_path / "new", 0)
    LocalCache.create(tmp_path / "new", 1.0)
    LocalCache.create(tmp_path / "new", 2.0)  # reopened: ours


def test_blob_names_cannot_escape_the_entry(tmp_path: Path) -> None:
    cache = LocalCache.create(tmp_path / "lc", 1.0)
    hostile = {"../../escaped": b"x", "keys.json": b"[]"}
    checksum = checksum_blobs(hostile)[0]
    blobs, ok = cache.blobs(checksum, lambda: dict(hostile), lambda b: checksum_blobs(b)[0] == checksum)
    assert ok and not (tmp_path / "escaped").exists() and not list((tmp_path / "lc" / "entries").iterdir())


# ---- train-student from s3 with --local-cache ----------------------------------------------------------------------
def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "student.safetensors"))


OLD = 1_000_000_000  # a file mtime no fetch writes: stamped on every entry's files, it survives only unfetched


def _stamp(root: Path) -> None:
    for f in (root / "entries").rglob("*"):
        if f.is_file():
            os.utime(f, (OLD, OLD))


def _fetched_again(root: Path) -> set[str]:
    """Entries whose files are newer than the stamp (fetched since)."""
    return {p.name for p in (root / "entries").iterdir()
            if any(f.stat().st_mtime != OLD for f in p.rglob("*") if f.is_file())}


def test_train_student_from_s3_reads_each_shard_once_and_learns_the_same(s3: S3, digits: Path, cache: Path,
                                                                         tmp_path: Path) -> None:
    from e2kd.stages._train_student import TrainOptions, train_student
    from e2kd.storage._copy import copy_store

    s3.use()
    for i in range(2):
        s3.fs.put(str(digits / f"train-{i:06d}.tar"), f"{s3.bucket}/data/train-{i:06d}.tar")
    copy_store(str(cache), s3.url("cache"))
    common = dict(data=s3.url("data/train-{000000..000001}.tar"), cache=s3.url("cache"), student="resnet18",
                  student_kwargs=TEACHER_KWARGS, epochs=2, batch_size=16, steps_per_epoch=3, progress=False,
                  allow_missing=True)
    train_student(TrainOptions(**common, out=str(tmp_path / "plain")))
    local = tmp_path / "local-cache"
    train_student(TrainOptions(**common, out=str(tmp_path / "cached"), workers=2, local_cache=str(local)))
    first = {p.name for p in (local / "entries").iterdir()}
    assert sum(n.startswith("file-") for n in first) == 2  # the two input tars
    assert sum(n.startswith("shard-") for n in first) >= 2  # the cache shards they join with
    plain, cached = _weights(tmp_path / "plain"), _weights(tmp_path / "cached")
    assert all(torch.equal(plain[k], cached[k]) for k in plain)  # the same samples, the same bytes
    damaged = next(n for n in first if n.startswith("file-"))
    (local / "entries" / damaged / "data").write_bytes(b"not a tar")
    _stamp(local)
    with pytest.warns(UserWarning, match="dropped and fetched again"):
        train_student(TrainOptions(**common, out=str(tmp_path / "again"), local_cache=str(local)))
    second = {p.name for p in (local / "entries").iterdir()}
    assert second == first and _fetched_again(local) == {damaged}  # only the damaged copy was fetched again
    again = _weights(tmp_path / "again")
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    budget = 1.5 * max(sum(f.stat().st_size for f in (local / "entries" / n).rglob("*") if f.is_file())
                       for n in second) / 1e9
    small = tmp_path / "small-cache"
    train_student(TrainOptions(**common, out=str(tmp_path / "small"), local_cache=str(small), local_cache_gb=budget))
    assert LocalCache(str(small), int(budget * 1e9)).total_bytes() <= budget * 1e9
    assert all(torch.equal(plain[k], v) for k, v in _weights(tmp_path / "small").items())
