"""Old caches keep reading: small stores written by e2kd 0.2.0 (committed under tests/fixtures/stores, made by
tests/fixtures/make_old_stores.py before shard markers existed and while Zarr skipped all-zero chunks) decode to the
very columns they were written from, verify, copy with their cache id, and resume without losing a shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from e2kd.storage import copy_store, create_store, open_store

FIXTURES = Path(__file__).parent / "fixtures" / "stores"
IDS = json.loads((FIXTURES / "cache_ids.json").read_text())["cache_ids"]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "expected.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def old_store(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A private copy of one committed store (tests never touch the committed files)."""
    store = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param, store)
    return store


@pytest.mark.parametrize("old_store", sorted(IDS), indirect=True)
def test_an_old_store_reads_the_columns_it_was_written_from(old_store: Path, expected: dict[str, np.ndarray]) -> None:
    name = old_store.name
    store = open_store(str(old_store))
    assert store.cache_id == IDS[name] and store.verify() == []
    if name == "zarr-full":  # the old writer skipped the all-zero labels chunk of shard b: still reads (zeros)
        assert not (old_store / "shards" / "b" / "data.zarr" / "labels" / "c").exists()
    compared = 0
    for shard in store.shard_names:
        keys, cols = store.shard_columns(shard)
        for row, key in enumerate(keys):
            for column, values in cols.items():
                np.testing.assert_array_equal(values[row], expected[f"{name}|{key}|{column}"])
                compared += 1
    assert compared == sum(1 for k in expected if k.startswith(f"{name}|"))
    record = store.read(keys[0])  # decoding path: the target is the top-1 of the rebuilt logits
    assert record["logits"].shape[0] == store.manifest.num_views
    assert (record["logits"].argmax(-1) == record["target"]).all()


@pytest.mark.parametrize("old_store", sorted(IDS), indirect=True)
def test_an_old_store_copies_with_its_id_and_resumes_without_losing_a_shard(old_store: Path, tmp_path: Path) -> None:
    name = old_store.name
    report = copy_store(str(old_store), str(tmp_path / "copy"))
    assert report.cache_id == IDS[name] and open_store(str(tmp_path / "copy")).cache_id == IDS[name]
    before = open_store(str(old_store))
    with create_store(str(old_store), before.manifest) as writer:  # resume: its (unmarked) recorded shards stay
        assert writer.complete == set(before.shard_names)
    after = open_store(str(old_store))
    assert after.cache_id == IDS[name] and after.verify() == []
