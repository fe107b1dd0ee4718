"""What a store may touch: only what it can prove it wrote.

A store directory (or object-store prefix) is *proven* an e2kd store by its manifest (``manifest.json`` of the
e2kd schema, which a writer creates right after taking the lock), by the store marker ``.e2kd-store`` that a copy
creates right after taking the lock (its manifest comes last), or by holding nothing but e2kd's own lock and
staging (a run killed in its first instant). Every command that writes
refuses any other non-empty directory, with or without ``--overwrite``: the user empties it themselves.

Inside a store, a shard directory is the store's when the manifest records it or it carries the shard marker
(``{"e2kd": "teacher-cache shard"}`` in its format's own metadata — the Zarr group's attributes, the WebDataset
shard's ``members.json`` — written into every shard since e2kd 0.3, so covered by its checksum). Cleaning up —
leftovers of killed runs, ``--overwrite``, a copy's stale shards — removes only those; anything else is left where
it is and named.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import fsspec

from e2kd.storage._files import (
    LOCK,
    MANIFEST,
    SHARDS_DIR,
    STAGING_DIR,
    is_local,
    remove_tree,
    resolve,
    write_bytes_atomic,
)

__all__ = ["NotAStoreError", "BUCKET_PROTOCOLS", "check_bucket", "check_writable", "SHARD_MARKER",
           "SHARD_MARKER_KEY", "STORE_MARKER", "check_store_target", "is_store", "mark_store", "is_marked_shard",
           "remove_owned_shards", "recorded_shards", "read_marker"]

#: The shard marker: ``SHARD_MARKER_KEY: SHARD_MARKER`` in a shard format's metadata (see ``ShardFormat.is_marked``).
SHARD_MARKER_KEY, SHARD_MARKER = "e2kd", "teacher-cache shard"
STORE_MARKER = ".e2kd-store"
_STORE_MARKER_BYTES = b'{"e2kd": "teacher-cache store"}\n'
_OWN_LEFTOVERS = {LOCK, STAGING_DIR, STORE_MARKER}


class NotAStoreError(ValueError):
    """A write target that is not empty and not an e2kd store (or a file): never written into, never cleaned."""


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _entries(fs: fsspec.AbstractFileSystem, root: str) -> list[str] | None:
    """Names directly under ``root``; None where ``root`` does not exist (or is an empty prefix)."""
    if not is_local(fs):
        fs.invalidate_cache(root)
    try:
        return [_name(p) for p in fs.ls(root, detail=False) if _name(p) and p.rstrip("/") != root.rstrip("/")]
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return [_name(root)]


def _is_e2kd_manifest(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    from e2kd.storage._manifest import SCHEMA

    try:
        document = json.loads(fs.cat_file(path))
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return False
    return isinstance(document, dict) and document.get("schema") == SCHEMA


def is_store(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether ``root`` is provably an e2kd store (manifest, store marker, or only e2kd's own lock/staging)."""
    entries = _entries(fs, root)
    if not entries:
        return False
    if STORE_MARKER in entries:
        return True
    if MANIFEST in entries:
        return _is_e2kd_manifest(fs, f"{root}/{MANIFEST}")
    return all(e in _OWN_LEFTOVERS or e.startswith((f"{MANIFEST}.tmp-", f"{LOCK}.tmp-")) for e in entries)


def check_store_target(uri: str, *, what: str = "--out") -> None:
    """Refuse a write target that is a file, or a non-empty directory that is not an e2kd store (checks only;
    creates nothing).

    Raises:
        NotAStoreError: one line naming the target and what is there.
    """
    fs, root = resolve(uri)
    if not is_local(fs):
        fs.invalidate_cache(root)
    if fs.isfile(root):
        raise NotAStoreError(f"{what} {uri} is a file, not a store directory")
    entries = _entries(fs, root)
    if not entries or is_store(fs, root):
        return
    shown = ", ".join(sorted(entries)[:3]) + (", …" if len(entries) > 3 else "")
    raise NotAStoreError(f"{what} {uri} is not empty and is not an e2kd store (it holds {shown}): e2kd writes only "
                         f"into an empty directory or its own store and never deletes what it did not write — "
                         f"empty it yourself or choose another {what}")


#: fsspec protocols whose first path component is a bucket (or container) that a write could create.
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")


def check_bucket(uri: str, *, create: bool = False, what: str = "--out") -> None:
    """Refuse a missing bucket (a typo would otherwise create a new one) unless ``create``.

    Raises:
        NotAStoreError: the bucket does not exist (named, with ``--create-bucket``).
    """
    protocol, _ = fsspec.core.split_protocol(str(uri).split("::")[-1])
    if protocol not in BUCKET_PROTOCOLS or create:
        return
    fs, root = resolve(uri)
    bucket = root.split("/", 1)[0]
    fs.invalidate_cache(bucket)
    if not fs.exists(bucket):
        raise NotAStoreError(f"{what} {uri}: bucket {bucket!r} does not exist (a typo?); --create-bucket creates it")


def check_writable(uri: str, *, create_bucket: bool = False, what: str = "--out") -> None:
    """Every check before a store is written at ``uri`` (nothing is created): bucket, then target."""
    check_bucket(uri, create=create_bucket, what=what)
    check_store_target(uri, what=what)


def mark_store(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Write the store marker (idempotent): from now on ``root`` is provably an e2kd store."""
    entries = _entries(fs, root) or []
    if STORE_MARKER not in entries:
        write_bytes_atomic(fs, f"{root}/{STORE_MARKER}", _STORE_MARKER_BYTES)


def is_marked_shard(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the shard directory ``path`` carries e2kd's shard marker (in any registered format's metadata)."""
    from e2kd.storage._formats import get_format, list_formats

    return any(get_format(name).is_marked(fs, path) for name in list_formats())


def read_marker(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the JSON object at ``path`` holds the shard marker (at the top level or under ``attributes``)."""
    try:
        document = json.loads(fs.cat_file(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return False
    if not isinstance(document, dict):
        return False
    attributes = document.get("attributes")
    return document.get(SHARD_MARKER_KEY) == SHARD_MARKER or \
        (isinstance(attributes, dict) and attributes.get(SHARD_MARKER_KEY) == SHARD_MARKER)


def remove_owned_shards(fs: fsspec.AbstractFileSystem, root: str, keep: set[str],
                        owned: frozenset[str] | set[str] = frozenset(),
                        *, warn: bool = True) -> list[str]:
    """Remove the entries of ``root/shards`` not in ``keep`` that are the store's (named in ``owned`` — e.g.
    recorded by the manifest being replaced — or carrying the shard marker). Returns the entries left alone
    (not the store's), with a warning naming them."""
    shards = f"{root}/{SHARDS_DIR}"
    names = _entries(fs, shards) or []
    foreign = []
    for name in sorted(names):
        if name in keep:
            continue
        path = f"{shards}/{name}"
        if name in owned or is_marked_shard(fs, path):
            remove_tree(fs, path)
        else:
            foreign.append(name)
    if is_local(fs) and os.path.isdir(shards) and not os.listdir(shards):
        os.rmdir(shards)  # made by the store, now empty
    if foreign and warn:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        warnings.warn(f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} of {shards} not written by e2kd "
                      f"left in place ({shown}); readers ignore them", UserWarning, stacklevel=2)
    return foreign


def recorded_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Shard names the store's current manifest and commit records record (empty where it has no readable
    manifest)."""
    from e2kd.storage._commits import pending_commits

    try:
        document: Any = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except (FileNotFoundError, ValueError):
        return set()
    shards = document.get("shards") if isinstance(document, dict) else None
    try:
        pending = set(pending_commits(fs, root))
    except ValueError:  # a foreign entry in commits/: only what the manifest names
        pending = set()
    return ({str(n) for n in shards} if isinstance(shards, dict) else set()) | pending
