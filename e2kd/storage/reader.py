"""Reading a cache: ``open_store(uri)`` → :class:`CacheStore` (manifest, key index, ``read``, ``iter_shard``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from e2kd.storage.encoding import Encoding
from e2kd.storage.files import MANIFEST, SHARDS_DIR, checksum_files, read_json, resolve
from e2kd.storage.manifest import ManifestError, validate_manifest
from e2kd.storage.shards import ERRORS_NAME, KEYS_NAME, shard_format

__all__ = ["open_store", "CacheStore"]


def open_store(uri: str) -> CacheStore:
    """Open a teacher cache (local path or fsspec URL) for reading.

    Example:
        >>> store = open_store("cache/")                      # doctest: +SKIP
        >>> store.read(next(iter(store.keys())))["maps"].shape  # doctest: +SKIP
    """
    return CacheStore(uri)


class CacheStore:
    """Read-only view of a complete-shards-only cache; only shards the manifest marks complete are visible."""

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)
        self.fs, self.root = resolve(uri)
        path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{uri} is not an e2kd cache: {MANIFEST} not found")
        try:
            self.manifest: dict[str, Any] = validate_manifest(read_json(self.fs, path))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from None
        self.encoding = Encoding.from_dict(self.manifest["encoding"])
        self._format = shard_format(self.manifest["format"])
        self._index: dict[str, tuple[str, int]] | None = None
        self._load_columns = lru_cache(maxsize=2)(self._read_shard)

    # ---- index ---------------------------------------------------------------------------------
    @property
    def shard_names(self) -> list[str]:
        return sorted(n for n, r in self.manifest["shards"].items() if r["complete"])

    def shard_path(self, name: str) -> str:
        return f"{self.root}/{SHARDS_DIR}/{name}"

    def shard_keys(self, name: str) -> list[str]:
        keys = read_json(self.fs, f"{self.shard_path(name)}/{KEYS_NAME}")
        if len(keys) != self.manifest["shards"][name]["num_samples"]:
            raise ManifestError(f"shard {name}: {len(keys)} keys but the manifest says "
                                f"{self.manifest['shards'][name]['num_samples']}; run e2kd verify")
        return keys

    def shard_errors(self, name: str) -> list[dict[str, str]]:
        return read_json(self.fs, f"{self.shard_path(name)}/{ERRORS_NAME}")

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
        return sum(self.manifest["shards"][n]["num_samples"] for n in self.shard_names)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    # ---- records -------------------------------------------------------------------------------
    def _read_shard(self, name: str) -> dict[str, np.ndarray]:
        return self._format.read_columns(self.fs, self.shard_path(name), self.encoding.column_names())

    def _decode(self, cols: dict[str, np.ndarray], row: int) -> dict[str, Any]:
        one = {k: v[row] for k, v in cols.items()}
        return {"logits": self.encoding.decode_logits(one), "target": torch.from_numpy(one["target"].astype(np.int64)),
                "maps": self.encoding.decode_maps(one), "views": torch.from_numpy(one["views"].astype(np.float32)),
                "label": int(one["labels"])}

    def read(self, key: str) -> dict[str, Any]:
        """``{"logits": [V, C], "target": [V], "maps": [V, C_e, h, w], "views": [V, 5], "label": int}``."""
        try:
            name, row = self.index[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the cache {self.uri}") from None
        return self._decode(self._load_columns(name), row)

    def iter_shard(self, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Sequentially yield ``(key, record)`` for one shard (one read of its data)."""
        keys = self.shard_keys(name)
        if not keys:
            return
        cols = self._read_shard(name)
        for row, key in enumerate(keys):
            yield key, self._decode(cols, row)

    # ---- integrity -----------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Recompute every shard's checksum; return one message per bad shard (empty when all is well)."""
        problems = []
        for name, rec in sorted(self.manifest["shards"].items()):
            if not rec["complete"]:
                problems.append(f"{name}: incomplete")
                continue
            try:
                sha, _ = checksum_files(self.fs, self.shard_path(name))
            except FileNotFoundError:
                problems.append(f"{name}: missing")
                continue
            if sha != rec["sha256"]:
                problems.append(f"{name}: checksum mismatch (a file was changed, truncated, added or removed)")
        return problems
