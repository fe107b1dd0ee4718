"""``copy_store(src, dst)``: hand a cache to another place (local ↔ object storage, bucket ↔ bucket).

Shard by shard: each shard is read once, checked against the source manifest's checksum, written, read back at the
destination and checked again; the manifest is copied last, byte for byte, so a reader never sees a half-copied
store and the copy has the source's cache id. Re-running resumes: shards already at the destination with the
recorded checksum are skipped. The destination is locked like a store being written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec

from e2kd.storage._commits import COMMITS_DIR, pending_commits, read_view
from e2kd.storage._files import (
    MANIFEST,
    SHARDS_DIR,
    STAGING_DIR,
    OversizeError,
    StoreLock,
    allowance,
    checksum_blobs,
    commit_dir,
    is_local,
    read_blobs,
    remove_tree,
    resolve,
    write_bytes_atomic,
)
from e2kd.storage._manifest import ManifestError, cache_id_of
from e2kd.storage._ownership import check_writable, mark_store, recorded_shards, remove_owned_shards

__all__ = ["copy_store", "CopyReport"]


@dataclass
class CopyReport:
    """What :func:`copy_store` did."""

    cache_id: str
    copied: list[str]
    skipped: list[str]  # already at the destination, verified
    nbytes: int  # bytes copied now


def copy_store(src: str, dst: str, *, overwrite: bool = False, create_bucket: bool = False,
               on_shard: Callable[[str, int], None] | None = None) -> CopyReport:
    """Copy the complete shards and then the manifest of the store at ``src`` to ``dst``.

    ``on_shard(name, nbytes)`` is called after each shard (progress).

    Raises:
        FileNotFoundError: ``src`` is not a store.
        ManifestError: ``dst`` holds a different store (``overwrite`` replaces it), or a shard's checksum is
            wrong at the source or after the copy (named; nothing is recorded at ``dst``).
        StoreLockedError: another writer holds ``dst``.
        NotAStoreError: ``dst`` is a file or a non-empty directory that is not an e2kd store, or its bucket is
            missing (``create_bucket`` creates it).
    """
    sfs, sroot = resolve(src)
    dfs, droot = resolve(dst)
    if (type(sfs), sroot) == (type(dfs), droot):
        raise ValueError(f"copy: source and destination are the same store ({src})")
    try:
        view, stored = read_view(sfs, sroot)  # a store still being written: the shards committed now
    except FileNotFoundError:
        raise FileNotFoundError(f"{src} is not an e2kd cache: {MANIFEST} not found") from None
    raw, manifest = view.manifest_bytes(stored), view.manifest  # the copy holds the view compacted: same cache id
    check_writable(dst, create_bucket=create_bucket, what="copy destination")  # never into what is not a store
    dfs.makedirs(droot, exist_ok=True)
    with StoreLock(dfs, droot):
        mark_store(dfs, droot)
        _check_destination(dfs, droot, raw, dst, overwrite)
        report = CopyReport(view.cache_id, [], [], 0)
        for name in manifest.complete_shards:
            sha = manifest.shards[name].sha256
            if _shard_matches(dfs, f"{droot}/{SHARDS_DIR}/{name}", sha):
                report.skipped.append(name)
            else:
                report.nbytes += _copy_shard(sfs, f"{sroot}/{SHARDS_DIR}/{name}", dfs, droot, name, sha, src, dst,
                                             manifest.shards[name].nbytes)
                report.copied.append(name)
            if on_shard is not None:
                on_shard(name, manifest.shards[name].nbytes)
        remove_owned_shards(dfs, droot, keep=set(manifest.complete_shards))  # stale e2kd shards only
        write_bytes_atomic(dfs, f"{droot}/{MANIFEST}", raw)  # last: from now on readers see the copy
    return report


def _check_destination(fs: fsspec.AbstractFileSystem, root: str, raw: bytes, dst: str, overwrite: bool) -> None:
    """An empty destination, a half-done copy of this store, or this very store; another store only with
    ``overwrite`` (then removed)."""
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path) or (fs.cat_file(path) == raw and not pending_commits(fs, root)):
        return
    if not overwrite:
        try:
            other = cache_id_of(json.loads(fs.cat_file(path)))
        except ValueError:
            other = "unreadable"
        raise ManifestError(f"copy: {dst} already holds another cache (id {other}); --overwrite replaces it")
    remove_owned_shards(fs, root, keep=set(), owned=recorded_shards(fs, root))  # only the other cache's shards
    for leftover in (path, f"{root}/{STAGING_DIR}", f"{root}/{COMMITS_DIR}"):
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)


def _shard_matches(fs: fsspec.AbstractFileSystem, path: str, sha: str) -> bool:
    try:
        return checksum_blobs(read_blobs(fs, path))[0] == sha
    except FileNotFoundError:
        return False


def _copy_shard(sfs: fsspec.AbstractFileSystem, spath: str, dfs: fsspec.AbstractFileSystem, droot: str, name: str,
                sha: str, src: str, dst: str,
                nbytes: int = 0) -> int:
    """Read, check, write, read back, check. Returns the bytes written."""
    try:
        blobs = read_blobs(sfs, spath, allowance(nbytes) if nbytes else None)
    except OversizeError as exc:
        raise ManifestError(f"copy: source {src}: shard {name}: {exc}") from None
    if checksum_blobs(blobs)[0] != sha:
        raise ManifestError(f"copy: source {src}: shard {name}: checksum mismatch; run e2kd verify {src}")
    final = f"{droot}/{SHARDS_DIR}/{name}"
    if is_local(dfs):
        staging = Path(droot) / STAGING_DIR / uuid.uuid4().hex
        try:
            for rel, data in blobs.items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            commit_dir(staging, dfs, droot, name, replace_unmarked=True)  # a shard of the cache being copied
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.isdir(staging.parent) and not any(staging.parent.iterdir()):
                os.rmdir(staging.parent)
    else:
        if dfs.exists(final):
            remove_tree(dfs, final)
        dfs.pipe({f"{final}/{rel}": data for rel, data in blobs.items()})
        dfs.invalidate_cache(final)
    if not _shard_matches(dfs, final, sha):
        raise ManifestError(f"copy: destination {dst}: shard {name} does not match its checksum after the copy")
    return sum(len(b) for b in blobs.values())
