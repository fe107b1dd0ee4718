"""The commit log: a shard becomes visible by one small object, and the manifest absorbs those now and then.

A store is ``manifest.json`` (the *compacted* manifest) plus ``commits/<shard>.json``: one record per shard committed
since the last compaction, ``{"shard": name, "record": {…}}``, written atomically after the shard's files — so a
commit costs the same at 40,000 shards as at 10. The writer folds the records into the manifest (one atomic
replace, then the records are deleted) when they reach a quarter of the manifest's shards, and when it closes:
amortised, each commit pays for a few records' worth of manifest bytes.

A reader's *view* is the manifest plus every record present: the same set of complete shards whether or not (or
however often) the writer compacted, and so the same cache id — the sha256 of the canonical JSON of the manifest
that compacting that view writes (for a store without records, of ``manifest.json`` as stored, as always). A
reader that races a compaction (a record deleted between listing and reading) reads again.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec

from e2kd.storage._files import MANIFEST, STAGING_DIR, is_local, read_bounded, write_bytes_atomic, write_json_atomic
from e2kd.storage._manifest import Manifest, ManifestError, ShardRecord, cache_id_of
from e2kd.storage._names import is_valid_shard_name

__all__ = ["COMMITS_DIR", "StoreView", "read_view", "write_commit", "compact", "pending_commits",
           "should_compact", "COMPACT_MIN"]

COMMITS_DIR = "commits"
_SUFFIX = ".json"
#: Bytes one commit record may hold before it is refused unread.
RECORD_BYTES = 1 << 16
#: Records that may wait before a compaction; beyond, the writer compacts when they reach a quarter of the manifest.
COMPACT_MIN = 256
_READ_ATTEMPTS = 8


@dataclass(frozen=True)
class StoreView:
    """What a reader sees at one moment: the manifest with every committed shard, its JSON and its cache id."""

    manifest: Manifest
    document: dict[str, Any]
    cache_id: str
    pending: tuple[str, ...]  #: shards visible through commit records, not yet in ``manifest.json``

    def manifest_bytes(self, raw: bytes) -> bytes:
        """What ``manifest.json`` holds once this view is compacted (``raw``: the stored manifest's bytes)."""
        return raw if not self.pending else json.dumps(self.document, indent=1, sort_keys=True).encode()


def _dir(root: str) -> str:
    return f"{root}/{COMMITS_DIR}"


def pending_commits(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Names of the shards with a commit record (sorted); temporary files of an interrupted write are skipped.

    Raises:
        ManifestError: an entry of ``commits/`` that e2kd would not have written.
    """
    if not is_local(fs):
        fs.invalidate_cache(_dir(root))
    try:
        entries = fs.ls(_dir(root), detail=False)
    except FileNotFoundError:
        return []
    names = []
    for path in entries:
        entry = path.rstrip("/").rsplit("/", 1)[-1]
        if ".json.tmp-" in entry:
            continue  # an atomic write that never renamed: not a commit
        name = entry.removesuffix(_SUFFIX)
        if not entry.endswith(_SUFFIX) or not is_valid_shard_name(name):
            raise ManifestError(f"{_dir(root)}: unexpected entry {entry!r} (commit records are <shard>.json)")
        names.append(name)
    return sorted(names)


def _parse_record(name: str, raw: bytes) -> ShardRecord:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"commit record of shard {name} is not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("shard") != name:
        raise ManifestError(f"commit record {COMMITS_DIR}/{name}{_SUFFIX} does not name shard {name}")
    return ShardRecord.from_json(name, document.get("record"))


def _read_records(fs: fsspec.AbstractFileSystem, root: str,
                  names: list[str]) -> tuple[dict[str, ShardRecord], list[str]]:
    """The records of ``names`` and the names whose record vanished meanwhile (compacted)."""
    records, vanished = {}, []
    paths = {name: f"{_dir(root)}/{name}{_SUFFIX}" for name in names}
    if is_local(fs) or len(names) < 2:
        for name, path in paths.items():
            try:
                records[name] = _parse_record(name, read_bounded(fs, path, RECORD_BYTES, f"commit record {name}"))
            except FileNotFoundError:
                vanished.append(name)
        return records, vanished
    blobs = fs.cat(list(paths.values()), on_error="return")  # object storage: one concurrent batch of GETs
    for name, path in paths.items():
        data = blobs.get(path)
        if isinstance(data, FileNotFoundError) or data is None:
            vanished.append(name)
        elif isinstance(data, BaseException):
            raise data
        elif len(data) > RECORD_BYTES:
            raise ManifestError(f"commit record of shard {name} holds {len(data)} bytes, more than {RECORD_BYTES}")
        else:
            records[name] = _parse_record(name, data)
    return records, vanished


def read_view(fs: fsspec.AbstractFileSystem, root: str) -> tuple[StoreView, bytes]:
    """The store's current view and the stored manifest's bytes.

    Raises:
        FileNotFoundError: no manifest.
        ManifestError: a malformed manifest or commit record, or a store that kept changing under the reader.
    """
    for _ in range(_READ_ATTEMPTS):
        names = pending_commits(fs, root)  # listed before the manifest is read: see the module's docstring
        raw = fs.cat_file(f"{root}/{MANIFEST}")
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"{root}/{MANIFEST} is not valid JSON: {exc}") from None
        base = Manifest.from_json(document)
        records, vanished = _read_records(fs, root, names)
        if any(name not in base.shards for name in vanished):
            continue  # compacted between our listing and our read of the manifest: read again
        if not records:
            return StoreView(base, document, cache_id_of(document), ()), raw
        merged = base.with_shards(records)
        merged_document = merged.to_json()
        return StoreView(merged, merged_document, cache_id_of(merged_document), tuple(sorted(records))), raw
    raise ManifestError(f"{root}: the store changed under {_READ_ATTEMPTS} consecutive reads; try again")


def write_commit(fs: fsspec.AbstractFileSystem, root: str, name: str, record: ShardRecord, *,
                 reuse: str | None = None) -> None:
    """Make shard ``name`` visible: its record, written atomically (the shard's files are already in place).

    Locally the record is written to a temporary file and fsynced, then renamed into ``commits/``; ``reuse`` names
    a file of an earlier, compacted record to write it into (a new file costs an inode, whose allocation on ext4
    grows slower as the store's files grow in number; see :func:`compact`)."""
    text = json.dumps({"shard": name, "record": record.to_json()}, sort_keys=True).encode()
    final = f"{_dir(root)}/{name}{_SUFFIX}"
    if not is_local(fs):
        write_bytes_atomic(fs, final, text)  # one PUT: the object appears whole or not at all
        return
    os.makedirs(_dir(root), exist_ok=True)
    tmp = reuse or f"{root}/{STAGING_DIR}/{name}{_SUFFIX}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def should_compact(pending: int, compacted: int) -> bool:
    """Whether ``pending`` records should be folded into a manifest of ``compacted`` shards (amortised O(1))."""
    return pending >= max(COMPACT_MIN, compacted // 4)


def compact(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest, folded: Iterable[str], *,
            recycle: str | None = None) -> list[str]:
    """Write ``manifest`` (which holds the records of ``folded``) as ``manifest.json``, then take those records out
    of ``commits/``: deleted, or locally with ``recycle`` moved into that directory for :func:`write_commit` to
    reuse (returned)."""
    write_json_atomic(fs, f"{root}/{MANIFEST}", manifest.to_json())
    paths = [f"{_dir(root)}/{name}{_SUFFIX}" for name in folded]
    kept: list[str] = []
    if recycle is not None and is_local(fs):
        os.makedirs(recycle, exist_ok=True)
        for path in paths:
            spare = f"{recycle}/{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, spare)
                kept.append(spare)
    elif paths:
        try:
            fs.rm(paths)
        except FileNotFoundError:
            for path in paths:
                if fs.exists(path):
                    fs.rm(path)
    if is_local(fs) and fs.exists(_dir(root)) and not fs.ls(_dir(root)):
        fs.rmdir(_dir(root))
    return kept
