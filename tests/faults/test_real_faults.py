"""Real faults: the driver killed again and again, two writers at once, a read-only or full disk, a killed training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, committed_shards, shard_checksums
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file

from e2kd.cli import main
from e2kd.storage import open_store

E2KD = [sys.executable, "-m", "e2kd.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _cache_args(data: str, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", data, "--out", str(out), "--teacher", "resnet18", "--num-classes", "10",
            "--checkpoint", str(ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--views", "2",
            "--crop-scale", "0.3", "1.0", "--input-size", "64", "--batch-size", "16", "--workers", "2", "--quiet",
            *extra]


def _first_shards(digits: Path, reference: Path, n: int = 8) -> tuple[str, dict[str, str]]:
    """The first ``n`` teacher-train shards and their reference checksums (a shard's bytes depend on it alone)."""
    names = [f"teacher-train-{i:06d}" for i in range(n)]
    reference_sums = shard_checksums(reference)
    return ",".join(f"{digits}/{name}.tar" for name in names), {name: reference_sums[name] for name in names}


def _complete(out: Path) -> int:
    """Complete shards a reader sees now (the manifest and the commit records)."""
    return sum(r["complete"] for r in committed_shards(LocalFileSystem(), str(out)).values())


def test_driver_killed_at_random_moments_then_resumed_equals_an_uninterrupted_run(
        teacher_train_urls: str, reference_22: Path, teacher_ckpt: Path, tmp_path: Path, fault_log) -> None:
    out, rng = tmp_path / "store", random.Random(7)
    kills = 0
    for _ in range(5):
        before = _complete(out)
        proc = subprocess.Popen([*E2KD, *_cache_args(teacher_train_urls, out, teacher_ckpt)], env=ENV,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and _complete(out) <= before:
                time.sleep(0.02)  # wait for this run's first committed shard, then a random moment more
            time.sleep(rng.uniform(0.0, 0.6))
        finally:
            if proc.poll() is None:
                kills += 1
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and every worker
            proc.wait()
    assert kills >= 5 and _complete(out) < 22, "every kill must land while the job still runs"
    result = CliRunner().invoke(main, _cache_args(teacher_train_urls, out, teacher_ckpt))
    assert result.exit_code == 0, result.output
    assert shard_checksums(out) == shard_checksums(reference_22)
    keys = list(open_store(str(out)).keys())
    assert len(keys) == len(set(keys)) == len(open_store(str(reference_22)))
    assert not (out / ".lock").exists() and not any((out / ".staging").glob("*"))
    lost = len(open_store(str(reference_22))) - len(keys)
    for i in range(kills):
        fault_log.record("fault survived", lost=lost if i == 0 else 0)


def test_two_writers_at_once_one_is_refused_and_the_store_is_whole(digits: Path, reference_22: Path,
                                                                  teacher_ckpt: Path, tmp_path: Path,
                                                                  fault_log) -> None:
    out = tmp_path / "store"
    data, expected = _first_shards(digits, reference_22)
    procs = [subprocess.Popen([*E2KD, *_cache_args(data, out, teacher_ckpt)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    refused = [o for p, o in zip(procs, outputs, strict=True) if p.returncode != 0]
    if codes == [0, 0]:  # the second started after the first finished: it found everything complete
        assert any("already complete" in o for o in outputs)
    else:
        assert codes == [0, 1] and "locked" in refused[0].splitlines()[-1] and "Traceback" not in refused[0]
    assert shard_checksums(out) == expected
    fault_log.record("clear error")


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return mount.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_output_is_one_clear_error(digits: Path, teacher_ckpt: Path, tmp_path: Path, fault_log) -> None:
    target = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(target, "1m", read_only=True):
            pytest.skip("root cannot mount a read-only tmpfs here (no CAP_SYS_ADMIN), and permissions do not bind root")
    else:
        target.mkdir()
        target.chmod(0o555)
    try:
        result = CliRunner().invoke(main, _cache_args(f"{digits}/train-000000.tar", target / "store", teacher_ckpt))
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and lines[-1].startswith("Error: ") and "Traceback" not in result.output
        assert "Read-only" in lines[-1] or "ermission" in lines[-1], lines[-1]
    finally:
        _umount(target) if os.geteuid() == 0 else target.chmod(0o755)
    fault_log.record("clear error")


def test_a_full_disk_fails_the_shards_it_hits_and_resume_completes_them(
        digits: Path, reference_22: Path, teacher_ckpt: Path, tmp_path: Path, fault_log) -> None:
    disk = tmp_path / "disk"
    data, expected = _first_shards(digits, reference_22)
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "200k"):
        pytest.skip("a small disk needs a tmpfs mount (root with CAP_SYS_ADMIN); not available here")
    try:
        out = disk / "store"
        result = CliRunner().invoke(main, _cache_args(data, out, teacher_ckpt))
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "No space left" in lines[-1] or "failed" in lines[-1], lines[-1]
        partial = open_store(str(out))  # whatever was recorded is complete and verifies
        assert partial.verify() == [] and len(partial.shard_names) < len(expected)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = CliRunner().invoke(main, _cache_args(data, out, teacher_ckpt))
        assert result.exit_code == 0, result.output
        assert shard_checksums(out) == expected
        reference = open_store(str(reference_22))
        lost = sum(reference.manifest.shards[n].num_samples for n in expected) - len(open_store(str(out)))
    finally:
        _umount(disk)
    fault_log.record("fault survived", lost=lost)


def test_train_student_killed_and_resumed_ends_with_the_uninterrupted_weights(cache: Path, train_urls: str,
                                                                            tmp_path: Path, fault_log) -> None:
    def args(out: Path) -> list[str]:
        return ["train-student", "--data", train_urls, "--cache", str(cache), "--student", "resnet18",
                "--student-kwargs", json.dumps({"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16}),
                "--out", str(out), "--batch-size", "16", "--epochs", "4", "--steps-per-epoch", "6", "--quiet"]

    whole = tmp_path / "whole"  # every run in a fresh process: the same torch thread count, so bit-equal arithmetic
    subprocess.run([*E2KD, *args(whole)], check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*E2KD, *args(killed)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = killed / "metrics.jsonl"
            if (killed / "checkpoint.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len((killed / "metrics.jsonl").read_text().splitlines()) < 4, "the kill must land mid-run"
    resumed = subprocess.run([*E2KD, *args(killed), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(str(whole / "student.safetensors")), load_file(str(killed / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fault_log.record("fault survived")
