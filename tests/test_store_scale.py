"""Stores at many shards: O(1) commits (one record per shard), compaction, consistent readers, bounded key memory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_store_writer import _columns, _manifest

from e2kd.storage import ManifestError, copy_store, create_store, open_store
from e2kd.storage import _commits as commits_module
from e2kd.storage._commits import COMMITS_DIR, read_view
from e2kd.storage._files import resolve
from e2kd.storage._keyindex import KeyIndex

ROOT = Path(__file__).resolve().parents[1]


def _write(uri: str, names: list[str], *, close: bool = True, fmt: str = "zarr") -> object:
    writer = create_store(uri, _manifest(fmt))
    for i, name in enumerate(names):
        keys = [f"{name}/{j}" for j in range(3)]
        writer.record(name, writer.write_shard(name, _columns(3, seed=i), keys, [], source=f"in/{name}.tar"), keys)
    if close:
        writer.close()
    return writer


def _names(n: int) -> list[str]:
    return [f"part-{i:03d}" for i in range(n)]


def test_a_commit_writes_one_record_and_compactions_are_rare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "COMPACT_MIN", 4)
    rewrites = []
    real = commits_module.write_json_atomic
    monkeypatch.setattr(commits_module, "write_json_atomic", lambda *a: (rewrites.append(1), real(*a)))
    uri = str(tmp_path / "store")
    writer = _write(uri, [], close=False)
    before = len(rewrites)
    for i, name in enumerate(_names(60)):
        keys = [f"{name}/{j}" for j in range(3)]
        writer.record(name, writer.write_shard(name, _columns(3, seed=i), keys, [], source="x"), keys)
        assert open_store(uri).shard_names == _names(i + 1)  # visible at once, manifest rewritten or not
        pending = list((tmp_path / "store" / COMMITS_DIR).glob("*.json"))
        assert len(pending) <= max(4, (i + 1) // 4)  # records wait at most a quarter of the store
    assert len(rewrites) - before <= 10  # geometric compactions, not one manifest rewrite per commit (60)
    writer.close()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["manifest.json", "shards"]
    assert sorted(json.loads((tmp_path / "store" / "manifest.json").read_text())["shards"]) == _names(60)


def test_the_cache_id_does_not_depend_on_how_the_store_was_compacted(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "COMPACT_MIN", 1)  # compacts after (almost) every commit
    often = str(tmp_path / "often")
    _write(often, _names(12))
    monkeypatch.setattr(commits_module, "COMPACT_MIN", 10**9)  # never, until the writer closes
    never = str(tmp_path / "never")
    writer = _write(never, _names(12), close=False)
    uncompacted = open_store(never)
    assert len(list((tmp_path / "never" / COMMITS_DIR).iterdir())) == 12  # every shard visible through its record
    assert uncompacted.shard_names == _names(12) and uncompacted.verify() == []
    writer.close()
    assert not (tmp_path / "never" / COMMITS_DIR).exists()
    ids = {open_store(often).cache_id, open_store(never).cache_id, uncompacted.cache_id}
    assert len(ids) == 1, ids
    assert (tmp_path / "often" / "manifest.json").read_bytes() == (tmp_path / "never" / "manifest.json").read_bytes()


def test_a_reader_keeps_its_view_and_concurrent_readers_never_see_half_a_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "COMPACT_MIN", 2)  # compactions all along
    uri = str(tmp_path / "store")
    writer = _write(uri, _names(5), close=False)
    early = open_store(uri)
    early_id, early_keys = early.cache_id, sorted(early.keys())
    seen, problems, stop = [], [], threading.Event()

    checked: set[str] = set()

    def read_all_the_time() -> None:
        while not stop.is_set():
            try:
                store = open_store(uri)
                for name in set(store.shard_names) - checked:  # every visible shard is whole and verified
                    store.shard_columns(name)
                    checked.add(name)
                seen.append(len(store.shard_names))
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                problems.append(repr(exc))

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for i, name in enumerate(_names(40)[5:], start=5):
            keys = [f"{name}/{j}" for j in range(3)]
            writer.record(name, writer.write_shard(name, _columns(3, seed=i), keys, [], source="x"), keys)
    finally:
        stop.set()
        reader.join()
        writer.close()
    assert not problems, problems[:3]
    assert len(seen) > 5 and seen == sorted(seen) and len(checked) > 5  # views only grow
    assert early.cache_id == early_id and sorted(early.keys()) == early_keys and len(early) == 15
    assert all(int(early.read(k)["label"]) >= 0 for k in early_keys)  # the old view still reads
    pinned = open_store(uri, shards=early.shard_names)  # what a DataLoader worker of that run opens
    assert pinned.shard_names == early.shard_names and pinned.cache_id == early_id
    assert open_store(uri).cache_id != early_id


def test_a_reader_racing_a_compaction_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "COMPACT_MIN", 10**9)
    uri = str(tmp_path / "store")
    writer = _write(uri, _names(6), close=False)
    fs, root = resolve(uri)
    real = commits_module._read_records
    calls = []

    def compacted_meanwhile(*args: object) -> object:  # records deleted after our (older) manifest was read
        calls.append(1)
        if len(calls) == 1:
            writer.compact()
        return real(*args)

    monkeypatch.setattr(commits_module, "_read_records", compacted_meanwhile)
    view, _ = read_view(fs, root)
    assert len(calls) == 2 and sorted(view.manifest.shards) == _names(6) and not view.pending
    writer.close()
    assert view.cache_id == open_store(uri).cache_id


def test_a_killed_writer_leaves_records_that_readers_see_and_resume_folds(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "COMPACT_MIN", 10**9)
    killed = str(tmp_path / "killed")
    writer = _write(killed, _names(7), close=False)
    writer._lock.release()  # killed: no compaction
    (tmp_path / "killed" / COMMITS_DIR / "part-099.json.tmp-4242").write_text("{")  # a record write cut short
    assert open_store(killed).shard_names == _names(7)
    copy = copy_store(killed, str(tmp_path / "copy"))  # hand-over of a store still being written: its view
    assert copy.cache_id == open_store(str(tmp_path / "copy")).cache_id == open_store(killed).cache_id
    resumed = create_store(killed, _manifest())
    assert resumed.complete == set(_names(7))
    for i, name in enumerate(_names(10)[7:], start=7):
        keys = [f"{name}/{j}" for j in range(3)]
        resumed.record(name, resumed.write_shard(name, _columns(3, seed=i), keys, [], source=f"in/{name}.tar"), keys)
    resumed.close()
    _write(str(tmp_path / "straight"), _names(10))
    assert open_store(killed).cache_id == open_store(str(tmp_path / "straight")).cache_id
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["manifest.json", "shards"]


@pytest.mark.parametrize("entry, content, words", [
    ("part-000.json", '{"shard": "part-001", "record": {}}', "does not name shard part-000"),
    ("part-000.json", "not json", "not JSON"),
    ("notes.txt", "hello", "unexpected entry 'notes.txt'"),
    ("part-000.json", json.dumps({"shard": "part-000", "record": {"num_samples": -1}}), "num_samples"),
])
def test_a_hostile_commit_record_is_refused_in_one_line(tmp_path: Path, entry: str, content: str,
                                                       words: str) -> None:
    uri = str(tmp_path / "store")
    _write(uri, _names(2))
    (tmp_path / "store" / COMMITS_DIR).mkdir()
    (tmp_path / "store" / COMMITS_DIR / entry).write_text(content)
    with pytest.raises(ManifestError, match=words):
        open_store(uri)
    with pytest.raises(ManifestError, match=words):
        create_store(uri, _manifest())
    assert (tmp_path / "store" / COMMITS_DIR / entry).read_text() == content  # nothing it did not write is touched


def test_keys_are_unique_across_shards_with_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "store")
    writer = _write(uri, _names(2), close=False)
    cols = _columns(3, seed=9)
    record = writer.write_shard("part-009", cols, ["new/0", "part-001/2", "new/2"], [], source="x")
    with pytest.raises(ValueError, match="key 'part-001/2' is also in input shard part-001"):
        writer.record("part-009", record, ["new/0", "part-001/2", "new/2"])
    writer.close()
    # every hash equal: each match is a candidate only, confirmed against the other shard's real keys
    monkeypatch.setattr("e2kd.storage._keyindex.hash_keys", lambda keys: np.zeros(len(list(keys)), np.uint64))
    index = KeyIndex()
    index.add(["a", "b"], "s1")
    real_keys = {"s1": ["a", "b"]}
    assert index.first_clash(["c", "d"], "s2", real_keys.__getitem__) is None
    assert index.first_clash(["c", "b"], "s2", real_keys.__getitem__) == ("b", "s1")
    assert index.first_clash(["a"], "s1", real_keys.__getitem__) is None  # a shard recorded again


def test_ten_million_keys_take_120_mb() -> None:
    tracemalloc.start()
    try:
        index, rng = KeyIndex(), np.random.default_rng(0)
        for i in range(1000):  # 1,000 shards of 10,000 keys
            index.add_hashes(rng.integers(0, 2**63, 10_000, dtype=np.uint64), f"shard-{i}")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == 10_000_000 and index.nbytes == 12 * 10_000_000
    assert current < 130e6 and peak < 500e6, (current, peak)  # a dict of key strings: ~1.1 GB


def test_bench_scale_prints_one_json_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--shards", "10,30", "--json"],
                            capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures["commit_ms_per_shard"]) == {"10", "30"} and all(v > 0 for v in
                                                                     figures["commit_ms_per_shard"].values())
