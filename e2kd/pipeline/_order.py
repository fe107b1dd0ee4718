"""The training order: which samples form each global batch — the same for any number of ranks and DataLoader workers.

A pass over the data is a function of (seed, epoch, pass, the planned keys of each shard, the global batch ``G``
and the partition count ``P``) alone:

1. the shards in a seeded order; each shard's keys, in stored order, cut into blocks of ``block`` keys and each
   block permuted (shuffled in blocks: a reader streams a shard front to back holding one block);
2. the concatenation, cut after its last whole global batch (the ``N mod G`` samples after it are not seen in this
   pass — a different few every epoch, as the shard order changes);
3. cut into ``P`` contiguous partitions of equal length ``L``; global batch ``j`` of the pass is, for
   ``p = 0 … P−1``, partition ``p``'s items ``[j·m, (j+1)·m)`` with ``m = G/P``.

Rank ``r`` of ``w`` takes positions ``[r·b, (r+1)·b)`` of every global batch (``b = G/w``, its ``--batch-size``):
partitions ``r·P/w …``; its DataLoader worker ``k`` of ``W`` takes ``P/(w·W)`` of those. Each partition is read by
exactly one worker of one rank, front to back, so reads stay shard-local. Needs ``w·W | P | G``.

An epoch is ``steps`` global batches: one pass (``steps = N // G``), or as many passes as ``--steps-per-epoch``
needs (pass 1, 2, … in new orders). A position in the stream is (epoch, step): resuming there is exact.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

__all__ = ["Order", "Item", "default_partitions", "check_layout"]

#: Keys permuted together within a shard (a reader holds one block of undecoded records at a time).
DEFAULT_BLOCK = 256
_MIN_PARTITIONS = 8


def _key_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Item:
    """One sample's place in the order: its shard, key, the block of the shard it is read with, and its pass."""

    shard: str
    key: str
    block: int
    cycle: int


def default_partitions(global_batch: int, readers: int) -> int:
    """The smallest multiple of ``readers`` (ranks × workers) that divides ``global_batch`` and is at least 8 (or
    ``global_batch`` itself when smaller)."""
    check_layout(global_batch, global_batch, readers)
    want = min(_MIN_PARTITIONS, global_batch)
    return next(p for p in range(readers, global_batch + 1, readers) if global_batch % p == 0 and p >= want)


def usable_workers(workers: int, world: int, partitions: int) -> int:
    """The most DataLoader workers, at most ``workers``, among which each rank's ``partitions // world`` partitions
    split evenly (a worker reads whole partitions); 0 stays 0."""
    if workers <= 0:
        return workers
    per_rank = partitions // world
    return max(w for w in range(1, workers + 1) if per_rank % w == 0)


def check_layout(global_batch: int, partitions: int, readers: int) -> None:
    """``readers | partitions | global_batch``, else a one-line ``ValueError`` saying what would fit."""
    if global_batch % readers:
        raise ValueError(f"ranks × DataLoader workers ({readers}) must divide the global batch ({global_batch}): "
                         f"give --batch-size a multiple of --workers")
    if global_batch % partitions or partitions % readers:
        fits = [p for p in range(readers, global_batch + 1, readers) if global_batch % p == 0]
        raise ValueError(f"--partitions {partitions} must divide the global batch ({global_batch}) and be a "
                         f"multiple of ranks × DataLoader workers ({readers}); {fits[:6]} would fit")


@dataclass(frozen=True, eq=False)  # hashed by identity: the per-pass layout is cached per object
class Order:
    """The order of every epoch (see the module docstring); plain values, so it pickles into workers."""

    shard_keys: Mapping[str, Sequence[str]]  #: the usable keys of each shard, in stored order
    seed: int
    global_batch: int
    partitions: int
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        check_layout(self.global_batch, self.partitions, 1)
        if self.steps_per_pass < 1:
            raise ValueError(f"{self.num_samples} usable samples are fewer than one global batch of "
                             f"{self.global_batch}")

    @property
    def num_samples(self) -> int:
        return sum(len(k) for k in self.shard_keys.values())

    @property
    def steps_per_pass(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def per_partition(self) -> int:
        """Items a partition gives each global batch (``m``)."""
        return self.global_batch // self.partitions

    def shards(self, epoch: int, cycle: int) -> list[str]:
        """The shards of pass ``cycle`` of ``epoch``, in order."""
        return list(_layout(self, epoch, cycle)[0])

    def items(self, epoch: int, cycle: int, start: int, stop: int) -> Iterator[Item]:
        """Items ``[start, stop)`` of pass ``cycle``'s sequence (only the shards that overlap are expanded)."""
        names, ends = _layout(self, epoch, cycle)
        for s in range(bisect_right(ends, start), len(names)):
            offset = ends[s] - len(self.shard_keys[names[s]])
            if offset >= stop:
                return
            lo, hi = max(start - offset, 0), min(stop, ends[s]) - offset
            for block in range(lo // self.block, (hi - 1) // self.block + 1):
                first = block * self.block
                keys = _block_keys(self, names[s], epoch, cycle, block)
                for i in range(max(lo - first, 0), min(hi - first, len(keys))):
                    yield Item(names[s], keys[i], block, cycle)

    def position(self, step: int) -> tuple[int, int]:
        """``(pass, global batch within the pass)`` of an epoch's ``step``."""
        return divmod(step, self.steps_per_pass)

    def partition_items(self, epoch: int, step: int, partition: int) -> list[Item]:
        """Partition ``partition``'s ``m`` items of global batch ``step`` of ``epoch``."""
        cycle, j = self.position(step)
        m = self.per_partition
        first = partition * self.steps_per_pass * m + j * m
        return list(self.items(epoch, cycle, first, first + m))

    def partition_blocks(self, epoch: int, cycle: int, partition: int, shard: str) -> range:
        """The blocks of ``shard`` that ``partition`` reads in pass ``cycle`` of ``epoch`` (empty if none)."""
        names, ends = _layout(self, epoch, cycle)
        end = ends[names.index(shard)]
        begin, span = end - len(self.shard_keys[shard]), self.steps_per_pass * self.per_partition
        lo, hi = max(begin, partition * span) - begin, min(end, (partition + 1) * span) - begin
        return range(lo // self.block, (hi - 1) // self.block + 1) if hi > lo else range(0)

    def global_batch_items(self, epoch: int, step: int) -> list[Item]:
        """Every item of global batch ``step`` of ``epoch``, in order (partition by partition)."""
        return [item for p in range(self.partitions) for item in self.partition_items(epoch, step, p)]

    def reader_partitions(self, rank: int, world: int, worker: int, workers: int) -> range:
        """The partitions that worker ``worker`` of ``workers`` on rank ``rank`` of ``world`` reads."""
        readers = world * max(1, workers)
        check_layout(self.global_batch, self.partitions, readers)
        per = self.partitions // readers
        first = (rank * max(1, workers) + worker) * per
        return range(first, first + per)


@lru_cache(maxsize=8)
def _layout(order: Order, epoch: int, cycle: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A pass's shards in order and the cumulative item count at the end of each."""
    names = tuple(sorted(order.shard_keys, key=lambda name: _key_int("order", order.seed, epoch, cycle, name)))
    return names, tuple(accumulate(len(order.shard_keys[n]) for n in names))


@lru_cache(maxsize=64)
def _block_keys(order: Order, name: str, epoch: int, cycle: int, block: int) -> tuple[str, ...]:
    keys = list(order.shard_keys[name][block * order.block:(block + 1) * order.block])
    random.Random(_key_int("block", order.seed, epoch, cycle, name, block)).shuffle(keys)
    return tuple(keys)
