"""Hostile stores — self-consistent (checksums re-signed) but lying — get one `Error:` line from every command."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from e2kd.cli import main
from e2kd.storage._files import checksum_local_dir

SHARD = "train-000001"
KWARGS = json.dumps({"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16})


def _manifest(store: Path, change: Callable[[dict], None]) -> None:
    m = json.loads((store / "manifest.json").read_text())
    change(m)
    (store / "manifest.json").write_text(json.dumps(m))


def _resign(store: Path) -> None:
    """Recompute the shard's checksum into the manifest: the store is now self-consistent, only its content lies."""
    sha, nbytes = checksum_local_dir(store / "shards" / SHARD)

    def change(m: dict) -> None:
        m["shards"][SHARD].update(sha256=sha, bytes=nbytes)

    _manifest(store, change)


def _zarr_meta(store: Path, array: str, change: Callable[[dict], None]) -> None:
    path = store / "shards" / SHARD / "data.zarr" / array / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    _resign(store)


def _huge_rows(store: Path) -> None:
    def change(meta: dict) -> None:
        meta["shape"][0] = 10**9

    _zarr_meta(store, "logits", change)


def _huge_chunks(store: Path) -> None:
    def change(meta: dict) -> None:
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 10**11

    _zarr_meta(store, "maps", change)


def _rewrite_wds(store: Path, members: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]) -> None:
    path = store / "shards" / SHARD / "data.tar.gz"
    with tarfile.open(path, "r:gz") as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    rewritten = members(items)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in rewritten:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # a forger recomputes the row CRCs too: the checks behind them must hold on their own
    (path.parent / "members.json").write_text(json.dumps({"crc32": [zlib.crc32(d) for _, d in rewritten]}))
    _resign(store)


def _member(store: Path, row: int) -> str:
    """The tar member prefix of ``row`` in the shard: its key (or its number, for keys WebDataset cannot carry)."""
    from e2kd.storage._wds_store import member_key

    keys = json.loads((store / "shards" / SHARD / "keys.json").read_text())
    return member_key(keys[row], row) + "."


def _huge_npy_header(store: Path) -> None:
    _rewrite_wds(store, lambda items: _with_huge_header(items, _member(store, 3) + "e2kd.npy"))


def _with_huge_header(items: list[tuple[str, bytes]], target: str) -> list[tuple[str, bytes]]:
    out = []
    for name, data in items:
        if name == target:
            header = "{'descr': '<f2', 'fortran_order': False, 'shape': (1000000, 1000000), }"
            header += " " * (118 - len(header)) + "\n"
            data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 64
        out.append((name, data))
    return out


def _nan_logits(store: Path) -> None:
    arr = zarr.open_array(str(store / "shards" / SHARD / "data.zarr" / "logits"), mode="r+")
    arr[2, 0, 3] = np.nan
    _resign(store)


def _inf_maps(store: Path) -> None:
    arr = zarr.open_array(str(store / "shards" / SHARD / "data.zarr" / "maps"), mode="r+")
    arr[5, 0, 0, 1, 1] = np.inf
    _resign(store)


def _extra_key(store: Path) -> None:
    path = store / "shards" / SHARD / "keys.json"
    keys = json.loads(path.read_text())
    path.write_text(json.dumps([*keys, "phantom"]))
    _resign(store)

    def change(m: dict) -> None:
        m["shards"][SHARD]["num_samples"] += 1

    _manifest(store, change)


def _errors_dict(store: Path) -> None:
    (store / "shards" / SHARD / "errors.json").write_text(json.dumps({"key": "x"}))
    _resign(store)


def _lost_object(store: Path) -> None:
    """One array object deleted and the checksum re-signed: it would read as zeros (an all-zero teacher)."""
    (store / "shards" / SHARD / "data.zarr" / "logits" / "c" / "0" / "0" / "0").unlink()
    _resign(store)


def _wrong_target(store: Path) -> None:
    arr = zarr.open_array(str(store / "shards" / SHARD / "data.zarr" / "target"), mode="r+")
    arr[3, 0] = (int(arr[3, 0]) + 1) % 10
    _resign(store)


def _key_in_two_shards(store: Path) -> None:
    path = store / "shards" / SHARD / "keys.json"
    keys = json.loads(path.read_text())
    keys[0] = json.loads((store / "shards" / "train-000000" / "keys.json").read_text())[0]
    path.write_text(json.dumps(keys))
    _resign(store)


def _huge_keys(store: Path) -> None:
    """A key file of ~20 MB for a shard the manifest says holds 50 samples (re-signed)."""
    path = store / "shards" / SHARD / "keys.json"
    path.write_text(json.dumps([f"k{i:018d}" for i in range(1_000_000)]))
    _resign(store)


def _field(path: list[str], value: object, delete: bool = False) -> Callable[[Path], None]:
    def tamper(store: Path) -> None:
        def change(m: dict) -> None:
            node = m
            for part in path[:-1]:
                node = node[part]
            if delete:
                del node[path[-1]]
            else:
                node[path[-1]] = value

        _manifest(store, change)

    return tamper


CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "zarr.json claims 1e9 rows": ("zarr", _huge_rows, "shape"),
    "zarr.json claims 1e11-row chunks": ("zarr", _huge_chunks, "chunks"),
    "npy header declares 1e12 elements": ("wds", _huge_npy_header, "header"),
    "missing wds row": ("wds", lambda s: _rewrite_wds(s, lambda it: [x for x in it
                                                                      if not x[0].startswith(_member(s, 4))]),
                        "out of order"),
    "duplicated wds row": ("wds", lambda s: _rewrite_wds(s, lambda it: [*it[:10], *it[5:10], *it[10:]]),
                           "out of order"),
    "fewer rows than keys": ("zarr", _extra_key, "shape|not in --data"),
    "NaN logits": ("zarr", _nan_logits, "non-finite"),
    "inf maps": ("zarr", _inf_maps, "non-finite"),
    "errors.json is a dict": ("zarr", _errors_dict, "errors.json"),
    "unknown encoding key": ("zarr", _field(["encoding", "zstd_level"], 3), "encoding"),
    "num_classes a string": ("zarr", _field(["teacher", "num_classes"], "ten"), "num_classes"),
    "input_size missing": ("zarr", _field(["preprocessing", "input_size"], None, delete=True), "input_size"),
    "views without k": ("zarr", _field(["views", "k"], None, delete=True), "views.k"),
    "lost array object (re-signed)": ("zarr", _lost_object, "missing 1 of its"),
    "target is not the logits' top-1": ("zarr", _wrong_target, "top-1"),
    "a key in two shards": ("zarr", _key_in_two_shards, "also in shard|cached shards|is in shards"),
    "20 MB keys.json for 50 samples": ("zarr", _huge_keys, "more than"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_store_gets_one_error_line_from_every_command(case: str, pristine: dict[str, Path], digits: Path,
                                                              tmp_path: Path, fault_log) -> None:
    fmt, tamper, words = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(pristine[fmt], store)
    tamper(store)
    data = f"{digits}/train-{{000000..000001}}.tar"
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    from e2kd.models import create_model

    save_file(create_model("resnet18", 10, **json.loads(KWARGS)).state_dict(), weights)
    commands = {
        "verify": ["verify", str(store)],
        "train-student": ["train-student", "--data", data, "--cache", str(store), "--student", "resnet18",
                          "--student-kwargs", KWARGS, "--out", str(tmp_path / "run"), "--batch-size", "16",
                          "--epochs", "1", "--quiet"],
        "evaluate": ["evaluate", "--data", data, "--cache", str(store), "--student", "resnet18", "--student-kwargs",
                     KWARGS, "--weights", str(weights)],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (name, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, (name, result.output)
        assert any(w in lines[-1] for w in words.split("|")), (name, lines[-1])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run").exists()  # a refused run leaves no (empty) run directory
    inspect = CliRunner().invoke(main, ["inspect", str(store)])
    assert "Traceback" not in inspect.output and inspect.exit_code in (0, 1)
    fault_log.record("clear error")


def test_untrusted_key_files_are_refused_before_they_are_parsed(pristine: dict[str, Path], digits: Path,
                                                                  tmp_path: Path, fault_log) -> None:
    """What the manifest promises bounds what a reader allocates: inspect, the key listing and the student's plan
    refuse a 20 MB key file for 50 samples without reading it (peak traced memory far below the file's size)."""
    import tracemalloc

    from e2kd.pipeline._loader import plan_join
    from e2kd.pipeline._sources import list_shards
    from e2kd.stages._inspect import summarise_store
    from e2kd.storage import ManifestError, open_store

    store = tmp_path / "store"
    shutil.copytree(pristine["zarr"], store)
    _huge_keys(store)
    size = (store / "shards" / SHARD / "keys.json").stat().st_size
    shards = list_shards(f"{digits}/train-{{000000..000001}}.tar")
    reads = {"inspect": lambda: summarise_store(str(store)), "keys": lambda: list(open_store(str(store)).keys()),
             "plan": lambda: plan_join(shards, open_store(str(store)), labels=False)}
    for name, read in reads.items():
        tracemalloc.start()
        with pytest.raises(ManifestError, match="more than the .* the manifest allows; not read"):
            read()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < size // 4, (name, peak, size)
    fault_log.record("clear error")
