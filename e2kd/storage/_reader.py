"""Reading a cache: ``open_store(uri)`` → :class:`CacheStore` (manifest, key index, ``read``, ``iter_shard``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from e2kd.storage._commits import read_view
from e2kd.storage._files import (
    MANIFEST,
    SHARDS_DIR,
    OversizeError,
    allowance,
    checksum_blobs,
    is_local,
    read_blobs,
    read_bounded,
    resolve,
)
from e2kd.storage._formats import get_format
from e2kd.storage._keyindex import KeyIndex
from e2kd.storage._local_cache import LocalCache
from e2kd.storage._manifest import Manifest, ManifestError, cache_id_of
from e2kd.storage._shards import ERRORS_NAME, KEYS_NAME

if TYPE_CHECKING:
    from torch import Tensor


class CachedRecord(TypedDict):
    """One sample's cached teacher outputs (tensors: the store hands them to torch code; the student's loader
    joins several teachers' records into one with stacked logits and a list of maps)."""

    logits: Tensor  #: ``[V, C]``
    target: Tensor  #: ``[V]``: the explained class of each view (the teacher's top-1)
    maps: Tensor  #: ``[V, C_e, h, w]`` of the chosen explanation field
    views: Tensor  #: ``[V, 5]``: each view's box and flip
    label: int  #: −1 where the sample has none

__all__ = ["open_store", "CacheStore", "StoreIntegrityError"]


class StoreIntegrityError(ManifestError):
    """A shard's files are not what the manifest recorded (changed, truncated, added, removed or miscounted)."""


def open_store(uri: str, *, shards: Iterable[str] | None = None, local_cache: LocalCache | None = None) -> CacheStore:
    """Open a teacher cache (local path or fsspec URL) for reading: the shards committed at this moment.

    ``shards`` pins the view to those shards (another process reading what one reader planned, while a writer
    may still be committing more); each must be in the store. ``local_cache`` keeps the shards of a remote store
    on local disk across reads (each verified against the manifest's sha256 on every use).

    Example:
        >>> store = open_store("cache/")                      # doctest: +SKIP
        >>> store.read(next(iter(store.keys())))["maps"].shape  # doctest: +SKIP
    """
    return CacheStore(uri, shards=shards, local_cache=local_cache)


#: Bytes a shard's key file may spend per sample (JSON-escaped keys, on average) and its error file per record,
#: before either is refused unread: what the manifest promises bounds what a reader allocates.
KEY_BYTES, ERROR_BYTES = 4096, 16384


def keys_allowance(num_samples: int) -> int:
    return 1024 + KEY_BYTES * num_samples


def errors_allowance(num_records: int) -> int:
    return 1024 + ERROR_BYTES * num_records


def _parse_errors(raw: bytes | None, where: str) -> list[dict[str, str]]:
    if raw is None:
        raise StoreIntegrityError(f"{where}: {ERRORS_NAME} missing")
    try:
        errors = json.loads(raw)
    except ValueError as exc:
        raise StoreIntegrityError(f"{where}: {ERRORS_NAME} is not JSON ({exc})") from None
    if not isinstance(errors, list) or not all(isinstance(e, dict) and isinstance(e.get("key"), str) and
                                               all(isinstance(v, str) for v in e.values()) for e in errors):
        raise StoreIntegrityError(f"{where}: {ERRORS_NAME} is not a list of {{key, shard, reason}} records")
    return errors


class _Names(list):
    """A sorted list of shard names whose membership test is a set lookup (planning asks once per input shard)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self._set = frozenset(names)

    def __contains__(self, name: object) -> bool:
        return name in self._set


def _pinned(manifest: Manifest, shards: set[str], uri: str) -> Manifest:
    missing = sorted(shards - set(manifest.complete_shards))
    if missing:
        raise ManifestError(f"store {uri} no longer holds shards {missing[:3]} it held when this run planned: it was "
                            f"overwritten meanwhile")
    return replace(manifest, shards={}, map_shape=None, extra_map_shapes=None).with_shards(
        {n: r for n, r in manifest.shards.items() if n in shards})


class CacheStore:
    """Read-only view of a complete-shards-only cache; only shards the manifest marks complete are visible.

    Every record read goes through :meth:`shard_columns`, which reads a shard's files once, checks them
    against the manifest's checksum and counts, and decodes exactly the bytes it checked: data that
    ``verify`` would reject is never returned.
    """

    def __init__(self, uri: str, *, shards: Iterable[str] | None = None,
                 local_cache: LocalCache | None = None) -> None:
        self.uri = str(uri)
        self.fs, self.root = resolve(uri)
        self.local_cache = None if is_local(self.fs) else local_cache  # a local store is read in place
        if not self.fs.exists(f"{self.root}/{MANIFEST}"):
            raise FileNotFoundError(f"{uri} is not an e2kd cache: {MANIFEST} not found")
        view, _ = read_view(self.fs, self.root)  # the manifest and every commit record present now
        self.manifest: Manifest = view.manifest
        self.cache_id = view.cache_id  # sha256 of the canonical manifest: names this exact content
        if shards is not None:
            self.manifest = _pinned(view.manifest, set(shards), uri)
            if set(self.manifest.shards) != set(view.manifest.shards):
                self.cache_id = cache_id_of(self.manifest.to_json())
        self.encoding = self.manifest.encoding
        self._shard_names = _Names(self.manifest.complete_shards)  # the manifest never changes: sorted once
        self._format = get_format(self.manifest.format)
        self._index: dict[str, tuple[str, int]] | None = None
        self._errors: dict[str, list[dict[str, str]]] = {}
        self._load_columns = lru_cache(maxsize=2)(self._read_shard)

    # ---- index ---------------------------------------------------------------------------------
    @property
    def shard_names(self) -> list[str]:
        """The complete shards, sorted (``name in store.shard_names`` is a set lookup)."""
        return self._shard_names

    def shard_path(self, name: str) -> str:
        return f"{self.root}/{SHARDS_DIR}/{name}"

    def shard_keys(self, name: str) -> list[str]:
        """One shard's keys from its key file (size checked against the manifest before it is parsed)."""
        where = f"store {self.uri}: shard {name}"
        try:
            raw = read_bounded(self.fs, f"{self.shard_path(name)}/{KEYS_NAME}",
                               keys_allowance(self.manifest.shards[name].num_samples), KEYS_NAME)
            keys = json.loads(raw)
        except FileNotFoundError:
            raise StoreIntegrityError(f"{where}: {KEYS_NAME} missing") from None
        except OversizeError as exc:
            raise StoreIntegrityError(f"{where}: {exc}") from None
        except ValueError as exc:
            raise StoreIntegrityError(f"store {self.uri}: shard {name}: {KEYS_NAME} is not JSON ({exc})") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise StoreIntegrityError(f"store {self.uri}: shard {name}: {KEYS_NAME} is not a list of keys")
        if len(keys) != self.manifest.shards[name].num_samples:
            raise ManifestError(f"shard {name}: {len(keys)} keys but the manifest says "
                                f"{self.manifest.shards[name].num_samples}; run e2kd verify")
        return keys

    def shard_errors(self, name: str) -> list[dict[str, str]]:
        """The samples one shard skipped: ``[{"key", "shard", "reason"}, …]`` (checked to be exactly that).

        Read once per store object: a complete shard never changes (the plan and every pass of the stream ask)."""
        if name not in self._errors:
            rec = self.manifest.shards[name]
            try:
                raw = read_bounded(self.fs, f"{self.shard_path(name)}/{ERRORS_NAME}",
                                   errors_allowance(rec.num_errors + rec.num_bad_labels), ERRORS_NAME)
            except FileNotFoundError:
                raise StoreIntegrityError(f"store {self.uri}: shard {name}: {ERRORS_NAME} missing") from None
            except OversizeError as exc:
                raise StoreIntegrityError(f"store {self.uri}: shard {name}: {exc}") from None
            self._errors[name] = _parse_errors(raw, f"store {self.uri}: shard {name}")
        return self._errors[name]

    def shard_labels(self, name: str) -> list[int]:
        """The labels cached for one shard, row by row (−1: unlabelled); one verified read of the shard."""
        cols = self._load_columns(name)
        return [int(v) for v in cols["labels"]] if cols else []

    def errors(self) -> list[dict[str, str]]:
        """Every sample the cache skipped, with its key, shard and reason."""
        return [e for name in self.shard_names for e in self.shard_errors(name)]

    @property
    def index(self) -> dict[str, tuple[str, int]]:
        """``key → (shard, row)``, built from one key file per shard."""
        if self._index is None:
            index: dict[str, tuple[str, int]] = {}
            for name in self.shard_names:
                for row, key in enumerate(self.shard_keys(name)):
                    if key in index:
                        raise ManifestError(f"key {key!r} is in shards {index[key][0]} and {name}")
                    index[key] = (name, row)
            self._index = index
        return self._index

    def keys(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __contains__(self, key: object) -> bool:
        return key in self.index

    # ---- records -------------------------------------------------------------------------------
    def shard_columns(self, name: str) -> tuple[list[str], dict[str, np.ndarray]]:
        """``(keys, columns)`` of one complete shard, verified against the manifest (one read of its files).

        Raises:
            StoreIntegrityError: one line naming store, shard and what is wrong.
        """
        blobs = self._verified_blobs(name)
        where = f"store {self.uri}: shard {name}"
        expected = self.manifest.shards[name].num_samples
        if len(blobs.get(KEYS_NAME, b"")) > keys_allowance(expected):
            raise StoreIntegrityError(f"{where}: {KEYS_NAME} holds {len(blobs[KEYS_NAME])} bytes, more than "
                                      f"{expected} keys may take; not parsed")
        try:
            keys = json.loads(blobs[KEYS_NAME])
        except (KeyError, ValueError) as exc:
            raise StoreIntegrityError(f"{where}: unreadable {KEYS_NAME} ({exc})") from None
        if not isinstance(keys, list) or len(keys) != expected or not all(isinstance(k, str) for k in keys):
            count = f"{len(keys)} keys" if isinstance(keys, list) else "no key list"
            raise StoreIntegrityError(f"{where}: the manifest says {expected} samples, {KEYS_NAME} has {count}")
        _parse_errors(blobs.get(ERRORS_NAME), where)
        if not keys:
            return keys, {}
        specs = self.encoding.column_specs(self.manifest.num_views, self.manifest.map_shapes)
        try:
            cols = self._format.read(blobs, self.encoding.column_names(), where, specs, keys)
        except (KeyError, ValueError) as exc:
            raise StoreIntegrityError(f"{where}: unreadable ({exc})") from None
        rows = sorted({int(v.shape[0]) for v in cols.values()})
        if rows != [expected]:
            raise StoreIntegrityError(f"{where}: the manifest says {expected} samples, arrays have {rows} rows")
        problem = self.encoding.check_values(cols)
        if problem:
            raise StoreIntegrityError(f"{where}: {problem}")
        return keys, cols

    @property
    def map_shape(self) -> tuple[int, ...] | None:
        return self.manifest.map_shape

    def _verified_blobs(self, name: str) -> dict[str, bytes]:
        rec = self.manifest.shards.get(name)
        where = f"store {self.uri}: shard {name}"
        if rec is None or not rec.complete:
            raise StoreIntegrityError(f"{where}: not a complete shard of this store")

        def fetch() -> dict[str, bytes]:
            try:
                return read_blobs(self.fs, self.shard_path(name), allowance(rec.nbytes) if rec.nbytes else None)
            except FileNotFoundError:
                raise StoreIntegrityError(f"{where}: missing") from None
            except OversizeError as exc:
                raise StoreIntegrityError(f"{where}: {exc}") from None

        def verify(blobs: dict[str, bytes]) -> bool:
            return checksum_blobs(blobs)[0] == rec.sha256

        if self.local_cache is not None:
            blobs, ok = self.local_cache.blobs(rec.sha256, fetch, verify)
        else:
            blobs = fetch()
            ok = verify(blobs)
        if not ok:
            raise StoreIntegrityError(f"{where}: checksum mismatch: {self._locate_damage(name, blobs)}; "
                                      f"run e2kd verify")
        return blobs

    def _locate_damage(self, name: str, blobs: dict[str, bytes]) -> str:
        """Which array a shard's damage is in, from the per-chunk (zarr) or per-member (wds) checksums."""
        try:
            keys = json.loads(blobs[KEYS_NAME])
            specs = self.encoding.column_specs(self.manifest.num_views, self.manifest.map_shapes)
            self._format.read(blobs, self.encoding.column_names(), f"shard {name}", specs, keys)
        except (KeyError, ValueError, TypeError) as exc:
            return str(exc).removeprefix(f"shard {name}: ").removeprefix(f"shard {name} ")
        return "a file was changed, truncated, added or removed (every array still decodes: keys.json, " \
               "errors.json or a whole chunk swapped)"

    def _read_shard(self, name: str) -> dict[str, np.ndarray]:
        return self.shard_columns(name)[1]

    def _decode(self, cols: dict[str, np.ndarray], row: int, field: str | None = None) -> CachedRecord:
        import torch

        one = {k: v[row] for k, v in cols.items()}
        return {"logits": self.encoding.decode_logits(one), "target": torch.from_numpy(one["target"].astype(np.int64)),
                "maps": self.encoding.decode_maps(one, field),
                "views": torch.from_numpy(one["views"].astype(np.float32)), "label": int(one["labels"])}

    def read(self, key: str, field: str | None = None) -> CachedRecord:
        """``{"logits": [V, C], "target": [V], "maps": [V, C_e, h, w], "views": [V, 5], "label": int}``; ``maps`` of
        explanation field ``field`` (None: the cache's default, its first)."""
        try:
            name, row = self.index[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the cache {self.uri}") from None
        return self._decode(self._load_columns(name), row, field)

    def iter_shard(self, name: str, field: str | None = None) -> Iterator[tuple[str, CachedRecord]]:
        """Sequentially yield ``(key, record)`` for one shard (one verified read of its data)."""
        keys, cols = self.shard_columns(name)
        for row, key in enumerate(keys):
            yield key, self._decode(cols, row, field)

    # ---- integrity -----------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check every shard (checksum, every chunk present, key and row counts against the manifest, targets
        against the cached logits) and that no key is in two shards; one message per problem."""
        problems, owners = [], KeyIndex()  # bounded memory: 12 bytes per key
        for name, rec in sorted(self.manifest.shards.items()):
            if not rec.complete:
                problems.append(f"{name}: incomplete")
                continue
            try:
                keys, _ = self.shard_columns(name)
            except StoreIntegrityError as exc:
                problems.append(f"{name}: {str(exc).split(f'shard {name}: ', 1)[-1].removesuffix('; run e2kd verify')}")
                continue
            clash = owners.first_clash(keys, name, self.shard_keys)
            if clash is not None:
                problems.append(f"{name}: key {clash[0]!r} is also in shard {clash[1]} (keys must be unique)")
            owners.add(keys, name)
        if not problems and self.manifest.complete_shards and self.manifest.num_samples == 0:
            problems.append("(store) it holds no samples: every input sample was skipped (inspect --errors says why)")
        return problems
