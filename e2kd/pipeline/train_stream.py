"""The training stream of one rank: the global batches of :class:`~e2kd.pipeline.order.Order`, its slice of each.

Each DataLoader worker reads its partitions front to back (one :class:`PartitionReader` each: the shard's undecoded
records a block at a time, the shard's cached records once) and yields, per step, its part of the rank's batch,
collated; :class:`RankLoader` joins the workers' parts of a step (the DataLoader hands them over in turn) into the
rank's batch — in the order's positions, whatever the number of workers. ``set_epoch(epoch, start)`` makes the next
pass start at global batch ``start`` of ``epoch`` (a resumed run).
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from e2kd.pipeline.loader import StreamSpec, StudentStream, key_mismatch_message, pass_index
from e2kd.pipeline.order import Item, Order, usable_workers
from e2kd.pipeline.sources import BadSample, InputShard, Sample

__all__ = ["TrainStream", "RankLoader", "PartitionReader", "SharedRecords", "build_train_loader", "concat_batches",
           "endless_batches"]


class SharedRecords:
    """The cached records of the shards that one worker's partition readers are in: a shard cut by a partition
    boundary is read and decoded once for all of them, and dropped when the last leaves it."""

    def __init__(self, stream: StudentStream) -> None:
        self.stream = stream
        self._held: dict[str, tuple[dict[str, Any] | None, int]] = {}  # shard → (records, readers in it)

    def enter(self, shard: InputShard) -> dict[str, Any] | None:
        records, users = self._held.get(shard.name) or (self.stream._records(shard), 0)
        self._held[shard.name] = (records, users + 1)
        return records

    def leave(self, name: str) -> None:
        records, users = self._held[name]
        if users > 1:
            self._held[name] = (records, users - 1)
        else:
            del self._held[name]


class PartitionReader:
    """Reads one partition's items in order: each shard once, front to back, one block of records at a time."""

    def __init__(self, stream: StudentStream, order: Order, shards: dict[str, InputShard],
                 records: SharedRecords | None = None, on_stand_in: Any = None) -> None:
        self.stream, self.order, self.shards = stream, order, shards
        self.shared = records or SharedRecords(stream)
        self.on_stand_in = on_stand_in  # called once per sample replaced by a stand-in
        self._at: tuple[int, str] | None = None  # (pass, shard) being read
        self._raw: Iterator[Any] = iter(())
        self._records: dict[str, Any] | None = None
        self._block, self._rows = -1, {}  # block number → its undecoded records by key
        self._bad: set[str] | None = None  # a trusted shard's keys the cache recorded as bad (None: not checked)

    def get(self, item: Item) -> tuple[Sample, dict[str, Any] | None]:
        """The decoded sample of ``item`` and its cached record (None where its shard is not cached)."""
        if self._at != (item.cycle, item.shard):
            shard = self.shards[item.shard]
            if self._at is not None:
                self.shared.leave(self._at[1])
            self._at, self._raw, self._block = (item.cycle, item.shard), iter(self.stream.local(shard).raw()), -1
            self._records = self.shared.enter(shard)
            trusted = self._records is not None and shard.name in self.stream.spec.trusted
            self._bad = {e["key"] for e in self.stream.store.shard_errors(shard.name)} if trusted else None
        if item.block != self._block:
            self._read_block(item.block)
        sample = self._sample(item)
        return sample, (self._records[sample.key] if self._records is not None else None)

    def _read_block(self, block: int) -> None:
        name, size = self._at[1], self.order.block  # type: ignore[index]
        wanted = set(self.order.shard_keys[name][block * size:(block + 1) * size])
        rows: dict[str, Any] = {}
        shard = self.shards[name]
        for raw in self._raw:
            key = raw.key if isinstance(raw, BadSample) else raw_key(shard, raw)
            if self._bad is not None and key not in self._records and key not in self._bad:  # type: ignore[operator]
                self._unexpected(name, key)
            if key in wanted:
                rows[key] = raw
                if len(rows) == len(wanted):
                    break
        self._block, self._rows = block, rows

    def _unexpected(self, shard: str, key: str) -> None:
        """A key of a shard planned from the cache's key index that the cache does not hold (the plan trusted the
        shard's size): the plan's error, or with ``--allow-missing`` skipped with a warning."""
        if not self.stream.spec.allow_missing:
            raise ValueError(key_mismatch_message([key], []))
        warnings.warn(f"input shard {shard}: key {key!r} is not in the cache, skipped (--allow-missing)", UserWarning,
                      stacklevel=2)

    def _decode(self, key: str) -> Sample | None:
        raw = self._rows.get(key)
        if raw is None or isinstance(raw, BadSample):
            return None
        sample = self.shards[self._at[1]].decode(raw)  # type: ignore[index]
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
        records = SharedRecords(self.base)
        readers = {p: PartitionReader(self.base, self.order, shards, records, self._count_stand_in)
                   for p in partitions}
        replay: bool | None = None
        epoch, start = self.epoch, self.start  # read once: this pass's position
        for step in range(start, self.steps):
            items = []
            for p in partitions:
                for item in self.order.partition_items(epoch, step, p):
                    sample, record = readers[p].get(item)
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
