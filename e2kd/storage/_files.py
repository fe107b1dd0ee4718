"""File-level primitives of a store: fsspec paths, shard checksums, atomic JSON writes, the writer lock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from e2kd.storage._names import check_shard_name

try:  # the local lock file's read-judge-write is serialized with flock (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["resolve", "is_local", "checksum_files", "checksum_blobs", "read_blobs", "read_bounded", "allowance",
           "OversizeError", "checksum_local_dir", "write_json_atomic", "write_bytes_atomic", "read_json", "StoreLock",
           "StoreLockedError", "check_lock_token", "remove_tree", "commit_dir", "create_exclusive", "DEFAULT_LEASE_S",
           "SHARDS_DIR", "STAGING_DIR", "MANIFEST", "LOCK"]

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


class OversizeError(ValueError):
    """Files are larger than what the manifest promises: refused before they are read (no unbounded allocation)."""


def allowance(nbytes: int) -> int:
    """How many bytes a shard recorded at ``nbytes`` may hold before it is refused unread: a damaged shard still
    reaches the checksum (which names the damaged array); a hostile one cannot make a reader allocate."""
    return max(2 * nbytes, nbytes + (1 << 20))


def read_blobs(fs: fsspec.AbstractFileSystem, root: str, max_bytes: int | None = None) -> dict[str, bytes]:
    """Every file under ``root`` as ``relative path → bytes`` (one read each).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        OversizeError: the files add up to more than ``max_bytes`` (checked from the listing, before any read).
    """
    if not is_local(fs):
        fs.invalidate_cache(root)  # another process (a Ray actor, a copy) may have written here since we listed
    if not fs.exists(root):
        raise FileNotFoundError(root)
    listing = fs.find(root, detail=True)
    files = sorted(p for p, info in listing.items() if info.get("type") != "directory")
    if max_bytes is not None:
        total = sum(int(listing[p].get("size") or 0) for p in files)
        if total > max_bytes:
            raise OversizeError(f"its files hold {total} bytes, far more than the {max_bytes} allowed by the "
                                f"manifest; not read")
    if is_local(fs) or not files:
        return {path[len(root):].lstrip("/"): fs.cat_file(path) for path in files}
    blobs = fs.cat(files, on_error="raise")  # object storage: one concurrent batch of GETs, not one after another
    return {path[len(root):].lstrip("/"): blobs[path] for path in files}


def read_bounded(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, what: str) -> bytes:
    """One file's bytes, refused unread (:class:`OversizeError`) when it is larger than ``max_bytes``."""
    size = fs.size(path)
    if size is not None and int(size) > max_bytes:
        raise OversizeError(f"{what} holds {size} bytes, more than the {max_bytes} the manifest allows; not read")
    return fs.cat_file(path)


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
    write_bytes_atomic(fs, path, json.dumps(data, indent=1, sort_keys=True).encode())


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, text: bytes) -> None:
    """Replace a file atomically with ``text``: temp + fsync + rename locally; one ``pipe`` on object storage."""
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


def commit_dir(staging: Path, fs: fsspec.AbstractFileSystem, root: str, name: str, *,
               replace_unmarked: bool = False) -> str:
    """Make a fully written local staging directory visible as shard ``name`` of the store at ``root``.

    Renames locally, uploads remotely; returns the final path ``root/shards/name``. Only ever replaces that
    one directory (``name`` is checked with the readers' rule first), and only if it carries e2kd's shard marker
    — or ``replace_unmarked``, for a copy replacing a shard of the cache it is copying.

    Raises:
        FileExistsError: ``root/shards/name`` exists and is not provably the store's.
    """
    from e2kd.storage._ownership import is_marked_shard

    final = f"{root}/{SHARDS_DIR}/{check_shard_name(name)}"
    if fs.exists(final):
        if not (replace_unmarked or is_marked_shard(fs, final)):
            raise FileExistsError(f"{final} exists and was not written by e2kd (no shard marker): not replacing it; "
                                  f"move it away and re-run")
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


#: Seconds a writer's lock stays valid without renewal (``E2KD_LOCK_LEASE_S``); the owner renews it every third.
DEFAULT_LEASE_S = 60.0


def _lease_seconds() -> float:
    value = os.environ.get("E2KD_LOCK_LEASE_S")
    try:
        lease = float(value) if value else DEFAULT_LEASE_S
    except ValueError:
        raise ValueError(f"E2KD_LOCK_LEASE_S must be a number of seconds, got {value!r}") from None
    if lease <= 0:
        raise ValueError(f"E2KD_LOCK_LEASE_S must be > 0, got {lease}")
    return lease


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` only if it does not exist, atomically: ``O_EXCL`` locally, a conditional put
    (``If-None-Match: *``, fsspec's ``mode="create"``) on object storage.

    Raises:
        FileExistsError: ``path`` exists (someone else created it first).
        StoreLockedError: the backend cannot create a file exclusively (named, with what to do).
    """
    if is_local(fs):  # a complete temp file hard-linked into place: never visible half-written
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise
    except (TypeError, NotImplementedError) as exc:
        raise StoreLockedError(f"{type(fs).__name__} cannot create a file only if it is absent ({exc}): its fsspec "
                               f"version has no conditional put, so one writer per store cannot be enforced there. "
                               f"Upgrade the backend's fsspec package, or write the cache locally and "
                               f"`e2kd copy` it") from None
    except OSError as exc:
        if _precondition_failed(exc):
            raise FileExistsError(path) from None
        if _not_implemented(exc):
            raise StoreLockedError(f"the object store refused a conditional put ({exc}): it offers no atomic "
                                   f"create (If-None-Match), so one writer per store cannot be enforced there") \
                from None
        raise


class _LockFile:
    """The lock file with compare-and-swap: read it with its version; replace or delete it only if it is still
    that version, so a writer never overwrites or removes a lock that another writer has meanwhile taken.

    Object storage (s3): the version is the object's ETag, and the replace / delete are conditional requests
    (``If-Match``); a read is made under the same ``If-Match``. Local disk: every read-judge-write is serialized
    among processes by ``flock`` on the store directory (a new holder's ``.lock`` is a new file, so a lock on the
    file itself would not do). Other backends: read-then-replace, as before (no conditional write to use).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root, self.path = fs, root, f"{root}/{LOCK}"
        self.conditional = "s3" in _protocols(fs)

    @contextlib.contextmanager
    def serialized(self) -> Iterator[None]:
        """Hold off other local processes' read-judge-write of the lock file (no-op off local disk)."""
        if not is_local(self.fs) or fcntl is None:
            yield
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # a file system without flock (some NFS): read-then-replace, as before
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> tuple[dict[str, Any], str | None]:
        """``(holder, version)``: the lock's JSON (``{}`` if absent or unreadable) and its ETag where the backend
        has one (``None`` if absent, or on a backend without versions)."""
        for _ in range(5):
            try:
                if not self.conditional:
                    return _as_holder(self.fs.cat_file(self.path)), None
                self.fs.invalidate_cache(self.path)
                with self.fs.open(self.path, "rb") as f:  # s3fs reads under If-Match: the ETag seen by its head
                    return _as_holder(f.read()), str(f.details["ETag"])
            except FileNotFoundError:
                return {}, None
            except OSError as exc:  # replaced between the head and the read (FileExpired, 412): read again
                if not _precondition_failed(exc):
                    raise
        raise StoreLockedError(f"{self.path} changed on every one of 5 reads: another writer is contending")

    def replace(self, data: bytes, version: str | None) -> bool:
        """Write ``data`` over the lock if it is still ``version``; False if it has changed (nothing written)."""
        if not self.conditional:
            write_bytes_atomic(self.fs, self.path, data)
            return True
        if version is None:  # it was absent when read
            return False
        try:
            self.fs.pipe_file(self.path, data, IfMatch=version)
        except OSError as exc:  # (FileNotFoundError included: the lock is gone)
            if isinstance(exc, FileNotFoundError) or _precondition_failed(exc):
                return False
            if not _not_implemented(exc):
                raise
            self.fs.pipe_file(self.path, data)  # a server without conditional PUT: read-then-replace, as before
        return True

    def remove(self, version: str | None) -> bool:
        """Delete the lock if it is still ``version``; False if it has changed or is gone."""
        try:
            if not self.conditional:
                self.fs.rm(self.path)
                return True
            if version is None:  # it was absent when read
                return False
            bucket, key, _ = self.fs.split_path(self.path)
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            self.fs.invalidate_cache(self.path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            if not _not_implemented(exc):
                raise
        with contextlib.suppress(FileNotFoundError):  # a server without conditional DELETE: as before
            self.fs.rm(self.path)
        return True


def _not_implemented(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "not implemented" in text or "notimplemented" in text or "501" in text


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _as_holder(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


#: How an object store says a conditional request found another version (s3fs words it variously).
_CHANGED_MEANWHILE = ("precondition", "pre-condition", "412", "fileexpired", "conditionalrequestconflict", "409")


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in _CHANGED_MEANWHILE)


class StoreLock:
    """One writer per store: a lock file created atomically, holding owner host, pid, token and a lease.

    The owner renews the lease from a background thread (every third of ``lease_s``). A lock whose lease
    expired — its owner died or lost its network, on any host — is taken over; so is one on this host whose
    pid is gone (a killed run, at once). A live lock refuses a second writer. Every renewal, take-over and release
    is a compare-and-swap on the lock file (:class:`_LockFile`), so no writer overwrites or removes a lock another
    has taken. Workers compare the token with the lock file before every commit (:func:`check_lock_token`), so a
    writer that lost its lock never commits.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, lease_s: float | None = None) -> None:
        self.fs, self.path = fs, f"{root}/{LOCK}"
        self._file = _LockFile(fs, root)
        self.lease_s = float(lease_s) if lease_s is not None else _lease_seconds()
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                      "token": uuid.uuid4().hex, "lease_s": self.lease_s}
        self.lost: str | None = None  # why the lock is no longer ours (taken over after our lease expired)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def token(self) -> str:
        """This holder's unique token: workers compare it with the lock file before they commit."""
        return str(self.owner["token"])

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.lease_s}).encode()

    def acquire(self) -> None:
        """Create the lock, or take over an expired / dead owner's lock; refuse a live one.

        Raises:
            StoreLockedError: another writer holds the store (named: host, pid, lease left).
        """
        try:
            create_exclusive(self.fs, self.path, self._record())
        except FileExistsError:
            self._take_over_or_refuse()
            try:
                create_exclusive(self.fs, self.path, self._record())
            except FileExistsError:
                raise StoreLockedError(f"{self.path}: another writer took the lock at the same moment") from None
        self._renewer = threading.Thread(target=self._renew_loop, name="e2kd-lock-lease", daemon=True)
        self._renewer.start()

    def _holder(self) -> dict[str, Any]:
        return self._file.read()[0]

    def _take_over_or_refuse(self) -> None:
        for _ in range(3):  # a lock renewed or taken between our read and our delete is judged again
            with self._file.serialized():
                holder, version = self._file.read()
                now = time.time()
                pid = holder["pid"] if isinstance(holder.get("pid"), int) else -1
                expires = holder.get("expires")
                dead_here = holder.get("host") == socket.gethostname() and pid > 0 and not _pid_alive(pid)
                expired = isinstance(expires, (int, float)) and expires < now
                if not (dead_here or expired or not holder):
                    break
                removed = self._file.remove(version)  # only the lock judged is deleted
                if removed or version is None:  # (no version: absent, or a backend without them)
                    return
        else:
            return  # changed under us three times: the exclusive create decides
        left = f"its lease expires in {expires - now:.0f} s" if isinstance(expires, (int, float)) else \
            "it has no lease (written by e2kd 0.1)"
        raise StoreLockedError(f"store is locked by host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
                               f"({self.path}; {left}): another cache-teacher is writing it. A dead writer's lock "
                               f"is taken over once its lease expires; remove the lock file only if you are sure")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease has two more chances
                continue
            if self.lost:
                return

    def renew(self) -> None:
        """Extend the lease, if the lock is still ours (else record in :attr:`lost` who holds it)."""
        with self._file.serialized():
            holder, version = self._file.read()
            if holder.get("token") == self.token and self._file.replace(self._record(), version):
                return
            if holder.get("token") == self.token:  # replaced between our read and our write: read who has it
                holder = self._file.read()[0]
        self.lost = f"held by host {holder.get('host', '?')} pid {holder.get('pid', '?')}" if holder else "removed"

    def check_held(self) -> None:
        """Raise :class:`StoreLockedError` if the lock is no longer this writer's."""
        if self.lost is None and self._holder().get("token") != self.token:
            self.renew()
        if self.lost:
            raise StoreLockedError(f"{self.path}: this run lost the store's lock ({self.lost}); not recording")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        with self._file.serialized():
            holder, version = self._file.read()
            if holder.get("token") == self.token:
                self._file.remove(version)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
