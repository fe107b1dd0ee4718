"""Writing a cache: ``create_store(uri, manifest)`` → :class:`CacheWriter` (the whole write path of a store).

The writer owns the lock (one writer per store), resume (which shards are complete; leftovers of a killed
run removed), writing one shard (stage → checksum → commit: a rename locally, an upload remotely) and
recording it: one small commit record per shard, written last and atomically (see :mod:`e2kd.storage._commits`),
folded into the manifest now and then and when the writer closes. A shard becomes visible to readers only when
its record exists, so the store is consistent at every instant, and a commit costs the same at any store size.

Work can be spread over processes (Ray actors): :meth:`CacheWriter.shard_writer` gives a small picklable
:class:`ShardWriter` that writes and commits shards; only the process holding the :class:`CacheWriter`
records them.

Example:
    >>> with create_store("cache/", manifest) as writer:          # doctest: +SKIP
    ...     record = writer.write_shard("train-0", columns, keys, errors, source="train-0.tar")
    ...     writer.record("train-0", record, keys)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from e2kd.storage._commits import COMMITS_DIR, compact, read_view, should_compact, write_commit
from e2kd.storage._encoding import Encoding
from e2kd.storage._files import (
    MANIFEST,
    SHARDS_DIR,
    STAGING_DIR,
    StoreLock,
    StoreLockedError,
    check_lock_token,
    commit_dir,
    is_local,
    read_json,
    remove_tree,
    resolve,
)
from e2kd.storage._keyindex import KeyIndex
from e2kd.storage._manifest import Manifest, ManifestError, ShardRecord, check_map_shapes
from e2kd.storage._ownership import check_writable, recorded_shards, remove_owned_shards
from e2kd.storage._shards import KEYS_NAME, stage_shard

__all__ = ["create_store", "CacheWriter", "ShardWriter"]


@dataclass(frozen=True)
class ShardWriter:
    """Writes and commits whole shards of one store; plain values, so it travels to other processes.

    ``lock_token`` is the token of the :class:`CacheWriter` that handed it out: a shard is committed only
    while the store's lock still holds it (a worker that outlived its killed driver never commits).
    """

    uri: str
    fmt: str
    encoding: Encoding
    lock_token: str | None = None

    def check_reachable(self) -> None:
        """Raise unless this process can see the store (a local path on another node of a cluster cannot)."""
        fs, root = resolve(self.uri)
        if is_local(fs) and not os.path.isdir(root):
            raise RuntimeError(f"store {root} is not visible on this node: on a multi-node cluster the store must "
                               f"be on shared storage or at an object-store URL")

    def write_shard(self, name: str, columns: dict[str, np.ndarray], keys: list[str], errors: list[dict[str, str]],
                    *, source: str, source_sha256: str | None = None) -> ShardRecord:
        """Stage, checksum and commit one shard; return its record (not yet in the manifest).

        ``errors`` lists skipped samples (``{"key", "shard", "reason"}``) and samples kept with their label
        set to −1 (those also carry ``"kept"``). A failure at any point leaves no visible shard.
        """
        fs, root = resolve(self.uri)
        staging_root = Path(root) / STAGING_DIR if is_local(fs) else Path(tempfile.mkdtemp(prefix="e2kd-stage-"))
        staged, sha, nbytes = stage_shard(staging_root, self.fmt, columns, keys, errors, self.encoding)
        try:
            if self.lock_token is not None:
                check_lock_token(fs, root, self.lock_token)
            commit_dir(staged, fs, root, name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            if not is_local(fs):
                shutil.rmtree(staging_root, ignore_errors=True)
        relabelled = sum(1 for e in errors if "kept" in e)
        first, *more = self.encoding.explanation_fields
        map_shape = first.value_shape(columns) if keys else None
        extra = {f.name: f.value_shape(columns) for f in more} if keys and more else None
        return ShardRecord(source=source, num_samples=len(keys), num_errors=len(errors) - relabelled, sha256=sha,
                           nbytes=nbytes, map_shape=map_shape, num_bad_labels=relabelled, source_sha256=source_sha256,
                           extra_map_shapes=extra)


class CacheWriter:
    """The one writer of a store: holds its lock, knows its manifest, records committed shards.

    Use :func:`create_store`; close it (or use it as a context manager) to release the lock.
    """

    def __init__(self, uri: str, manifest: Manifest, *, overwrite: bool = False, create_bucket: bool = False) -> None:
        self.uri = str(uri)
        self.fs, self.root = resolve(uri)
        check_writable(self.uri, create_bucket=create_bucket)  # never into (or cleaning) what is not an e2kd store
        self.fs.makedirs(self.root, exist_ok=True)
        self._lock = StoreLock(self.fs, self.root)
        self._lock.acquire()
        try:
            self._base = self._prepare(manifest, overwrite)  # the compacted manifest
            self._pending: dict[str, ShardRecord] = {}  # committed since (one record object each)
            self._shape, self._extra_shapes = self._base.map_shape, dict(self._base.extra_map_shapes or {})
            self._merged: Manifest | None = self._base
            self._keys = self._key_index()
            self._spares: list[str] = []  # files of compacted records, written into again (no new inode per commit)
        except BaseException:
            self._lock.release()
            raise

    # ---- resume --------------------------------------------------------------------------------
    def _prepare(self, wanted: Manifest, overwrite: bool) -> Manifest:
        """Load (resume: manifest and commit records, compacted) or start the manifest; drop leftovers of killed
        runs."""
        path = f"{self.root}/{MANIFEST}"
        if overwrite:  # only what this store wrote: the shards its manifest records or that carry the marker
            remove_owned_shards(self.fs, self.root, keep=set(), owned=recorded_shards(self.fs, self.root))
            for leftover in (f"{self.root}/{STAGING_DIR}", f"{self.root}/{COMMITS_DIR}", path):
                if self.fs.exists(leftover):
                    self.fs.rm(leftover, recursive=True)
        manifest = wanted
        folded: tuple[str, ...] = ()
        if self.fs.exists(path):
            view, _ = read_view(self.fs, self.root)
            manifest, folded = view.manifest, view.pending
            manifest.check_same_run(wanted)
        if self.fs.exists(f"{self.root}/{STAGING_DIR}"):
            remove_tree(self.fs, f"{self.root}/{STAGING_DIR}")  # a killed run's worker may still be writing there
        remove_owned_shards(self.fs, self.root, keep=set(manifest.shards))  # written by a killed run, never recorded
        compact(self.fs, self.root, manifest, folded)
        if self.fs.exists(f"{self.root}/{COMMITS_DIR}"):
            remove_tree(self.fs, f"{self.root}/{COMMITS_DIR}")  # temporary files of a record write that was killed
        return manifest

    def _key_index(self) -> KeyIndex:
        """Which shard holds each key, over the complete shards already in the store (one key file each)."""
        index = KeyIndex()
        for name in self._base.complete_shards:
            index.add(self._shard_keys(name), name)
        return index

    def _shard_keys(self, name: str) -> list[str]:
        return read_json(self.fs, f"{self.root}/{SHARDS_DIR}/{name}/{KEYS_NAME}")

    @property
    def manifest(self) -> Manifest:
        """The manifest with every shard recorded so far (what a reader sees now)."""
        if self._merged is None:
            self._merged = self._base.with_shards(self._pending)
        return self._merged

    @property
    def complete(self) -> set[str]:
        """Names of the shards already complete (skip them on resume)."""
        return set(self._base.complete_shards) | {n for n, r in self._pending.items() if r.complete}

    # ---- writing -------------------------------------------------------------------------------
    def shard_writer(self) -> ShardWriter:
        """A picklable writer of shards for other processes (commits only while this writer holds the lock)."""
        uri = str(Path(self.root).resolve()) if is_local(self.fs) else self.uri  # workers may run elsewhere
        return ShardWriter(uri, self._base.format, self._base.encoding, self._lock.token)

    def write_shard(self, name: str, columns: dict[str, np.ndarray], keys: list[str], errors: list[dict[str, str]],
                    *, source: str, source_sha256: str | None = None) -> ShardRecord:
        """Write and commit one shard from this process (see :meth:`ShardWriter.write_shard`)."""
        return self.shard_writer().write_shard(name, columns, keys, errors, source=source,
                                               source_sha256=source_sha256)

    def record(self, name: str, record: ShardRecord, keys: list[str], *, source_bytes: int | None = None) -> None:
        """Record a committed shard (its commit record, written atomically): from now on readers see it.

        Costs the same whatever the store's size; every :data:`~e2kd.storage._commits.COMPACT_MIN` or more
        records (a quarter of the manifest's shards) are folded into the manifest.

        Raises:
            StoreLockedError: this writer lost the store's lock (its lease expired and another run took over).
            ValueError: a key is already held by another shard (keys are unique across a store; the shard
                stays unrecorded).
            ManifestError: its map shape differs from the other shards'.
        """
        self._lock.check_held()
        clash = self._keys.first_clash(keys, name, self._shard_keys)
        if clash is not None:
            raise ValueError(f"key {clash[0]!r} is also in input shard {clash[1]}: keys must be unique "
                             f"across the dataset (the shard is not recorded)")
        if source_bytes is not None:
            record = replace(record, source_bytes=source_bytes)
        extra = dict(self._extra_shapes)
        shape = check_map_shapes(name, record, self._shape, extra)
        write_commit(self.fs, self.root, name, record, reuse=self._spares.pop() if self._spares else None)
        self._shape, self._extra_shapes = shape, extra
        self._pending[name] = record
        self._merged = None
        self._keys.add(keys, name)
        if should_compact(len(self._pending), len(self._base.shards)):
            self.compact()

    def compact(self) -> None:
        """Fold the commit records into the manifest (one atomic replace), then delete them."""
        if not self._pending:
            return
        self._lock.check_held()
        merged = self.manifest
        self._spares += compact(self.fs, self.root, merged, list(self._pending), recycle=self._spare_dir)
        self._base, self._pending = merged, {}

    @property
    def _spare_dir(self) -> str:
        return f"{self.root}/{STAGING_DIR}/spare-records"

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Fold the remaining commit records into the manifest and release the lock (the store stays as recorded);
        an empty staging directory is removed."""
        try:
            self.compact()
        except (StoreLockedError, ManifestError, OSError) as exc:  # the records stay: readers and the next writer
            warnings.warn(f"{self.uri}: commit records not folded into the manifest ({exc}); readers see them "
                          f"all the same, the next writer folds them", UserWarning, stacklevel=2)
        staging = f"{self.root}/{STAGING_DIR}"
        if is_local(self.fs):
            shutil.rmtree(self._spare_dir, ignore_errors=True)
        if is_local(self.fs) and os.path.isdir(staging):
            with contextlib.suppress(OSError):  # not empty: a worker still writing (its run was killed)
                os.rmdir(staging)
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_store(uri: str, manifest: Manifest, *, overwrite: bool = False, create_bucket: bool = False) -> CacheWriter:
    """Open a store at ``uri`` (local path or fsspec URL) for writing shards described by ``manifest``.

    A new store starts with ``manifest``; an existing one is resumed if it was written with the same identity
    (teacher, explainer, preprocessing, views, encoding, precision, format), else refused. ``overwrite``
    deletes an existing store first — only what it wrote (see ``storage.ownership``). A non-empty directory that
    is not an e2kd store, or a file, is refused either way; so is a missing bucket unless ``create_bucket``.

    Raises:
        NotAStoreError: ``uri`` is a file or a non-empty directory that is not an e2kd store.
        StoreLockedError: another writer holds the store.
        ManifestError: the existing store was written with different settings.
    """
    return CacheWriter(uri, manifest, overwrite=overwrite, create_bucket=create_bucket)
