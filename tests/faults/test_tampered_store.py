"""Never train on data that `verify` would reject: tampered stores stop verify, train-student and evaluate."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from e2kd.cli import main
from e2kd.storage import _wds_store as wds_store
from e2kd.storage._files import resolve

STUDENT = ["--student", "resnet18", "--student-kwargs",
           json.dumps({"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16})]


def _largest_chunk(store: Path) -> Path:
    files = [p for p in (store / "shards" / "train-000001").rglob("*") if p.is_file() and "/c/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPER = {
    "deleted chunk": ("zarr", lambda s: _largest_chunk(s).unlink()),
    "truncated chunk": ("zarr", lambda s: _largest_chunk(s).write_bytes(_largest_chunk(s).read_bytes()[:-7])),
    "flipped chunk byte": ("zarr", lambda s: _flip(_largest_chunk(s))),
    "extra file": ("zarr", lambda s: (s / "shards" / "train-000001" / "data.zarr" / "extra.bin").write_bytes(b"x")),
    "flipped wds byte": ("wds", lambda s: _flip(s / "shards" / "train-000001" / "data.tar.gz", 2000)),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_store_stops_verify_training_and_evaluation(case: str, pristine: dict[str, Path], digits: Path,
                                                             tmp_path: Path, fault_log) -> None:
    fmt, tamper = TAMPER[case]
    store = tmp_path / "store"
    shutil.copytree(pristine[fmt], store)
    tamper(store)
    runner = CliRunner()
    result = runner.invoke(main, ["verify", str(store)])
    assert result.exit_code != 0 and "train-000001" in result.output
    data = f"{digits}/train-{{000000..000001}}.tar"
    run = tmp_path / "run"
    result = runner.invoke(main, ["train-student", "--data", data, "--cache", str(store), *STUDENT, "--out", str(run),
                                  "--batch-size", "16", "--epochs", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: store ") and "shard train-000001" in line and "Traceback" not in result.output
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.pt").exists()
    for workers in ("0", "1"):  # also when the shard is read inside a DataLoader worker
        result = runner.invoke(main, ["evaluate", "--data", data, "--cache", str(store), *STUDENT[:2], "--weights",
                                      str(_any_weights(tmp_path)), "--student-kwargs", STUDENT[3],
                                      "--workers", workers])
        assert result.exit_code == 1, result.output
        assert "shard train-000001" in result.output and "Traceback" not in result.output
    fault_log.record("clear error")


def _any_weights(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from e2kd.models import create_model

    path = tmp_path / "student.safetensors"
    if not path.exists():
        save_file(create_model("resnet18", 10, **json.loads(STUDENT[3])).state_dict(), path)
    return path


def test_verify_checks_counts_against_the_manifest(pristine: dict[str, Path], tmp_path: Path, fault_log) -> None:
    store = tmp_path / "store"
    shutil.copytree(pristine["zarr"], store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"]["train-000000"]["num_samples"] += 4  # claims more samples than the shard holds
    (store / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert result.exit_code != 0 and "train-000000" in result.output and "54 samples" in result.output
    result = CliRunner().invoke(main, ["inspect", str(store)])  # never over-reports
    assert result.exit_code == 1 and "train-000000" in result.output and "54" in result.output
    fault_log.record("clear error")


def test_wds_reader_refuses_duplicated_or_missing_rows(tmp_path: Path, fault_log) -> None:
    def shard(rows: list[int]) -> str:
        d = tmp_path / "-".join(map(str, rows))
        d.mkdir()
        with tarfile.open(d / wds_store.DATA_NAME, "w") as tar:
            for row in rows:
                buf = io.BytesIO()
                np.save(buf, np.array([row], dtype=np.int32), allow_pickle=False)
                info = tarfile.TarInfo(f"{row:08d}.labels.npy")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
        return resolve(d)[1]

    fs = resolve(tmp_path)[0]
    assert wds_store.read_columns(fs, shard([0, 1, 2]), ["labels"])["labels"].ravel().tolist() == [0, 1, 2]
    for rows in ([0, 1, 1, 2], [0, 2], [1]):
        with pytest.raises(ValueError, match="out of order"):
            wds_store.read_columns(fs, shard(rows), ["labels"])
        fault_log.record("clear error")
