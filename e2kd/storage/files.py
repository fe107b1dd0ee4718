"""File-level primitives of a store: fsspec paths, shard checksums, atomic JSON writes, the writer lock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from e2kd.storage.names import check_shard_name

__all__ = ["resolve", "is_local", "checksum_files", "checksum_blobs", "read_blobs", "checksum_local_dir",
           "write_json_atomic", "read_json", "StoreLock", "StoreLockedError", "check_lock_token", "remove_tree",
           "commit_dir", "SHARDS_DIR", "STAGING_DIR", "MANIFEST", "LOCK"]

SHARDS_DIR = "shards"
STAGING_DIR = ".staging"
MANIFEST = "manifest.json"
LOCK = ".lock"


def resolve(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, root path)`` for a local path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def checksum_files(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, int]:
    """sha256 over every file under ``root`` (relative path, size and content, in sorted order), and total bytes.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    return checksum_blobs(read_blobs(fs, root))


def read_blobs(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, bytes]:
    """Every file under ``root`` as ``relative path → bytes`` (one read each).

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    if not fs.exists(root):
        raise FileNotFoundError(root)
    files = sorted(p for p in fs.find(root) if not fs.isdir(p))
    return {path[len(root):].lstrip("/"): fs.cat_file(path) for path in files}


def checksum_blobs(blobs: dict[str, bytes]) -> tuple[str, int]:
    """The shard checksum of ``relative path → bytes``: sha256 over (path, size, sha256 of content), sorted by path."""
    digest, total = hashlib.sha256(), 0
    for rel in sorted(blobs):
        data = blobs[rel]
        digest.update(f"{rel}\x00{len(data)}\x00".encode())
        digest.update(hashlib.sha256(data).digest())
        total += len(data)
    return digest.hexdigest(), total


def checksum_local_dir(path: str | Path) -> tuple[str, int]:
    return checksum_files(fsspec.filesystem("file"), str(Path(path).resolve()))


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, data: dict[str, Any]) -> None:
    """Replace a JSON file atomically: temp + rename locally; one ``pipe`` (the commit) on object storage."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    if is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # a full disk or a kill between write and rename: the old file stays intact
            raise
    else:
        fs.pipe_file(path, text)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def commit_dir(staging: Path, fs: fsspec.AbstractFileSystem, root: str, name: str) -> str:
    """Make a fully written local staging directory visible as shard ``name`` of the store at ``root``.

    Renames locally, uploads remotely; returns the final path ``root/shards/name``. Only ever replaces that
    one directory: ``name`` is checked with the readers' rule first.
    """
    final = f"{root}/{SHARDS_DIR}/{check_shard_name(name)}"
    if fs.exists(final):
        fs.rm(final, recursive=True)  # leftover of a killed run: it was never committed in the manifest
    if is_local(fs):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staging, final)
    else:
        fs.put(str(staging), final, recursive=True)
        shutil.rmtree(staging, ignore_errors=True)
    return final


class StoreLockedError(RuntimeError):
    """Another writer holds the store."""


def check_lock_token(fs: fsspec.AbstractFileSystem, root: str, token: str) -> None:
    """Raise :class:`StoreLockedError` unless the store's lock file still holds ``token``.

    A worker of a killed driver can outlive it for a while; once a new run has taken the lock over, that
    worker must not commit into the store.
    """
    try:
        holder = read_json(fs, f"{root}/{LOCK}")
    except (FileNotFoundError, json.JSONDecodeError):
        holder = {}
    if holder.get("token") != token:
        raise StoreLockedError(f"{root}: the store's lock is no longer this run's (held by host "
                               f"{holder.get('host', '?')} pid {holder.get('pid', '?')}); not committing")


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a directory tree, tolerating files that vanish or appear meanwhile (a dying worker's staging)."""
    if is_local(fs):
        for _ in range(3):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                return
            time.sleep(0.1)
        return
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """One writer per store: a lock file with the owner's host and pid; a dead owner's lock is taken over."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.path = fs, f"{root}/{LOCK}"
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                      "token": uuid.uuid4().hex}

    @property
    def token(self) -> str:
        """This holder's unique token: workers compare it with the lock file before they commit."""
        return str(self.owner["token"])

    def acquire(self) -> None:
        if self.fs.exists(self.path):
            self._take_over_or_refuse()
        if is_local(self.fs):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise StoreLockedError(f"{self.path} appeared while starting: another writer is running") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
        else:
            # Object storage has no O_EXCL: this is check-then-put, so two writers starting in the same
            # instant can both pass the check. The lock token read back before every commit
            # (check_lock_token) makes the loser's workers refuse to commit.
            self.fs.pipe_file(self.path, json.dumps(self.owner).encode())

    def _take_over_or_refuse(self) -> None:
        try:
            holder = read_json(self.fs, self.path)
        except (json.JSONDecodeError, FileNotFoundError):
            holder = {}
        same_host = holder.get("host") == socket.gethostname()
        pid = int(holder.get("pid", -1))
        if same_host and pid > 0 and not _pid_alive(pid):
            self.fs.rm(self.path)  # its owner is dead (killed run): take over
            return
        raise StoreLockedError(f"store is locked by host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
                               f"({self.path}); another cache-teacher is writing it. If that job is gone, "
                               f"remove the lock file")

    def release(self) -> None:
        try:
            holder = read_json(self.fs, self.path)
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.fs.rm(self.path)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
