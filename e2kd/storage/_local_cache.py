"""A bounded local copy of remote shards, kept across epochs (``train-student --local-cache DIR --local-cache-gb N``).

A student reading ``s3://`` caches and inputs would otherwise download every shard again every epoch. The local
cache holds *copies* of remote objects only — a local path is always read in place, so eviction can never delete
the only copy of anything — as one entry per shard::

    DIR/.e2kd-local-cache        marker: e2kd made this directory (a directory without it is refused if not empty)
    DIR/lock                     flock(2) taken while entries are added or evicted (ranks and workers share DIR)
    DIR/entries/<id>/…           one entry: a cache shard's files, or an input shard's ``data``
    DIR/entries/<id>/.sha256     its checksum (an input shard: sha256 of ``data``, taken when it was fetched)
    DIR/tmp/…                    entries being fetched (renamed into ``entries/`` when whole)

An entry's id names its content: a cache shard's sha256 from the manifest, an input shard's URL with the size and
version (ETag or modification time) the object store reports. Every use verifies the local copy against that
checksum; a copy that fails is deleted and fetched again. Entries are evicted least recently used first (a use
touches the entry's modification time) until the total is within the budget; an entry larger than the whole
budget is not kept (read from the remote each time). Deleting an entry another process is reading is safe: POSIX
keeps an open file until it is closed, and cache-shard entries are read whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalCache", "LocalCacheError", "MARKER"]

MARKER = ".e2kd-local-cache"
CHECKSUM = ".sha256"
DATA = "data"


class LocalCacheError(RuntimeError):
    """The local cache directory cannot be used (not e2kd's, not writable)."""


@dataclass(frozen=True)
class LocalCache:
    """A local directory bounded to ``max_bytes`` of remote shard copies (picklable: DataLoader workers and ranks
    open the same directory)."""

    root: str
    max_bytes: int

    @classmethod
    def create(cls, root: str | os.PathLike, gigabytes: float) -> LocalCache:
        """Make (or reopen) the cache directory ``root`` bounded to ``gigabytes`` GB (10⁹ bytes).

        Raises:
            LocalCacheError: ``root`` is not empty and e2kd did not make it, or is not a writable directory.
        """
        if gigabytes <= 0:
            raise LocalCacheError(f"--local-cache-gb must be > 0, got {gigabytes:g}")
        path = Path(root)
        if path.exists() and not path.is_dir():
            raise LocalCacheError(f"--local-cache {root} is not a directory")
        if path.is_dir() and any(path.iterdir()) and not (path / MARKER).exists():
            raise LocalCacheError(f"--local-cache {root} is not empty and is not an e2kd local cache: e2kd never "
                                  f"evicts from a directory it did not create — choose an empty or new directory")
        try:
            for sub in ("entries", "tmp"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            (path / MARKER).touch()
        except OSError as exc:
            raise LocalCacheError(f"--local-cache {root}: {exc}") from None
        return cls(str(path.resolve()), int(gigabytes * 1e9))

    # ---- what callers use ----------------------------------------------------------------------
    def blobs(self, checksum: str, fetch: Callable[[], dict[str, bytes]],
              verify: Callable[[dict[str, bytes]], bool]) -> tuple[dict[str, bytes], bool]:
        """A cache shard's files (``relative path → bytes``) whose checksum is ``checksum``, and whether they passed
        ``verify``: the local copy if it passes, else ``fetch()`` (kept for next time if it passes and fits)."""
        entry = self._entry(f"shard-{checksum}")
        if entry.is_dir():
            blobs = _read_dir(entry)
            if blobs is not None and verify(blobs):
                self._touch(entry)
                return blobs, True
            self._drop(entry, "its files do not match the manifest's checksum")
        blobs = fetch()
        ok = verify(blobs)
        if ok:
            self._keep(entry.name, blobs)
        return blobs, ok

    def file(self, identity: str, fetch: Callable[[Path], None]) -> Path | None:
        """The local path of a remote file named by ``identity`` (its URL, size and version): the local copy if its
        sha256 still matches, else ``fetch(path)`` writes a new copy. None when the file does not fit the budget."""
        entry = self._entry("file-" + hashlib.sha256(identity.encode()).hexdigest()[:40])
        if entry.is_dir():
            if _file_ok(entry):
                self._touch(entry)
                return entry / DATA
            self._drop(entry, "its sha256 changed since it was fetched")
        tmp = self._tmp()
        try:
            fetch(tmp / DATA)
            size = (tmp / DATA).stat().st_size
            if size > self.max_bytes:
                return None
            (tmp / CHECKSUM).write_text(_sha256_file(tmp / DATA))
            return self._commit(tmp, entry.name, size) / DATA
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def total_bytes(self) -> int:
        """Bytes held in entries now."""
        return sum(size for _, size, _ in self._entries())

    # ---- internals -----------------------------------------------------------------------------
    def _entry(self, name: str) -> Path:
        return Path(self.root) / "entries" / name

    def _tmp(self) -> Path:
        tmp = Path(self.root) / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        return tmp

    def _keep(self, name: str, blobs: dict[str, bytes]) -> None:
        size = sum(len(b) for b in blobs.values())
        if size > self.max_bytes:
            return
        tmp = self._tmp()
        try:
            for rel, data in blobs.items():
                target = tmp / rel
                if ".." in Path(rel).parts or Path(rel).is_absolute():
                    return  # never write outside the entry (the names come from a remote listing)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self._commit(tmp, name, size)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path, name: str, size: int) -> Path:
        """Move a whole entry into place (under the lock, after evicting enough for ``size`` more bytes)."""
        entry = self._entry(name)
        with self._locked():
            self._evict(self.max_bytes - size, keep=name)
            if entry.exists():  # another process fetched it meanwhile: keep theirs
                return entry
            os.replace(tmp, entry)
        return entry

    def _evict(self, budget: int, keep: str) -> None:
        """Delete least recently used entries until they hold at most ``budget`` bytes (caller holds the lock)."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= budget:
                return
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= size

    def _entries(self) -> Iterator[tuple[Path, int, float]]:
        """``(path, bytes, last use)`` of each entry."""
        for path in (Path(self.root) / "entries").iterdir():
            try:
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != CHECKSUM)
                yield path, size, path.stat().st_mtime
            except FileNotFoundError:  # evicted by another process meanwhile
                continue

    def _drop(self, entry: Path, why: str) -> None:
        warnings.warn(f"local cache: {entry.name} dropped and fetched again: {why}", UserWarning, stacklevel=3)
        with self._locked():
            shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _touch(entry: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(Path(self.root) / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _read_dir(entry: Path) -> dict[str, bytes] | None:
    """Every file of an entry as ``relative path → bytes`` (None if it vanished: evicted meanwhile)."""
    try:
        return {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}
    except FileNotFoundError:
        return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_ok(entry: Path) -> bool:
    try:
        return _sha256_file(entry / DATA) == (entry / CHECKSUM).read_text().strip()
    except FileNotFoundError:
        return False
