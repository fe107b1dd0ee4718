"""The student's stream: input shards joined with cached teacher outputs by key, views replayed, batched.

Stages (webdataset ``DataPipeline`` stages, each testable alone): shards of this rank/worker (:func:`shard_order`,
:func:`split_by_node`, :func:`split_by_worker`) → decoded samples ⋈ cached records by key
(:meth:`StudentStream.samples`) → view replay (K-view cache) or joint crop (``full`` cache)
(:meth:`StudentStream.items`), passes repeated while a rank runs short (:func:`cycled`) → seeded shuffle buffer
(``webdataset.filters.shuffle``) → DataLoader batching. The store is opened lazily inside each DataLoader worker
(zarr's threads do not survive fork).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import count, islice
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.pipeline import DataPipeline

from e2kd.pipeline._sources import (
    BadSample,
    EncodedImage,
    InputShard,
    Sample,
    input_size_bytes,
    iter_keys,
    iter_shard,
    local_copy,
)
from e2kd.pipeline._views import (
    FULL_VIEW,
    apply_crop,
    crop_weights_batch,
    draw_view,
    pixel_view,
    render_view,
    render_view_uint8,
    resample_dtype,
)
from e2kd.storage import CacheStore
from e2kd.storage._local_cache import LocalCache

__all__ = ["JoinPlan", "plan_join", "key_mismatch_message", "StreamSpec", "StudentStream", "build_loader",
           "select_shots", "cache_resample_dtype", "teacher_maps", "pass_index",
           "shard_order", "split_by_node", "split_by_worker", "cycled"]

T = TypeVar("T")


@dataclass
class JoinPlan:
    """What joining the input with a cache gives, computed once before training (no image decoding)."""

    keys: dict[str, int | None]  # usable key → label (None: not read — a trusted shard, labels not asked for)
    shard_counts: dict[str, int]  # input shard → usable samples
    cache_bad: int = 0  # recorded as bad by the cache: skipped
    missing_in_cache: list[str] = field(default_factory=list)
    missing_in_input: list[str] = field(default_factory=list)
    unused_cache_shards: list[str] = field(default_factory=list)  # cached shards --data does not name
    trusted: list[str] = field(default_factory=list)  # input shards whose keys came from the cache's key index

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def keys_by_shard(self, keep: Container[str] | None = None) -> dict[str, list[str]]:
        """The usable keys of each input shard in stored order (``keep``: only those), shards with none left out."""
        out, keys = {}, iter(self.keys)
        for name, n in self.shard_counts.items():
            mine = [k for k in islice(keys, n) if keep is None or k in keep]
            if mine:
                out[name] = mine
        return out


def plan_join(shards: list[InputShard], store: CacheStore | None, allow_missing: bool = False,
              labels: bool = True) -> JoinPlan:
    """Match the input's keys with the cache, in O(number of shards) where the input is the one cached.

    An input shard whose size equals the size recorded when it was cached is trusted: its keys (and, with
    ``labels``, their labels) come from the cache's key index — one ``size`` call, no read of the tar. Only the
    other shards are listed (a full read). The stream still checks a trusted shard's keys as it reads it
    (:meth:`StudentStream.samples`).

    Raises:
        ValueError: (unless ``allow_missing``) input keys the cache neither holds nor recorded as bad, or
            cached keys of the input's shards that are not in the input.
    """
    if store is None:
        keys: dict[str, int | None] = {}
        counts: dict[str, int] = {}
        for shard in shards:
            listed = dict(iter_keys(shard))
            keys.update(listed)
            counts[shard.name] = len(listed)
        return JoinPlan(keys, counts)
    plan = JoinPlan({}, {})
    named = {s.name for s in shards}
    with ThreadPoolExecutor(_PLAN_THREADS, thread_name_prefix="e2kd-plan") as pool:  # requests overlap: latency
        looked = list(pool.map(lambda shard: _look_up(shard, store, labels), shards))
    for shard, (trusted, errors, cached) in zip(shards, looked, strict=True):
        if trusted:
            plan.trusted.append(shard.name)
            usable = cached
            plan.cache_bad += sum(1 for e in errors if "kept" not in e and e["key"] != "*")
        else:
            usable = _listed_join(shard, store, errors, plan, cached)
        _check_no_duplicate(usable, plan, shard, list(zip(shards, looked, strict=True)), store)
        plan.keys.update(usable)
        plan.shard_counts[shard.name] = len(usable)
    plan.unused_cache_shards = [n for n in store.shard_names if n not in named]
    if not allow_missing and (plan.missing_in_cache or plan.missing_in_input):
        raise ValueError(key_mismatch_message(plan.missing_in_cache, plan.missing_in_input))
    return plan


def _check_no_duplicate(usable: dict[str, Any], plan: JoinPlan, shard: InputShard,
                        looked: list[tuple[InputShard, tuple[bool, Any, dict[str, Any]]]], store: CacheStore) -> None:
    """A key already planned from another shard: named, with the side (cache or --data) that holds it twice."""
    dup = next((k for k in usable if k in plan.keys), None)
    if dup is None:
        return
    cached = [n for n in store.shard_names if dup in set(store.shard_keys(n))]
    if len(cached) > 1:
        raise ValueError(f"cache {store.uri}: key {dup!r} is in cached shards {cached[0]} and {cached[1]}: keys are "
                         f"unique in a cache; the cache is damaged (e2kd verify lists every duplicate)")
    other = next((s.name for s, (_, _, keys) in looked if s.name in plan.shard_counts and dup in keys), "?")
    raise ValueError(f"--data: key {dup!r} is in input shards {other} and {shard.name}: keys must be unique across "
                     f"the dataset")


def key_mismatch_message(missing_in_cache: Sequence[str], missing_in_input: Sequence[str]) -> str:
    """The one-line error for keys on one side only (the plan's and the stream's)."""
    what = (f"{len(missing_in_cache)} input key(s) have no cached output (e.g. {list(missing_in_cache)[:3]})"
            if missing_in_cache else
            f"{len(missing_in_input)} cached key(s) are not in --data (e.g. {list(missing_in_input)[:3]})")
    return f"keys: {what}; is --data the dataset the cache was built from? --allow-missing skips and counts them"


_PLAN_THREADS = 16  # concurrent per-shard look-ups while planning (object storage: a few requests per shard)


def _look_up(shard: InputShard, store: CacheStore, labels: bool) -> tuple[bool, list[dict[str, str]], dict[str, Any]]:
    """One shard's part of the plan: ``(trusted, cached errors, cached key → label)`` — or, for a shard that is not
    trusted, its input keys listed (a full read)."""
    cached_shard = shard.name in store.shard_names
    errors = store.shard_errors(shard.name) if cached_shard else []
    if _trusted(shard, store):
        keys = store.shard_keys(shard.name)
        values = store.shard_labels(shard.name) if labels else [None] * len(keys)
        return True, errors, dict(zip(keys, values, strict=True))
    return False, errors, dict(iter_keys(shard))


def _trusted(shard: InputShard, store: CacheStore) -> bool:
    """The shard was cached from an input of exactly this size (one ``size`` call)."""
    rec = store.manifest.shards.get(shard.name)
    if rec is None or not rec.complete or rec.source_bytes is None:
        return False
    return input_size_bytes(shard) == rec.source_bytes


def _listed_join(shard: InputShard, store: CacheStore, errors: list[dict[str, str]], plan: JoinPlan,
                 input_keys: dict[str, int]) -> dict[str, int]:
    """Match a listed shard's keys with the cache; mismatches go into ``plan``."""
    bad = {e["key"] for e in errors if "kept" not in e}
    unlabelled = {e["key"] for e in errors if "kept" in e}  # cached with a label outside [0, C): now −1
    index = store.index
    usable = {k: (-1 if k in unlabelled else v) for k, v in input_keys.items() if k in index and k not in bad}
    plan.cache_bad += sum(1 for k in input_keys if k in bad)
    plan.missing_in_cache += [k for k in input_keys if k not in index and k not in bad]
    cached_here = store.shard_keys(shard.name) if shard.name in store.shard_names else []
    plan.missing_in_input += [k for k in cached_here if k not in input_keys]
    return usable


def teacher_maps(batch: dict[str, Any], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A batch's teacher maps on ``device``, float32: a K-view cache's as cached; a ``full`` cache's whole-image maps
    with their joint crop applied here, on the device (the stream hands over each sample's pixel-snapped view,
    ``crop_view``, and the crop's output size, ``crop_size``; the RoIAlign weights are made here for the whole
    batch: :func:`~e2kd.pipeline._views.crop_weights_batch`). Several teachers' caches: a list, one batch of maps per
    teacher (one view, each teacher's own map size)."""
    if isinstance(batch["t_map"], list):
        crop = {k: v for k, v in batch.items() if k.startswith("crop_")}
        return [_one_teacher_maps({**crop, "t_map": maps}, device) for maps in batch["t_map"]]
    return _one_teacher_maps(batch, device)


def _one_teacher_maps(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    maps = batch["t_map"].to(device).float()
    if "crop_view" in batch:
        out_h, out_w = (int(v) for v in batch["crop_size"][0])
        rows, cols = crop_weights_batch(batch["crop_view"], (int(maps.shape[-2]), int(maps.shape[-1])),
                                        (out_h, out_w) if out_h and out_w else None)
        return apply_crop(maps, rows.to(device), cols.to(device))
    return maps


def join_records(first: dict[str, Any], others: list[dict[str, Any]], allow_missing: bool = False) -> dict[str, Any]:
    """Records of one shard from several teachers' caches, joined by key: ``logits [V, T, C]``, ``target [V, T]``,
    ``maps`` a list of ``[V, …]`` (one per teacher; shapes may differ); views and label from the first cache.

    Raises:
        ValueError: a key in one cache only (unless ``allow_missing``: dropped).
    """
    joined = {}
    for key, record in first.items():
        found = [o.get(key) for o in others]
        if any(r is None for r in found):
            if allow_missing:
                continue
            raise ValueError(f"key {key!r} is in the first --cache but not in every other: the caches are not of "
                             f"the same inputs (--allow-missing skips such keys)")
        rows = [record, *found]
        joined[key] = {**record, "logits": torch.stack([r["logits"] for r in rows], 1),
                       "target": torch.stack([r["target"] for r in rows], 1), "maps": [r["maps"] for r in rows]}
    extra = next((k for o in others for k in o if k not in first), None)
    if extra is not None and not allow_missing:
        raise ValueError(f"key {extra!r} is in a later --cache but not in the first: the caches are not of the same "
                         f"inputs (--allow-missing skips such keys)")
    return joined


def cache_resample_dtype(manifest: Any) -> str:
    """How a cache's views were resampled (``uint8``, or ``float32`` before e2kd 0.2): the stream renders the same.

    Raises:
        CompatibilityError: rendered some other way, so its views could not be replayed exactly.
    """
    from e2kd.storage import CompatibilityError

    try:
        return resample_dtype(manifest.preprocessing.get("render"))
    except ValueError as e:
        raise CompatibilityError(f"cache: {e}") from None


def select_shots(keys: dict[str, int | None], shots: int, seed: int) -> dict[str, int]:
    """``shots`` keys per class (label ≥ 0), drawn with ``seed``; classes with fewer keep all."""
    by_class: dict[int, list[str]] = {}
    for key, label in sorted(keys.items()):
        if label is not None and label >= 0:
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
    trusted: frozenset[str] = frozenset()  # shards planned from the cache's key index: keys checked while read
    allow_missing: bool = False  # a trusted shard's key on one side only: skipped and counted, not an error
    expl_field: str | None = None  # the cache's explanation field the student matches (None: its default, first)
    extra_cache_uris: tuple[str, ...] = ()  # further teachers' caches of the same inputs, joined by key
    #: the shards of each cache (first, then extras) when the run planned: every process reads that same view,
    #: even while a writer commits more (None: whatever each process finds)
    cache_shards: tuple[tuple[str, ...], ...] | None = None
    local_cache: LocalCache | None = None  # remote cache and input shards kept on local disk across epochs
    #: images leave the workers encoded (bytes, their view, their size from the header) and are decoded and rendered
    #: on the training device (:mod:`e2kd.pipeline._device_images`): train-student's ``--decode-on-device``
    decode_on_device: bool = False


def _key_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little")


# ---- stages that need no store: plain functions, testable alone ----------------------------------------------


def pass_index(epoch: int, cycle: int) -> int:
    """The view index of pass ``cycle`` of ``epoch``: a bijection of ``(epoch ≥ 0, cycle ≥ 0)`` onto the integers.

    Cycle 0 (every rank's first pass) gives ``epoch`` itself, so a K-view cache replays its views in turn:
    view ``(hash(seed, key) + epoch) % K`` uses each cached view once every K epochs. The extra passes of a rank
    that ran short (cycle ≥ 1) go to the negative integers, ``-1 - cantor(epoch, cycle - 1)``, so no two passes
    share an index (the former ``epoch * 1000 + cycle`` made epoch 0 cycle 1000 equal epoch 1 cycle 0, and with
    K dividing 1000 it replayed the same view every epoch). Both users take any int: ``% K`` and
    :func:`~e2kd.pipeline._views.draw_view` (which hashes its decimal form).
    """
    if epoch < 0 or cycle < 0:
        raise ValueError(f"epoch and cycle must be >= 0, got {epoch}, {cycle}")
    if cycle == 0:
        return epoch
    s = epoch + cycle - 1  # Cantor pairing of (epoch, cycle - 1)
    return -1 - (s * (s + 1) // 2 + cycle - 1)


def shard_order(shards: Sequence[InputShard], seed: int, epoch: int, cycle: int) -> list[InputShard]:
    """All shards in an order that depends on ``(seed, epoch, cycle)`` only (identical on every rank and worker)."""
    return sorted(shards, key=lambda s: _key_int(seed, epoch, cycle, s.name))


def split_by_node(src: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """This rank's slice: every ``world_size``-th item from ``rank`` (webdataset's ``split_by_node`` rule).

    webdataset's own stage takes rank and world size from ``$RANK``/``$WORLD_SIZE`` or ``torch.distributed``;
    here the spec's explicit values always win (tests and single-process DDP simulations set them alone).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return islice(src, rank, None, world_size)


def split_by_worker(src: Iterable[T], worker: int | None = None, num_workers: int | None = None) -> Iterator[T]:
    """This DataLoader worker's slice (webdataset's ``split_by_worker`` rule); by default from ``get_worker_info``.

    webdataset's stage would prefer ``$WORKER``/``$NUM_WORKERS`` when set; only the DataLoader's own worker info
    is used here, so the split cannot disagree with the worker id the shuffle rng is seeded with.
    """
    if worker is None or num_workers is None:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return islice(src, worker, None, num_workers)


def cycled(one_pass: Callable[[int], Iterable[T]], endless: bool) -> Iterator[T]:
    """Passes 0, 1, 2, … of ``one_pass(cycle)`` (one pass only unless ``endless``); stops after an empty pass.

    A training stream is endless: a rank whose shards hold fewer samples than its steps need starts over (with a
    new shard order and new views), and the trainer decides where an epoch ends.
    """
    for cycle in count():
        produced = 0
        for item in one_pass(cycle):
            produced += 1
            yield item
        if produced == 0 or not endless:
            return  # nothing to cycle (no usable samples here), or a single evaluation pass


class StudentStream(IterableDataset):
    """Endless stream (one pass per epoch over this rank's shards, cycled when a rank runs short).

    Built per ``iter()`` as webdataset stages (``DataPipeline``), since the epoch and the DataLoader worker are only
    known then::

        cycled(pass c: shards_for(epoch, c) → samples → items(pass_index(epoch, c))) → shuffle

    The object itself holds only the spec and the epoch (plus per-process caches that pickling drops), so it
    pickles into DataLoader workers as is. The order is a function of (seed, epoch, rank, worker) alone.
    """

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec, self.epoch = spec, 0
        self._store: Any = None
        self._store_pid: int | None = None
        self._decoded: dict[str, tuple[list[Sample | BadSample], dict[str, Any] | None]] = {}
        self._decoded_bytes = 0
        self._pending: dict[str, Any] = {}  # shard → Future of its cached records (read one shard ahead)
        self._pool: Any = None
        self._pool_pid: int | None = None
        self._resample: str | None = None  # how the cache's views were resampled (see _render)

    def __getstate__(self) -> dict[str, Any]:
        # an open store (zarr threads, file handles), the prefetch thread and the RAM cache of decoded images stay
        # in their process
        return {**self.__dict__, "_store": None, "_store_pid": None, "_decoded": {}, "_decoded_bytes": 0,
                "_pending": {}, "_pool": None, "_pool_pid": None, "_extra": None}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def store(self) -> Any:
        """The cache, opened lazily in the process that reads it (a forked worker opens its own)."""
        if self.spec.cache_uri is not None and self._store_pid != os.getpid():
            from e2kd.storage import open_store

            # never used across fork: zarr's threads do not survive it, so a child reopens instead of inheriting
            self._store = open_store(self.spec.cache_uri, shards=self._pin(0), local_cache=self.spec.local_cache)
            self._store_pid = os.getpid()
        return self._store

    @property
    def extra_stores(self) -> list[Any]:
        """The further teachers' caches, opened lazily in the process that reads them (as :attr:`store`)."""
        extra = getattr(self, "_extra", None)
        if self.spec.extra_cache_uris and (extra is None or extra[0] != os.getpid()):
            from e2kd.storage import open_store

            self._extra = (os.getpid(), [open_store(uri, shards=self._pin(i + 1), local_cache=self.spec.local_cache)
                                         for i, uri in enumerate(self.spec.extra_cache_uris)])
        return self._extra[1] if self.spec.extra_cache_uris else []

    def _pin(self, i: int) -> tuple[str, ...] | None:
        return self.spec.cache_shards[i] if self.spec.cache_shards is not None else None

    def _replays_views(self) -> bool:
        """The cache holds K views to replay exactly (else ``full``: one whole-image view, cropped jointly)."""
        return self.store.manifest.replays_views

    def _render(self, image: torch.Tensor, view: list[float]) -> torch.Tensor:
        """The view as the cache's teacher saw it: uint8 (today's caches, and no cache), or float32 in ``[0, 1]``
        for caches rendered before the resampling moved to uint8."""
        if self._resample is None:  # asked once per process: the manifest does not change
            self._resample = cache_resample_dtype(self.store.manifest) if self.spec.cache_uri is not None else "uint8"
        if self._resample == "float32":
            return render_view(image, view, self.spec.input_size, dtype="float32")
        return render_view_uint8(image, view, self.spec.input_size)

    # ---- the stages ------------------------------------------------------------------------------------------

    def shards_for(self, epoch: int, cycle: int) -> list[InputShard]:
        """This rank's and this DataLoader worker's shards for pass ``cycle`` of ``epoch``, in order."""
        order = shard_order(self.spec.shards, self.spec.seed, epoch, cycle)
        return list(split_by_worker(split_by_node(order, self.spec.rank, self.spec.world_size)))

    def samples(self, shards: Iterable[InputShard]) -> Iterator[tuple[Sample, dict[str, Any] | None]]:
        """Decoded samples joined with their cached record (None without a cache for the shard).

        Skipped: bad samples, keys outside ``spec.keys`` (bad in the cache, not chosen by ``--shots``) and, where
        the shard is cached, keys the cache does not hold (``--allow-missing``).
        """
        shards = list(shards)
        for i, shard in enumerate(shards):
            decoded, records = self._shard_data(shard)  # takes this shard's prefetched records
            if i + 1 < len(shards):
                self._prefetch(shards[i + 1])  # the next shard's cached records arrive while this one is decoded
            check = _KeyCheck(shard.name, records, self.store, self.spec.allow_missing) \
                if shard.name in self.spec.trusted and records is not None else None
            for sample in decoded:
                if isinstance(sample, BadSample):
                    continue
                if check is not None:
                    check.saw(sample.key)
                if sample.key not in self.spec.keys or (records is not None and sample.key not in records):
                    continue
                yield sample, records[sample.key] if records is not None else None
            if check is not None:
                check.done()

    def items(self, joined: Iterable[tuple[Sample, dict[str, Any] | None]], index: int) -> Iterator[dict[str, Any]]:
        """Training items: the view of pass ``index`` (see :func:`pass_index`) rendered, with teacher outputs."""
        replay: bool | None = None  # asked once, on the first cached record (no store is opened without one)
        for sample, record in joined:
            if record is not None and replay is None:
                replay = self._replays_views()
            yield self._item(sample, record, index, bool(replay))

    def _one_pass(self, cycle: int) -> Iterator[dict[str, Any]]:
        # the shard list is a callable source: DataPipeline would splice a list argument in as stages
        return iter(DataPipeline(partial(self.shards_for, self.epoch, cycle), self.samples,
                                 partial(self.items, index=pass_index(self.epoch, cycle))))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        shuffle = None  # a buffer of ≤ 1 keeps the order (evaluation): no stage
        if spec.shuffle_buffer > 1:
            # seeded per (seed, epoch, rank, worker): the stream is reproducible (resume) yet differs per worker;
            # initial=bufsize fills the buffer before the first item leaves it
            rng = random.Random(_key_int("shuffle", spec.seed, self.epoch, spec.rank,
                                         getattr(get_worker_info(), "id", 0)))
            shuffle = wds_shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=rng)
        return iter(DataPipeline(partial(cycled, self._one_pass, spec.random_crop), shuffle))

    # ---- decoding (with the in-process RAM cache) and one item ----------------------------------------------------

    def _shard_data(self, shard: InputShard) -> tuple[Iterator[Sample | BadSample], dict[str, Any] | None]:
        """Decoded samples and cached records of a shard; kept in RAM across epochs when running in-process."""
        if shard.name in self._decoded:
            samples, records = self._decoded[shard.name]
            return iter(samples), records
        records = self._records(shard)
        if get_worker_info() is not None or self.spec.ram_cache_mb <= 0:
            return iter_shard(self.local(shard)), records
        return self._decode_and_keep(shard, records), records

    def local(self, shard: InputShard) -> InputShard:
        """The shard as read here: from the local cache where one is set and the shard is remote."""
        return local_copy(shard, self.spec.local_cache)

    def _records(self, shard: InputShard) -> dict[str, Any] | None:
        """The cached records of a shard (None where the cache has none): the prefetched ones, else read now."""
        pending = self._pending.pop(shard.name, None)
        if pending is not None:
            return pending.result()  # an error in the prefetch (a damaged shard) is raised here, as a read would
        if self.store is None or shard.name not in self.store.shard_names:
            return None
        return self._read_records(shard.name)

    def _read_records(self, name: str) -> dict[str, Any]:
        """``key → record`` of one cached shard, the maps of the chosen explanation field; with several teachers'
        caches their records joined by key (:func:`join_records`)."""
        field = self.spec.expl_field
        records = dict(self.store.iter_shard(name) if field is None else self.store.iter_shard(name, field))
        if not self.spec.extra_cache_uris:
            return records
        others = [dict(store.iter_shard(name) if field is None else store.iter_shard(name, field))
                  for store in self.extra_stores]
        return join_records(records, others, self.spec.allow_missing)

    def _prefetch(self, shard: InputShard) -> None:
        """Start reading a shard's cached records in a background thread (one shard ahead; object storage)."""
        if self.store is None or shard.name not in self.store.shard_names or shard.name in self._pending or \
                shard.name in self._decoded:
            return
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(1, thread_name_prefix="e2kd-prefetch"), os.getpid()
        # only this one is pending: the current shard's was taken, and a pass that stopped early leaves no other use
        self._pending = {shard.name: self._pool.submit(self._read_records, shard.name)}

    def _decode_and_keep(self, shard: InputShard, records: dict[str, Any] | None) -> Iterator[Sample | BadSample]:
        kept: list[Sample | BadSample] = []
        for sample in iter_shard(self.local(shard)):
            kept.append(sample)
            yield sample
        # reached only after a full pass: a shard the trainer stopped reading midway is decoded again next time
        nbytes = sum(s.image.numel() for s in kept if isinstance(s, Sample) and isinstance(s.image, torch.Tensor))
        if self._decoded_bytes + nbytes <= self.spec.ram_cache_mb * 2**20:
            self._decoded[shard.name] = (kept, records)
            self._decoded_bytes += nbytes

    def _item(self, sample: Sample, record: dict[str, Any] | None, index: int, replay: bool) -> dict[str, Any]:
        spec, hw = self.spec, (int(sample.image.shape[1]), int(sample.image.shape[2]))
        label = record["label"] if record is not None else sample.label  # the cache's label: −1 where it was bad
        item: dict[str, Any] = {"key": sample.key, "label": torch.tensor(label)}
        if record is not None and replay:  # K-view cache: replay one cached view exactly
            v = (_key_int(spec.seed, sample.key) + index) % record["views"].shape[0] if spec.random_crop else 0
            view = record["views"][v].tolist()
            t_map = [m[v] for m in record["maps"]] if isinstance(record["maps"], list) else record["maps"][v]
            item.update(view_index=torch.tensor(v), t_logits=record["logits"][v], t_map=t_map,
                        target=record["target"][v])
        else:
            view = (draw_view(spec.seed, sample.key, index, *hw, spec.crop_scale, spec.crop_ratio, spec.flip_p)
                    if spec.random_crop else FULL_VIEW).as_list()
            item["view_index"] = torch.tensor(0)
            if record is not None:  # full cache: joint crop of the cached map (by teacher_maps), logits reused
                several = isinstance(record["maps"], list)  # several teachers: each map cropped alike
                snapped = pixel_view(view, *hw)
                item.update(t_logits=record["logits"][0], target=record["target"][0],
                            t_map=[m[0] for m in record["maps"]] if several else record["maps"][0],
                            crop_view=torch.tensor([snapped.top, snapped.left, snapped.height, snapped.width,
                                                    float(snapped.flip)], dtype=torch.float64),
                            crop_size=torch.tensor(spec.map_size or (0, 0)))
        if isinstance(sample.image, EncodedImage):  # decoded and rendered on the training device
            item.update(encoded=sample.image.data, view=torch.tensor(view, dtype=torch.float64),
                        jpeg=torch.tensor(sample.image.jpeg))
        else:
            item["image"] = self._render(sample.image, view)
        return item


class _KeyCheck:
    """The keys of a shard planned from the cache's key index, checked as the shard is read: a key in the input but
    not in the cache (nor recorded as bad), or cached but absent from the input, stops the run with the plan's
    error — or, with ``--allow-missing``, is skipped and counted (one warning per shard)."""

    def __init__(self, shard: str, records: dict[str, Any], store: CacheStore, allow_missing: bool) -> None:
        self.shard, self.records, self.allow_missing = shard, records, allow_missing
        self.bad = {e["key"] for e in store.shard_errors(shard)}
        self.seen: set[str] = set()
        self.extra: list[str] = []

    def saw(self, key: str) -> None:
        self.seen.add(key)
        if key not in self.records and key not in self.bad:
            self.extra.append(key)
            if not self.allow_missing:
                raise ValueError(key_mismatch_message(self.extra, []))

    def done(self) -> None:
        """After a whole pass over the shard: cached keys never seen."""
        absent = [k for k in self.records if k not in self.seen]
        if absent and not self.allow_missing:
            raise ValueError(key_mismatch_message([], absent))
        if absent or self.extra:
            import warnings

            warnings.warn(f"input shard {self.shard}: {len(self.extra)} key(s) not in the cache and {len(absent)} "
                          f"cached key(s) not in the input, skipped (--allow-missing)", UserWarning, stacklevel=2)


def build_loader(spec: StreamSpec, batch_size: int, workers: int) -> tuple[StudentStream, DataLoader]:
    """The stream and its DataLoader (workers fork before any store is opened)."""
    stream = StudentStream(spec)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=False,
                        persistent_workers=False, multiprocessing_context="fork" if workers else None)
    return stream, loader
