"""Object-storage misuse gets one line before any work: a missing bucket is never created unless asked, missing
credentials name the URL and the ways to pass them, an unreachable Ray cluster is named at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import S3, TEACHER_KWARGS

from e2kd.cli import main


def _last_line(result_output: str) -> str:
    return [ln for ln in result_output.splitlines() if ln.strip()][-1]


def _cache_args(data: str, out: str, ckpt: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", data, "--out", out, "--teacher", "resnet18", "--num-classes", "10",
            "--teacher-checkpoint", str(ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--input-size", "64",
            "--actors", "1", "--quiet", *extra]


def test_a_missing_bucket_is_refused_unless_create_bucket(digits: Path, teacher_ckpt: Path, cache: Path, s3: S3,
                                                          fault_log) -> None:
    typo = f"{s3.bucket}-typo"
    result = CliRunner().invoke(main, _cache_args(str(digits / "train-000000.tar"), f"s3://{typo}/cache",
                                                  teacher_ckpt, "--storage-options", s3.options_json))
    line = _last_line(result.output)
    assert result.exit_code == 1 and line.startswith("Error:") and "Traceback" not in result.output, result.output
    assert f"bucket '{typo}' does not exist" in line and "--create-bucket" in line
    result = CliRunner().invoke(main, ["copy", str(cache), f"s3://{typo}/cache", "--quiet", "--storage-options",
                                       s3.options_json])
    assert result.exit_code == 1 and f"bucket '{typo}' does not exist" in _last_line(result.output)
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(typo)  # nothing was created
    result = CliRunner().invoke(main, ["copy", str(cache), f"s3://{typo}/cache", "--quiet", "--create-bucket",
                                       "--storage-options", s3.options_json])
    assert result.exit_code == 0 and "copied 6 shard(s)" in result.output, result.output
    fault_log.record("clear error")


def test_missing_credentials_name_the_url_and_the_ways_to_pass_them(s3: S3, digits: Path, teacher_ckpt: Path,
                                                                    tmp_path: Path, fault_log) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", E2KD_STORAGE_OPTIONS=json.dumps({"endpoint_url": s3.endpoint}))
    url = s3.url("cache")
    commands = {"inspect": ["inspect", url], "verify": ["verify", url],
                "cache-teacher": _cache_args(s3.url("data/train-000000.tar"), str(tmp_path / "store"), teacher_ckpt)}
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "e2kd.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        line = _last_line(proc.stderr)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert line.startswith("Error: no credentials for s3://"), (name, line)
        assert all(w in line for w in ("AWS_ACCESS_KEY_ID", "--storage-options")), (name, line)
    assert not (tmp_path / "store").exists()
    fault_log.record("clear error")


def test_an_unreachable_ray_address_is_one_line_at_once_and_creates_nothing(digits: Path, teacher_ckpt: Path,
                                                                            tmp_path: Path, fault_log) -> None:
    import socket

    with socket.socket() as free:  # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "store"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "e2kd.cli",
                           *_cache_args(str(digits / "train-000000.tar"), str(out), teacher_ckpt,
                                        "--ray-address", f"127.0.0.1:{port}")],
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: --ray-address"), proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "ray start --head" in lines[0]
    assert time.time() - t0 < 15 and not out.exists()
    fault_log.record("clear error")
