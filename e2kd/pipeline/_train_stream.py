"""The training stream of one rank: the global batches of :class:`~e2kd.pipeline._order.Order`, its slice of each.

Each DataLoader worker reads its partitions front to back (one :class:`PartitionReader` each: the shard's undecoded
records a block at a time; readers of the worker in the same shard at once share one scan of it and its cached
records) and yields, per step, its part of the rank's batch,
collated; :class:`RankLoader` joins the workers' parts of a step (the DataLoader hands them over in turn) into the
rank's batch — in the order's positions, whatever the number of workers. ``set_epoch(epoch, start)`` makes the next
pass start at global batch ``start`` of ``epoch`` (a resumed run).
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from e2kd.pipeline._loader import StreamSpec, StudentStream, key_mismatch_message, pass_index
from e2kd.pipeline._order import Item, Order, usable_workers
from e2kd.pipeline._sources import BadSample, InputShard, Sample, read_header

__all__ = ["TrainStream", "RankLoader", "PartitionReader", "SharedRecords", "ShardScan", "build_train_loader",
           "concat_batches", "endless_batches"]


class SharedRecords:
    """What one worker's partition readers in the same shard share: its cached records (read once), the keys its
    cache recorded as bad, and a :class:`ShardScan` per pass — dropped when the last reader leaves the shard."""

    def __init__(self, stream: StudentStream, order: Order) -> None:
        self.stream, self.order = stream, order
        self._held: dict[str, _Held] = {}

    def enter(self, shard: InputShard) -> dict[str, Any] | None:
        """The shard's cached records (None where it is not cached); one more reader in it."""
        held = self._held.get(shard.name)
        if held is None:
            records = self.stream._records(shard)
            trusted = records is not None and shard.name in self.stream.spec.trusted
            bad = {e["key"] for e in self.stream.store.shard_errors(shard.name)} if trusted else None
            held = self._held[shard.name] = _Held(records, bad)
        held.users += 1
        return held.records

    def leave(self, name: str) -> None:
        held = self._held[name]
        held.users -= 1
        if held.users == 0:
            del self._held[name]

    def scan(self, shard: InputShard, cycle: int, shared: bool = True) -> ShardScan:
        """The scan of ``shard`` in pass ``cycle`` that the worker's readers share (a new one not ``shared``)."""
        held = self._held[shard.name]
        if shared and cycle in held.scans:
            return held.scans[cycle]
        keys, size = self.order.shard_keys[shard.name], self.order.block
        key_block = {key: i // size for i, key in enumerate(keys)}
        sizes = {b: len(keys[b * size:(b + 1) * size]) for b in range(-(-len(keys) // size))}
        scan = ShardScan(iter(self.stream.local(shard).raw()), key_block, sizes, lambda raw: raw_key(shard, raw),
                         lambda key: self._check(shard.name, key))
        if shared:
            held.scans = {cycle: scan}  # one pass at a time: an earlier pass's scan is done with
        return scan

    def _check(self, shard: str, key: str) -> None:
        """A key of a shard planned from the cache's key index that the cache does not hold (the plan trusted the
        shard's size): the plan's error, or with ``--allow-missing`` skipped with a warning."""
        held = self._held.get(shard)
        if held is None or held.bad is None or key in held.records or key in held.bad:  # type: ignore[operator]
            return
        if not self.stream.spec.allow_missing:
            raise ValueError(key_mismatch_message([key], []))
        warnings.warn(f"input shard {shard}: key {key!r} is not in the cache, skipped (--allow-missing)", UserWarning,
                      stacklevel=2)


@dataclass
class _Held:
    records: dict[str, Any] | None
    bad: set[str] | None  # a trusted shard's keys the cache recorded as bad (None: not checked)
    users: int = 0
    scans: dict[int, ShardScan] = field(default_factory=dict)


class ShardScan:
    """One front-to-back pass over a shard's undecoded records, shared by the worker's readers in that shard (a shard
    cut by a partition boundary): each record is read once. A block's records are kept while some reader that
    entered the shard will still read that block, and dropped once none will; a block read past before its reader
    came (its reader entered later) is not kept — that reader starts its own scan."""

    def __init__(self, raw: Iterator[Any], key_block: dict[str, int], block_sizes: dict[int, int],
                 key: Callable[[Any], str], check: Callable[[str], None]) -> None:
        self._raw, self._key_block, self._sizes, self._key, self._check = raw, key_block, block_sizes, key, check
        self._kept: dict[int, dict[str, Any]] = {}  # block → its records read so far
        self._front = -1  # the block of the last record read (blocks before it are complete or passed)
        self._ended = False
        self._needs: dict[int, range] = {}  # reader id → the blocks it will still read

    def enter(self, reader: int, blocks: range) -> None:
        self._needs[reader] = blocks

    def leave(self, reader: int) -> None:
        self._needs.pop(reader, None)
        self._drop_unneeded()

    def block(self, reader: int, block: int) -> dict[str, Any] | None:
        """The records of ``block`` (all of it that the shard holds), or None where this scan passed it unkept."""
        needs = self._needs.get(reader)
        if needs is not None:  # the blocks before this one it will not read again
            self._needs[reader] = range(max(block, needs.start), needs.stop)
        if block <= self._front and block not in self._kept:
            return None
        while not self._ended and (block > self._front or (block == self._front and not self._full(block))):
            self._read_one(block)
        rows = self._kept.get(block, {})  # not met at all: the shard holds none of the block's keys
        self._drop_unneeded()
        return rows

    def _full(self, block: int) -> bool:
        return block in self._kept and len(self._kept[block]) >= self._sizes.get(block, 0)

    def _read_one(self, wanted: int) -> None:
        try:
            raw = next(self._raw)
        except StopIteration:
            self._ended = True
            return
        if isinstance(raw, BadSample) and raw.key == "*":  # the unreadable rest of a truncated tar
            self._ended = True
            return
        key = raw.key if isinstance(raw, BadSample) else self._key(raw)
        block = self._key_block.get(key)
        if block is None:
            self._check(key)
            return
        if block > self._front:  # a new block: kept if a reader will read it
            self._front = block
            if block == wanted or any(block in r for r in self._needs.values()):
                self._kept[block] = {}
        if block in self._kept:
            self._kept[block][key] = raw

    def _drop_unneeded(self) -> None:
        for block in [b for b in self._kept if b < self._front and not any(b in r for r in self._needs.values())]:
            del self._kept[block]


class PartitionReader:
    """Reads one partition's items in order: each shard once per pass, front to back, one block of records at a
    time (through the scan it shares with the worker's other readers in the shard)."""

    def __init__(self, stream: StudentStream, order: Order, shards: dict[str, InputShard], partition: int,
                 records: SharedRecords | None = None, on_stand_in: Callable[[], None] | None = None) -> None:
        self.stream, self.order, self.shards, self.partition = stream, order, shards, partition
        self.shared = records or SharedRecords(stream, order)
        self.on_stand_in = on_stand_in  # called once per sample replaced by a stand-in
        self._at: tuple[int, str] | None = None  # (pass, shard) being read
        self._scan: ShardScan | None = None
        self._records: dict[str, Any] | None = None
        self._block = -1
        self._rows: dict[str, Any] = {}  # the current block's undecoded records by key

    def get(self, item: Item, epoch: int) -> tuple[Sample, dict[str, Any] | None]:
        """The decoded sample of ``item`` (of ``epoch``) and its cached record (None where its shard is not
        cached)."""
        if self._at != (item.cycle, item.shard):
            self.close()
            shard = self.shards[item.shard]
            self._records = self.shared.enter(shard)
            self._at, self._block = (item.cycle, item.shard), -1
            self._scan = self.shared.scan(shard, item.cycle)
            self._scan.enter(id(self), self.order.partition_blocks(epoch, item.cycle, self.partition, item.shard))
        if item.block != self._block:
            self._read_block(item.block)
        sample = self._sample(item)
        return sample, (self._records[sample.key] if self._records is not None else None)

    def close(self) -> None:
        """Leave the shard being read (if any)."""
        if self._at is not None and self._scan is not None:
            self._scan.leave(id(self))
            self.shared.leave(self._at[1])
        self._at, self._scan = None, None

    def _read_block(self, block: int) -> None:
        rows = self._scan.block(id(self), block)  # type: ignore[union-attr]
        if rows is None:  # the shared scan passed this block before this reader came: a scan of its own
            self._scan.leave(id(self))  # type: ignore[union-attr]
            self._scan = self.shared.scan(self.shards[self._at[1]], self._at[0], shared=False)  # type: ignore[index]
            rows = self._scan.block(id(self), block) or {}
        self._block, self._rows = block, rows

    def _decode(self, key: str) -> Sample | None:
        raw = self._rows.get(key)
        if raw is None or isinstance(raw, BadSample):
            return None
        header = read_header if self.stream.spec.decode_on_device else None  # decoded on the device later
        sample = self.shards[self._at[1]].decode(raw, header)  # type: ignore[index]
        return sample if isinstance(sample, Sample) else None

    def _sample(self, item: Item) -> Sample:
        sample = self._decode(item.key)
        if sample is not None:
            return sample
        missing = item.key not in self._rows
        if missing and not self.stream.spec.allow_missing:
            raise ValueError(key_mismatch_message([], [item.key]))
        # unreadable now (or missing, --allow-missing): the block's first readable sample stands in, with its own
        # cached record — the same on every rank and worker count, so the order stays the order
        size = self.order.block
        for key in self.order.shard_keys[item.shard][item.block * size:(item.block + 1) * size]:
            stand_in = self._decode(key)
            if stand_in is not None:
                if self.on_stand_in is not None:
                    self.on_stand_in()
                warnings.warn(f"input shard {item.shard}: sample {item.key!r} is "
                              f"{'missing' if missing else 'unreadable'}; {key!r} stands in for it",
                              UserWarning, stacklevel=2)
                return stand_in
        raise ValueError(f"input shard {item.shard}: sample {item.key!r} cannot be read and no sample of its block "
                         f"can stand in")


def raw_key(shard: InputShard, raw: Any) -> str:
    """The sample key of one undecoded record of ``shard``."""
    if isinstance(raw, dict):
        return str(raw.get("__key__", ""))
    return shard._key(raw)  # type: ignore[attr-defined]


class TrainStream(IterableDataset):
    """This rank's part of every global batch, per DataLoader worker (see the module docstring)."""

    def __init__(self, spec: StreamSpec, order: Order, steps: int, workers: int) -> None:
        super().__init__()
        self.base = StudentStream(spec)
        self.order, self.steps, self.workers = order, steps, workers
        # (epoch, start) in shared memory: persistent DataLoader workers, forked once, read each epoch's from it
        self._position = multiprocessing.get_context("fork").Array("q", [0, 0], lock=False)
        self._stand_ins = multiprocessing.get_context("fork").Value("q", 0)  # counted in every worker
        order.reader_partitions(spec.rank, spec.world_size, 0, workers)  # the layout fits, or a clear error now

    @property
    def spec(self) -> StreamSpec:
        return self.base.spec

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next pass yields global batches ``start … steps−1`` of ``epoch`` (in every worker, also the
        persistent ones)."""
        self._position[0], self._position[1] = epoch, start

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start(self) -> int:
        return int(self._position[1])

    @property
    def stand_ins(self) -> int:
        """Samples replaced so far by a readable sample of their block (unreadable, or missing with
        --allow-missing), over all of this rank's workers and epochs."""
        return int(self._stand_ins.value)

    def _count_stand_in(self) -> None:
        with self._stand_ins.get_lock():
            self._stand_ins.value += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        partitions = self.order.reader_partitions(self.spec.rank, self.spec.world_size, worker, self.workers)
        shards = {s.name: s for s in self.spec.shards}
        records = SharedRecords(self.base, self.order)
        readers = {p: PartitionReader(self.base, self.order, shards, p, records, self._count_stand_in)
                   for p in partitions}
        replay: bool | None = None
        epoch, start = self.epoch, self.start  # read once: this pass's position
        for step in range(start, self.steps):
            items = []
            for p in partitions:
                for item in self.order.partition_items(epoch, step, p):
                    sample, record = readers[p].get(item, epoch)
                    if record is not None and replay is None:
                        replay = self.base._replays_views()
                    items.append(self.base._item(sample, record, pass_index(epoch, item.cycle), bool(replay)))
            yield {**default_collate(items), "step": step}


def concat_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The rank's batch from its workers' parts of one step (tensors concatenated, lists joined)."""
    steps = {p["step"] for p in parts}
    if len(steps) != 1:
        raise RuntimeError(f"DataLoader workers out of step: {sorted(steps)}")
    return {k: (parts[0][k] if k == "step" else _concat([p[k] for p in parts])) for k in parts[0]}


def _concat(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values) if len(values) > 1 else values[0]
    if values[0] and isinstance(values[0][0], torch.Tensor):  # several teachers: one tensor per teacher
        return [_concat([v[i] for v in values]) for i in range(len(values[0]))]
    return [x for v in values for x in v]


class RankLoader:
    """Iterates the rank's batches: the DataLoader's per-worker parts of each step, joined."""

    def __init__(self, loader: DataLoader, parts: int) -> None:
        self.loader, self.parts = loader, parts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader)
        while True:
            parts = []
            for _ in range(self.parts):
                try:
                    parts.append(next(it))
                except StopIteration:
                    if parts:
                        raise RuntimeError("DataLoader workers ended out of step") from None
                    return
            yield concat_batches(parts)


def build_train_loader(spec: StreamSpec, order: Order, steps: int, workers: int,
                       persistent: bool = True) -> tuple[TrainStream, RankLoader]:
    """The training stream and the loader of its batches. Workers fork once (before any store is opened) and, unless
    ``persistent`` is off, live across epochs: each epoch reaches them through the stream's shared position.
    A worker reads whole partitions: with more ``workers`` than split each rank's partitions evenly, fewer are
    started (and a warning says how many)."""
    usable = usable_workers(workers, spec.world_size, order.partitions)
    if usable != workers and spec.rank == 0:
        warnings.warn(f"--workers {workers}: {usable} DataLoader workers used — each rank's "
                      f"{order.partitions // spec.world_size} partitions of the global batch ({order.global_batch}) "
                      f"split evenly among them (each reads whole partitions); a --batch-size that {workers} divide "
                      f"would use all", UserWarning, stacklevel=2)
    workers = usable
    stream = TrainStream(spec, order, steps, workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=persistent and workers > 0,
                        multiprocessing_context="fork" if workers else None)
    return stream, RankLoader(loader, max(1, workers))


def endless_batches(stream: TrainStream, loader: RankLoader, epoch: int = 0) -> Iterator[dict[str, Any]]:
    """The rank's batches epoch after epoch from ``epoch`` on (benchmarks that time more steps than an epoch has)."""
    while True:
        stream.set_epoch(epoch)
        yield from loader
        epoch += 1
