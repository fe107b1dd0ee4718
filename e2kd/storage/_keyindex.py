"""Key uniqueness across a store in bounded memory: 12 bytes per key, not a Python string per key.

:class:`KeyIndex` holds a 64-bit hash of every key and the number of the shard that holds it, in a few
sorted numpy runs merged as they grow (a log-structured set: adding a shard's keys is a binary search per key
in each run, merging is amortised O(log n) per key). 10 million keys take 120 MB (``nbytes``; up to ~440 MB for
the moment of a merge), against ~1.1 GB as a ``dict`` of key strings. A hash match is only a candidate: it is
confirmed against the other shard's real keys (``keys_of``) before a clash is reported, so a 64-bit collision never
refuses a good shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = ["KeyIndex", "hash_keys"]

BYTES_PER_KEY = 12  # uint64 hash + int32 shard number


def hash_keys(keys: Iterable[str]) -> np.ndarray:
    """The 64-bit hash of each key, as ``uint64``: Python's string hash (SipHash), salted per process — the index
    lives in one process's memory only, and every match is confirmed against the real keys."""
    return np.fromiter(map(hash, keys), dtype=np.int64).view(np.uint64)


class KeyIndex:
    """Which shard holds each key of a store, as hashes (see the module docstring)."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, shard numbers), largest first

    def __len__(self) -> int:
        return sum(len(h) for h, _ in self._runs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the hashes and shard numbers (shard names aside)."""
        return sum(h.nbytes + o.nbytes for h, o in self._runs)

    def _shard_id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = len(self._names)
            self._names.append(name)
        return self._ids[name]

    def candidates(self, hashes: np.ndarray, shard: str) -> list[tuple[int, str]]:
        """``(position in hashes, other shard)`` for every hash another shard also holds."""
        mine = self._ids.get(shard, -1)
        found: list[tuple[int, str]] = []
        for run, owners in self._runs:
            lo, hi = np.searchsorted(run, hashes, "left"), np.searchsorted(run, hashes, "right")
            for pos in np.flatnonzero(hi > lo):
                found.extend((int(pos), self._names[int(o)]) for o in owners[lo[pos]:hi[pos]] if o != mine)
        return found

    def first_clash(self, keys: Sequence[str], shard: str,
                    keys_of: Callable[[str], Iterable[str]]) -> tuple[str, str] | None:
        """``(key, other shard)`` for the first of ``keys`` that another shard holds (hash matches confirmed with
        ``keys_of(other shard)``), else None."""
        confirmed: dict[str, set[str]] = {}
        for pos, other in sorted(self.candidates(hash_keys(keys), shard)):
            if other not in confirmed:
                confirmed[other] = set(keys_of(other))
            if keys[pos] in confirmed[other]:
                return keys[pos], other
        return None

    def add(self, keys: Iterable[str], shard: str) -> None:
        """Record that ``shard`` holds ``keys``."""
        self.add_hashes(hash_keys(keys), shard)

    def add_hashes(self, hashes: np.ndarray, shard: str) -> None:
        """Record that ``shard`` holds keys with these hashes."""
        if not len(hashes):
            return
        owners = np.full(len(hashes), self._shard_id(shard), dtype=np.int32)
        order = np.argsort(hashes, kind="stable")
        self._runs.append((np.asarray(hashes, dtype=np.uint64)[order], owners))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (h1, o1), (h2, o2) = self._runs.pop(), self._runs.pop()
            merged = np.concatenate([h2, h1])
            order = np.argsort(merged, kind="stable")
            self._runs.append((merged[order], np.concatenate([o2, o1])[order]))
