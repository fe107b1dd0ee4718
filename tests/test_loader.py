"""The student stream's stages, each alone, on tiny tar shards (no teacher, no cache: a fake store where needed)."""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from e2kd.pipeline._loader import (
    StreamSpec,
    StudentStream,
    _key_int,
    cycled,
    pass_index,
    shard_order,
    split_by_node,
    split_by_worker,
    teacher_maps,
)
from e2kd.pipeline._sources import InputShard, list_shards
from e2kd.pipeline._views import crop_map, draw_view


@dataclass(frozen=True)
class _Named:
    """What the shard-order stages read of a shard: its name."""

    name: str


def _named(n: int) -> list[_Named]:
    return [_Named(f"x{i}") for i in range(n)]


def _png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[InputShard]:
    """4 shards × 5 samples (8×8 PNG, cls = i % 3); shard 1 also holds an undecodable sample."""
    from webdataset import TarWriter

    root = tmp_path_factory.mktemp("loader")
    for s in range(4):
        with TarWriter(str(root / f"part-{s:02d}.tar")) as w:
            for i in range(5):
                w.write({"__key__": f"s{s}_{i}", "png": _png(10 * s + i), "cls": str(i % 3).encode()})
            if s == 1:
                w.write({"__key__": "s1_bad", "png": b"not an image", "cls": b"0"})
    return list_shards(f"{root}/part-{{00..03}}.tar")


def _keys(shards: list[InputShard]) -> set[str]:
    return {f"s{s}_{i}" for s in range(len(shards)) for i in range(5)}


def _spec(shards: list[InputShard], **kw) -> StreamSpec:
    return StreamSpec(shards=shards, keys=_keys(shards), input_size=(8, 8), flip_p=0.5, crop_scale=(0.3, 1.0),
                      shuffle_buffer=6, **kw)


def _take(stream: StudentStream, n: int) -> list[tuple[str, torch.Tensor]]:
    return [(item["key"], item["image"]) for item in islice(iter(stream), n)]


def _same(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    same_images = all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    return [k for k, _ in a] == [k for k, _ in b] and same_images


# ---- pass index ----------------------------------------------------------------------------------------------------

def test_pass_index_is_collision_free_and_cycle_zero_is_the_epoch() -> None:
    assert pass_index(0, 1000) != pass_index(1, 0)  # the old epoch * 1000 + cycle made these equal
    grid = {(e, c): pass_index(e, c) for e in range(60) for c in range(60)}
    assert len(set(grid.values())) == len(grid)
    assert all(pass_index(e, 0) == e for e in range(60))
    assert len({pass_index(e, c) for e in (0, 1, 999, 1000, 10**6) for c in (0, 1, 999, 1000, 1001)}) == 25
    with pytest.raises(ValueError):
        pass_index(-1, 0)


# ---- shard stages --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_shards_over_ranks_and_workers_are_a_disjoint_cover(world: int, workers: int) -> None:
    shards = _named(11)
    for epoch, cycle in ((0, 0), (3, 2)):
        order = shard_order(shards, 7, epoch, cycle)
        assert sorted(s.name for s in order) == sorted(s.name for s in shards)
        parts = [list(split_by_worker(split_by_node(order, r, world), w, workers))
                 for r in range(world) for w in range(workers)]
        names = [s.name for part in parts for s in part]
        assert len(names) == len(set(names)) == len(shards)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 + (world > 1 and workers > 1)  # round-robin twice: near even


def test_shard_order_depends_on_seed_epoch_and_cycle_only() -> None:
    shards = _named(12)
    cases = ((0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0))  # (seed, epoch, cycle)
    names = {args: [s.name for s in shard_order(shards, *args)] for args in cases}
    assert names[(0, 0, 0)] == [s.name for s in shard_order(list(reversed(shards)), 0, 0, 0)]
    assert len({tuple(v) for v in names.values()}) == 4


def test_the_specs_rank_wins_over_the_environment(shards: list[InputShard], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # webdataset's split_by_node would read these
    streams = [StudentStream(_spec(shards, rank=r, world_size=2)) for r in range(2)]
    mine = [{s.name for s in st.shards_for(0, 0)} for st in streams]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == {s.name for s in shards}
    with pytest.raises(ValueError):
        list(split_by_node([1, 2], 2, 2))


# ---- cycling ---------------------------------------------------------------------------------------------------

def test_cycled_repeats_passes_and_stops_on_an_empty_one() -> None:
    assert list(islice(cycled(lambda c: [(c, 0), (c, 1)], endless=True), 5)) == [(0, 0), (0, 1), (1, 0), (1, 1),
                                                                                    (2, 0)]
    assert list(cycled(lambda c: [c, c], endless=False)) == [0, 0]
    assert list(cycled(lambda c: [] if c == 2 else [c], endless=True)) == [0, 1]


# ---- join and items --------------------------------------------------------------------------------------------

class _FakeStore:
    """The store's reading surface: a K-view cache of ``shards[1]`` without key ``s1_4``."""

    def __init__(self, shards: list[InputShard], k: int, policy: str = "random_resized_crop") -> None:
        self.k, self.name = k, shards[1].name
        self.manifest = SimpleNamespace(replays_views=policy != "full", num_views=max(k, 1))
        self.shard_names = [self.name]

    def iter_shard(self, name: str):
        assert name == self.name
        for i in range(4):
            views = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * self.k) if self.k else torch.zeros(1, 5)
            yield f"s1_{i}", {"label": 7, "views": views, "logits": torch.arange(self.k or 1.0)[:, None] * 10,
                              "maps": torch.zeros(max(self.k, 1), 1, 4, 4), "target": torch.zeros(max(self.k, 1))}


def _with_store(stream: StudentStream, store: _FakeStore) -> StudentStream:
    stream._store, stream._store_pid = store, os.getpid()
    return stream


def test_samples_join_the_cache_and_skip_bad_unused_and_uncached_keys(shards: list[InputShard]) -> None:
    keys = _keys(shards) - {"s0_0"}
    stream = _with_store(StudentStream(StreamSpec(shards=shards[:2], keys=keys, input_size=(8, 8))),
                         _FakeStore(shards, 3))
    joined = {sample.key: record for sample, record in stream.samples(shards[:2])}
    # shard 0 is not cached: its samples come without a record; s1_4 is not in shard 1's cache; s1_bad is bad
    assert set(joined) == {"s0_1", "s0_2", "s0_3", "s0_4", "s1_0", "s1_1", "s1_2", "s1_3"}
    assert all((joined[k] is None) == k.startswith("s0") for k in joined)


def test_k_view_replay_uses_each_view_once_every_k_epochs(shards: list[InputShard]) -> None:
    k, seed = 4, 3  # with the old index (epoch * 1000 + cycle) a K dividing 1000 replayed one view forever
    stream = _with_store(StudentStream(StreamSpec(shards=shards, keys=_keys(shards), input_size=(8, 8), seed=seed)),
                         _FakeStore(shards, k))
    assert stream._replays_views()
    joined = list(stream.samples([shards[1]]))
    for sample, record in joined:
        views = [int(next(stream.items([(sample, record)], pass_index(e, 0)))["view_index"]) for e in range(k)]
        assert sorted(views) == list(range(k))
        assert views[0] == _key_int(seed, sample.key) % k
    item = next(stream.items(joined[:1], 2))
    assert torch.equal(item["t_logits"], torch.tensor([float(10 * int(item["view_index"]))]))
    assert item["label"] == 7 and item["image"].shape == (3, 8, 8)


def test_full_cache_draws_a_fresh_crop_per_pass(shards: list[InputShard]) -> None:
    stream = _with_store(StudentStream(StreamSpec(shards=shards, keys=_keys(shards), input_size=(8, 8),
                                                  crop_scale=(0.2, 0.5))), _FakeStore(shards, 0, policy="full"))
    assert not stream._replays_views()
    joined = list(stream.samples([shards[1]]))[:1]
    images = [next(stream.items(joined, pass_index(e, c)))["image"] for e, c in ((0, 0), (1, 0), (0, 1), (0, 1000))]
    assert all(int(next(stream.items(joined, 5))["view_index"]) == 0 for _ in range(2))
    assert sum(not torch.equal(images[0], im) for im in images[1:]) >= 2


def test_a_full_caches_joint_crop_handed_over_as_weights_equals_crop_map(shards: list[InputShard]) -> None:
    """The stream hands a full cache's crop over as each sample's snapped view (5 numbers, not a 224 px map);
    ``teacher_maps`` makes the whole batch's RoIAlign weights and gives each item's ``crop_map`` of its own (flipped or
    not) view."""
    store = _FakeStore(shards, 0, policy="full")
    maps = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    records = {k: {**r, "maps": maps[i:i + 1]} for i, (k, r) in enumerate(store.iter_shard(store.name))}
    store.iter_shard = lambda name: iter(records.items())
    spec = StreamSpec(shards=shards, keys=_keys(shards), input_size=(8, 8), crop_scale=(0.2, 0.6), flip_p=0.5,
                      map_size=(6, 5), seed=4)
    stream = _with_store(StudentStream(spec), store)
    joined = list(stream.samples([shards[1]]))
    items = [next(stream.items([pair], pass_index(1, 0))) for pair in joined]
    batch = torch.utils.data.default_collate(items)
    got = teacher_maps(batch, torch.device("cpu"))
    flips = set()
    for row, (sample, record) in enumerate(joined):
        hw = tuple(sample.image.shape[1:])
        view = draw_view(4, sample.key, pass_index(1, 0), *hw, (0.2, 0.6), (3 / 4, 4 / 3), 0.5)
        flips.add(view.flip)
        torch.testing.assert_close(got[row], crop_map(record["maps"][0], view.as_list(), hw, (6, 5)))
    assert got.shape == (4, 1, 6, 5) and flips == {False, True}


# ---- the whole stream ------------------------------------------------------------------------------------------

def test_the_stream_is_deterministic_per_seed_and_epoch_and_differs_between_epochs(shards: list[InputShard]) -> None:
    stream = StudentStream(_spec(shards, seed=1))
    first = _take(stream, 30)  # 20 usable samples: the stream cycles into a second pass
    again = _take(StudentStream(_spec(shards, seed=1, ram_cache_mb=0)), 30)  # RAM cache or not: same stream
    assert _same(first, again) and _same(first, _take(stream, 30))
    stream.set_epoch(1)
    other = _take(stream, 30)
    assert not _same(first, other)
    assert {k for k, _ in first} == {k for k, _ in other} == _keys(shards)
    assert not _same(first, _take(StudentStream(_spec(shards, seed=2)), 30))


def test_an_evaluation_pass_is_single_and_in_order(shards: list[InputShard]) -> None:
    spec = StreamSpec(shards=shards, keys=_keys(shards), input_size=(8, 8), random_crop=False, shuffle_buffer=1)
    items = list(StudentStream(spec))
    order = [s.name for s in shard_order(shards, 0, 0, 0)]
    assert [it["key"] for it in items] == sorted((it["key"] for it in items),
                                                 key=lambda k: (order.index(f"part-0{k[1]}"), k))
    assert len(items) == 20


def test_the_stream_pickles_without_its_process_state(shards: list[InputShard]) -> None:
    stream = StudentStream(_spec(shards, seed=4))
    stream.set_epoch(2)
    list(islice(iter(stream), 60))  # two full passes: the RAM cache holds decoded shards
    assert stream._decoded
    stream._store, stream._store_pid = object(), os.getpid()
    copy = pickle.loads(pickle.dumps(stream))
    assert copy.epoch == 2 and not copy._decoded and copy._store is None and copy.store is None  # no cache_uri
    stream._store = None
    assert _same(_take(stream, 25), _take(copy, 25))


def test_workers_split_the_shards_of_one_pass(shards: list[InputShard]) -> None:
    spec = StreamSpec(shards=shards, keys=_keys(shards), input_size=(8, 8), random_crop=False)
    loader = DataLoader(StudentStream(spec), batch_size=None, num_workers=2, multiprocessing_context="fork")
    keys = [item["key"] for item in loader]
    assert sorted(keys) == sorted(it["key"] for it in StudentStream(spec)) and len(keys) == 20


def test_the_next_shards_records_are_read_ahead_once_each(cache, train_urls: str, monkeypatch) -> None:
    """One pass reads every cached shard exactly once (the read-ahead is used, not repeated) and joins the same
    records as reading each shard when it is reached."""
    import threading

    from e2kd.pipeline._loader import StreamSpec, StudentStream
    from e2kd.storage._reader import CacheStore

    calls: list[tuple[str, str]] = []
    real = CacheStore.iter_shard

    def counting(self, name):
        calls.append((name, threading.current_thread().name))
        return real(self, name)

    monkeypatch.setattr(CacheStore, "iter_shard", counting)
    shards = list_shards(train_urls)
    spec = StreamSpec(shards=shards, keys={k for s in shards for k, _ in s.keys()}, input_size=(64, 64),
                      cache_uri=str(cache), ram_cache_mb=0)
    stream = StudentStream(spec)
    joined = [(sample.key, record["logits"]) for sample, record in stream.samples(stream.shards_for(0, 0))]
    assert len(joined) == 300 and sorted(n for n, _ in calls) == sorted(s.name for s in shards)
    assert sum(t.startswith("e2kd-prefetch") for _, t in calls) == len(shards) - 1  # all but the first, ahead
    direct = {k: r["logits"] for s in shards for k, r in real(stream.store, s.name)}
    assert all(torch.equal(direct[k], v) for k, v in joined)
