"""Faults that used to lose data: hostile input file names, and a Ray worker killed while a checkpoint is in use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TEACHER_KWARGS, cache_options, committed_shards, shard_checksums
from fsspec.implementations.local import LocalFileSystem

from e2kd.pipeline._loader import plan_join
from e2kd.pipeline._sources import list_shards
from e2kd.stages._cache_teacher import run_cache_teacher
from e2kd.storage import open_store
from e2kd.storage._files import commit_dir, resolve
from e2kd.storage._names import is_valid_shard_name

E2KD = [sys.executable, "-m", "e2kd.cli"]
#: input file names (before ".tar") that once deleted a store (``...`` → ``shards/..``), every shard (``..``)
#: or made the store unreadable (``my shard``)
ODD_NAMES = ["...", "..", "", "~", "a b;c", "ü", "my shard"]


def test_odd_input_names_are_cached_and_never_touch_other_shards(digits: Path, teacher_ckpt: Path, tmp_path: Path,
                                                                 fault_log) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    normal = inputs / "normal.tar"
    shutil.copy(digits / "teacher-train-000000.tar", normal)
    store = tmp_path / "store"
    run_cache_teacher(cache_options(str(normal), store, teacher_ckpt, workers=1))
    before = shard_checksums(store)
    odd = []
    for i, base in enumerate(ODD_NAMES, start=1):
        path = inputs / f"{base}.tar"
        shutil.copy(digits / f"teacher-train-{i:06d}.tar", path)
        odd.append(str(path))
    data = ",".join([str(normal), *odd])
    summary = run_cache_teacher(cache_options(data, store, teacher_ckpt, workers=2))
    assert summary["shards_cached_now"] == len(ODD_NAMES) and not summary["failed"]
    after = shard_checksums(store)
    assert after["normal"] == before["normal"]  # the shard cached first is untouched
    assert len(after) == 1 + len(ODD_NAMES) and all(is_valid_shard_name(n) for n in after)
    opened = open_store(str(store))
    assert len(opened) == 50 * (1 + len(ODD_NAMES)) and opened.verify() == []
    plan = plan_join(list_shards(data), opened)  # the student side finds every shard by the same names
    assert plan.num_samples == len(opened) and not plan.missing_in_cache and not plan.missing_in_input
    assert (store / "manifest.json").is_file()
    fault_log.record("fault survived", lost=50 * (1 + len(ODD_NAMES)) - len(opened))


def test_commit_refuses_an_unsafe_shard_name_and_removes_nothing(tmp_path: Path, fault_log) -> None:
    root = tmp_path / "store"
    (root / "shards" / "keep").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    staging = tmp_path / "staged"
    staging.mkdir()
    fs, path = resolve(str(root))
    for bad in ("..", ".", "a/../..", "", "../x"):
        with pytest.raises(ValueError, match="unsafe shard name"):
            commit_dir(staging, fs, path, bad)
    assert (root / "manifest.json").exists() and (root / "shards" / "keep").is_dir() and staging.is_dir()
    fault_log.record("clear error")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _teacher_workers(driver: int) -> list[int]:
    pids = []
    for pid in _descendants(driver):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "TeacherWorker" in cmdline:
            pids.append(pid)
    return pids


def test_a_killed_worker_is_restarted_with_the_checkpoint_and_its_shard_retried(
        teacher_train_urls: str, reference_22: Path, teacher_ckpt: Path, tmp_path: Path, fault_log) -> None:
    data, reference = teacher_train_urls, reference_22
    out = tmp_path / "killed"
    args = ["cache-teacher", "--data", data, "--out", str(out), "--teacher", "resnet18", "--num-classes", "10",
            "--checkpoint", str(teacher_ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--views", "2",
            "--crop-scale", "0.3", "1.0", "--input-size", "64", "--batch-size", "16", "--workers", "2", "--quiet"]
    proc = subprocess.Popen([*E2KD, *args], env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and killed is None:
            done = committed_shards(LocalFileSystem(), str(out))
            workers = _teacher_workers(proc.pid)
            if len(done) >= 8 and workers:  # late enough that a checkpoint reference dropped early is freed
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)  # a worker dies while shards remain; its restart needs the checkpoint
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed is not None, "the worker kill must land while the job runs"
    assert proc.returncode == 0, output[-3000:]
    done = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(done) == 22
    assert shard_checksums(out) == shard_checksums(reference)
    fault_log.record("fault survived", lost=len(open_store(str(reference))) - len(open_store(str(out))))


def test_a_worker_that_outlived_its_driver_does_not_commit(digits: Path, tmp_path: Path, fault_log) -> None:
    """A killed driver's Ray worker can finish its shard after a new run took the lock over: it must not commit."""
    from e2kd.pipeline._views import ViewPolicy
    from e2kd.stages._cache_teacher.worker import TeacherWorker, WorkerSpec
    from e2kd.storage import Encoding, ShardWriter
    from e2kd.storage._files import StoreLock, StoreLockedError

    store = tmp_path / "store"
    store.mkdir()
    fs, root = resolve(str(store))
    with StoreLock(fs, root) as old:
        old_token = old.token
    spec = WorkerSpec(teacher={"name": "resnet18", "num_classes": 10, "kwargs": TEACHER_KWARGS},
                      explainer={"name": "gradcam"},
                      views=ViewPolicy(k=1, scale=(0.5, 1.0), flip_p=0.0, seed=0).to_dict(), input_size=(64, 64),
                      encoding=Encoding(num_classes=10),
                      writer=ShardWriter(str(store), "zarr", Encoding(num_classes=10), lock_token=old_token))
    threads = torch.get_num_threads()
    try:
        worker = TeacherWorker(spec)  # (sets this process's torch threads, as in an actor)
        shard = list_shards(f"{digits}/val-000000.tar")[0]
        with StoreLock(fs, root):  # the new run holds the lock now
            with pytest.raises(StoreLockedError, match="no longer this run's"):
                worker.cache_shard(shard)
    finally:
        torch.set_num_threads(threads)
    assert not (store / "shards").exists() or not any((store / "shards").iterdir())
    assert not any((store / ".staging").glob("*"))
    fault_log.record("clear error")
