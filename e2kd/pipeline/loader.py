"""The student's stream: input shards joined with cached teacher outputs by key, views replayed, batched.

Stages (each a plain generator): shards of this rank/worker → decoded samples ⋈ cached records (by key) →
view replay (K-view cache) or joint crop (``full`` cache) → shuffle buffer → DataLoader batching. The store is
opened lazily inside each DataLoader worker (zarr's threads do not survive fork).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from e2kd.pipeline.sources import BadSample, InputShard, Sample, iter_keys, iter_shard
from e2kd.pipeline.views import FULL_VIEW, crop_map, draw_view, render_view

__all__ = ["JoinPlan", "plan_join", "StreamSpec", "StudentStream", "build_loader", "select_shots"]


@dataclass
class JoinPlan:
    """What joining the input with a cache gives, computed once before training (no image decoding)."""

    keys: dict[str, int]  # usable key → label
    shard_counts: dict[str, int]  # input shard → usable samples
    cache_bad: int = 0  # recorded as bad by the cache: skipped
    missing_in_cache: list[str] = field(default_factory=list)
    missing_in_input: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.keys)


def plan_join(shards: list[InputShard], store: Any | None, allow_missing: bool = False) -> JoinPlan:
    """List the input keys and match them with the cache.

    Raises:
        ValueError: (unless ``allow_missing``) input keys the cache neither holds nor recorded as bad, or
            cached keys of the input's shards that are not in the input.
    """
    if store is None:
        keys, counts = {}, {}
        for shard in shards:
            listed = dict(iter_keys(shard))
            keys.update(listed)
            counts[shard.name] = len(listed)
        return JoinPlan(keys, counts)
    errors = store.errors()
    bad = {e["key"] for e in errors if "kept" not in e}
    unlabelled = {e["key"] for e in errors if "kept" in e}  # cached with a label outside [0, C): now −1
    index = store.index
    plan = JoinPlan({}, {})
    for shard in shards:
        input_keys = dict(iter_keys(shard))
        usable = {k: (-1 if k in unlabelled else v) for k, v in input_keys.items() if k in index and k not in bad}
        plan.cache_bad += sum(1 for k in input_keys if k in bad)
        plan.missing_in_cache += [k for k in input_keys if k not in index and k not in bad]
        cached_here = store.shard_keys(shard.name) if shard.name in store.shard_names else []
        plan.missing_in_input += [k for k in cached_here if k not in input_keys]
        plan.keys.update(usable)
        plan.shard_counts[shard.name] = len(usable)
    if not allow_missing and (plan.missing_in_cache or plan.missing_in_input):
        what = (f"{len(plan.missing_in_cache)} input key(s) have no cached output (e.g. "
                f"{plan.missing_in_cache[:3]})" if plan.missing_in_cache else
                f"{len(plan.missing_in_input)} cached key(s) are not in --data (e.g. {plan.missing_in_input[:3]})")
        raise ValueError(f"keys: {what}; is --data the dataset the cache was built from? "
                         f"--allow-missing skips and counts them")
    return plan


def select_shots(keys: dict[str, int], shots: int, seed: int) -> dict[str, int]:
    """``shots`` keys per class (label ≥ 0), drawn with ``seed``; classes with fewer keep all."""
    by_class: dict[int, list[str]] = {}
    for key, label in sorted(keys.items()):
        if label >= 0:
            by_class.setdefault(label, []).append(key)
    rng = random.Random(seed)
    chosen = {}
    for label, members in sorted(by_class.items()):
        for key in rng.sample(members, min(shots, len(members))):
            chosen[key] = label
    if not chosen:
        raise ValueError("--shots needs labelled samples (cls), but none have a label")
    return chosen


@dataclass
class StreamSpec:
    """Plain values describing the stream (it is pickled into DataLoader workers)."""

    shards: list[InputShard]
    keys: set[str]
    input_size: tuple[int, int]
    cache_uri: str | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    seed: int = 0
    shuffle_buffer: int = 256
    random_crop: bool = True  # False: the whole image (evaluation)
    map_size: tuple[int, int] | None = None  # full cache: joint-cropped teacher map resized to this (None: own size)
    ram_cache_mb: int = 1024  # without DataLoader workers: decoded shards kept across epochs up to this size
    rank: int = 0
    world_size: int = 1


def _key_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little")


class StudentStream(IterableDataset):
    """Endless stream (one pass per epoch over this rank's shards, cycled when a rank runs short)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec, self.epoch = spec, 0
        self._store = None
        self._decoded: dict[str, tuple[list[Sample | BadSample], dict[str, Any] | None]] = {}
        self._decoded_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def store(self) -> Any:
        if self._store is None and self.spec.cache_uri is not None:
            from e2kd.storage import open_store

            self._store = open_store(self.spec.cache_uri)  # opened in the worker process, never before fork
        return self._store

    def _my_shards(self, cycle: int) -> list[InputShard]:
        order = sorted(self.spec.shards, key=lambda s: _key_int(self.spec.seed, self.epoch, cycle, s.name))
        mine = order[self.spec.rank::self.spec.world_size]
        info = get_worker_info()
        return mine[info.id::info.num_workers] if info is not None else mine

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(_key_int("shuffle", self.spec.seed, self.epoch, self.spec.rank,
                                     getattr(get_worker_info(), "id", 0)))
        buffer: list[dict[str, Any]] = []
        for sample in self._cycled():
            if len(buffer) < self.spec.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _cycled(self) -> Iterator[dict[str, Any]]:
        cycle = 0
        while True:
            produced = 0
            for shard in self._my_shards(cycle):
                for item in self._shard_items(shard, cycle):
                    produced += 1
                    yield item
            if produced == 0 or not self.spec.random_crop:
                return  # nothing to cycle (or a single evaluation pass)
            cycle += 1

    def _shard_items(self, shard: InputShard, cycle: int) -> Iterator[dict[str, Any]]:
        samples, records = self._shard_data(shard)
        for sample in samples:
            if isinstance(sample, BadSample) or sample.key not in self.spec.keys:
                continue
            if records is not None and sample.key not in records:
                continue
            yield self._item(sample, records[sample.key] if records is not None else None, cycle)

    def _shard_data(self, shard: InputShard) -> tuple[Iterator[Sample | BadSample], dict[str, Any] | None]:
        """Decoded samples and cached records of a shard; kept in RAM across epochs when running in-process."""
        if shard.name in self._decoded:
            samples, records = self._decoded[shard.name]
            return iter(samples), records
        records = dict(self.store.iter_shard(shard.name)) if self.store is not None and \
            shard.name in self.store.shard_names else None
        if get_worker_info() is not None or self.spec.ram_cache_mb <= 0:
            return iter_shard(shard), records
        return self._decode_and_keep(shard, records), records

    def _decode_and_keep(self, shard: InputShard, records: dict[str, Any] | None) -> Iterator[Sample | BadSample]:
        kept: list[Sample | BadSample] = []
        for sample in iter_shard(shard):
            kept.append(sample)
            yield sample
        nbytes = sum(s.image.numel() for s in kept if isinstance(s, Sample))  # reached only after a full pass
        if self._decoded_bytes + nbytes <= self.spec.ram_cache_mb * 2**20:
            self._decoded[shard.name] = (kept, records)
            self._decoded_bytes += nbytes

    def _item(self, sample: Sample, record: dict[str, Any] | None, cycle: int) -> dict[str, Any]:
        spec, hw = self.spec, tuple(sample.image.shape[1:])
        epoch_index = self.epoch * 1000 + cycle
        label = record["label"] if record is not None else sample.label  # the cache's label: −1 where it was bad
        item: dict[str, Any] = {"key": sample.key, "label": torch.tensor(label)}
        full_cache = record is not None and self.store.manifest["views"]["policy"] == "full"
        if record is not None and not full_cache:  # K-view cache: replay one cached view exactly
            v = (_key_int(spec.seed, sample.key) + epoch_index) % record["views"].shape[0] if spec.random_crop else 0
            view = record["views"][v].tolist()
            item.update(view_index=torch.tensor(v), t_logits=record["logits"][v], t_map=record["maps"][v],
                        target=record["target"][v])
        else:
            view = (draw_view(spec.seed, sample.key, epoch_index, *hw, spec.crop_scale, spec.crop_ratio, spec.flip_p)
                    if spec.random_crop else FULL_VIEW).as_list()
            item["view_index"] = torch.tensor(0)
            if record is not None:  # full cache: joint crop of the cached map, logits reused
                item.update(t_logits=record["logits"][0], t_map=crop_map(record["maps"][0], view, hw, spec.map_size),
                            target=record["target"][0])
        item["image"] = render_view(sample.image, view, spec.input_size)
        return item


def build_loader(spec: StreamSpec, batch_size: int, workers: int) -> tuple[StudentStream, DataLoader]:
    """The stream and its DataLoader (workers fork before any store is opened)."""
    stream = StudentStream(spec)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=False,
                        persistent_workers=False, multiprocessing_context="fork" if workers else None)
    return stream, loader
