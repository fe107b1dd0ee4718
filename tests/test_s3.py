"""Caches on real object storage: a loopback S3 server (moto's standalone server, started here) through s3fs.

cache-teacher with 2 Ray actors reading and writing the bucket, resume after kill -9, train-student and
inspect/verify from the bucket, the cache id, a tampered object, credentials never written anywhere, and the
store lock's atomic create and lease.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import S3, S3_SECRET, TEACHER_KWARGS, committed_shards, shard_checksums

from e2kd.cli import main
from e2kd.storage import Encoding, Manifest, create_store, open_store
from e2kd.storage._files import StoreLock, StoreLockedError, resolve

SHARDS = 4
STUDENT = ["--student", "resnet18", "--student-kwargs", json.dumps(TEACHER_KWARGS)]


def _cache_args(data: str, out: str, ckpt: Path, s3: S3, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", data, "--out", out, "--teacher", "resnet18", "--num-classes", "10",
            "--teacher-checkpoint", str(ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--views", "2",
            "--crop-scale", "0.3", "1.0", "--input-size", "64", "--batch-size", "16", "--quiet",
            "--storage-options", s3.options_json, *extra]


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str, digits: Path) -> S3:
    """A bucket holding the first 4 train shards under data/."""
    s3 = S3(s3_endpoint, "shared-cache-tests")
    for i in range(SHARDS):
        s3.fs.put(str(digits / f"train-{i:06d}.tar"), f"{s3.bucket}/data/train-{i:06d}.tar")
    return s3


@pytest.fixture(scope="module")
def s3_cache(bucket: S3, teacher_ckpt: Path) -> str:
    """cache-teacher --data s3://… --out s3://… with 2 Ray actors (each reads and writes the bucket itself)."""
    out = bucket.url("cache")
    result = CliRunner().invoke(main, _cache_args(bucket.url("data/train-{000000..000003}.tar"), out, teacher_ckpt,
                                                  bucket, "--actors", "2"))
    assert result.exit_code == 0, result.output
    assert "cached 200 samples in 4 shard(s)" in result.output and S3_SECRET not in result.output
    return out


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_cache_on_s3_holds_the_same_shards_as_a_local_run(s3_cache: str, bucket: S3, cache: Path) -> None:
    os.environ.pop("E2KD_STORAGE_OPTIONS", None)
    code, out = _invoke("verify", s3_cache, "--storage-options", bucket.options_json)
    assert code == 0 and "ok" in out, out
    bucket.use()
    local = shard_checksums(cache)
    remote = shard_checksums(s3_cache)
    assert len(remote) == SHARDS and all(remote[n] == local[n] for n in remote)
    code, out = _invoke("inspect", s3_cache, "--json", "--storage-options", bucket.options_json)
    info = json.loads(out)
    assert code == 0 and info["num_samples"] == 200 and len(info["cache_id"]) == 64
    assert info["cache_id"] == open_store(s3_cache).cache_id


def test_train_student_from_s3_records_the_cache_id_and_never_the_secret(s3_cache: str, bucket: S3,
                                                                         tmp_path: Path) -> None:
    bucket.use()
    cache_id = open_store(s3_cache).cache_id
    run = tmp_path / "run"
    env = {"E2KD_STORAGE_OPTIONS": bucket.options_json}  # the environment route for credentials
    result = CliRunner().invoke(main, ["train-student", "--data", bucket.url("data/train-{000000..000003}.tar"),
                                       "--cache", s3_cache, *STUDENT, "--out", str(run), "--epochs", "1",
                                       "--batch-size", "32", "--steps-per-epoch", "2", "--quiet",
                                       "--expect-cache-id", cache_id], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cache"]["cache_id"] == cache_id
    assert summary["options"]["storage_options"] == sorted(bucket.options)  # key names only
    # the secret is nowhere: console, run directory, the cache's objects
    assert S3_SECRET not in result.output
    for path in run.rglob("*"):
        if path.is_file():
            assert S3_SECRET.encode() not in path.read_bytes(), path
    for obj in bucket.fs.find(bucket.bucket):
        assert S3_SECRET.encode() not in bucket.fs.cat_file(obj), obj
    import ray

    if ray.is_initialized():  # the Ray session that ran the s3 cache-teacher: its logs too
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        for path in logs.rglob("*"):
            if path.is_file():
                assert S3_SECRET.encode() not in path.read_bytes(), path
    other = "0" * 64
    code, out = _invoke("train-student", "--data", bucket.url("data/train-{000000..000003}.tar"), "--cache", s3_cache,
                        *STUDENT, "--out", str(tmp_path / "refused"), "--expect-cache-id", other,
                        "--storage-options", bucket.options_json)
    assert code != 0 and f"not the expected {other}" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "refused" / "summary.json").exists()


def test_a_bad_storage_option_is_one_line_without_the_secret() -> None:
    code, out = _invoke("inspect", "s3://nowhere/cache", "--storage-options", '{"secret": "' + S3_SECRET + '"')
    assert code != 0 and "not valid JSON" in out and S3_SECRET not in out


def test_a_missing_input_object_is_an_error_naming_it(bucket: S3, teacher_ckpt: Path) -> None:
    code, out = _invoke(*_cache_args(bucket.url("data/train-{000003..000004}.tar"), bucket.url("missing-input"),
                                     teacher_ckpt, bucket, "--actors", "1"))
    assert code != 0 and "cannot open input shard s3://" in out and "train-000004.tar" in out, out
    assert not bucket.fs.exists(f"{bucket.bucket}/missing-input/manifest.json")  # refused before any work


def _wait_for_shards(s3: S3, manifest: str, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(committed_shards(s3.fs, manifest.rsplit("/", 1)[0])) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        s3.fs.invalidate_cache()
        time.sleep(0.1)
    raise AssertionError("no shard completed in time")


def test_kill_minus_nine_and_resume_on_s3_gives_the_local_checksums(bucket: S3, teacher_ckpt: Path,
                                                                   cache: Path) -> None:
    out = bucket.url("killed")
    args = _cache_args(bucket.url("data/train-{000000..000003}.tar"), out, teacher_ckpt, bucket, "--actors", "1")
    proc = subprocess.Popen([sys.executable, "-m", "e2kd.cli", *args], start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_shards(bucket, f"{bucket.bucket}/killed/manifest.json", 1, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    bucket.fs.invalidate_cache()
    assert 1 <= len(committed_shards(bucket.fs, f"{bucket.bucket}/killed")) < SHARDS  # the kill landed part-way
    code, output = _invoke(*args)
    assert code == 0 and "already complete" in output, output
    bucket.use()
    local = shard_checksums(cache)
    assert shard_checksums(out) == {n: local[n] for n in shard_checksums(out)} and len(shard_checksums(out)) == 4
    assert not bucket.fs.exists(f"{bucket.bucket}/killed/.lock")


# ---- the store lock: atomic create, a lease, take-over from any host -------------------------------------------
def _manifest() -> Manifest:
    return Manifest(e2kd_version="test", format="zarr", teacher={"name": "t", "num_classes": 3}, explainer={
        "name": "gradcam", "family": "gradient"}, preprocessing={"input_size": [8, 8]}, views={"policy": "full"},
        encoding=Encoding(num_classes=3), precision="fp32")


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = S3(s3_endpoint, "lock-" + str(abs(hash(request.node.nodeid)) % 10**12))
    s3.use()
    return s3.url("store")


def test_two_writers_at_once_one_is_refused(store_url: str) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        barrier.wait()
        try:
            with create_store(store_url, _manifest()):
                results.append("held")
                time.sleep(1.0)
        except StoreLockedError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("held") == 1, results
    assert all("locked by host" in r or "same moment" in r for r in results if r != "held"), results


def test_a_dead_owner_on_another_host_is_taken_over_once_its_lease_expires(store_url: str) -> None:
    fs, root = resolve(store_url)
    fs.makedirs(root, exist_ok=True)
    other = {"host": "gpu-node-17", "pid": 4242, "token": "x" * 32, "lease_s": 60}
    fs.pipe_file(f"{root}/.lock", json.dumps({**other, "expires": time.time() + 60}).encode())
    with pytest.raises(StoreLockedError, match=r"gpu-node-17 pid 4242 .*lease expires in"):
        create_store(store_url, _manifest())
    fs.pipe_file(f"{root}/.lock", json.dumps({**other, "expires": time.time() - 1}).encode())
    with create_store(store_url, _manifest()) as writer:
        assert json.loads(fs.cat_file(f"{root}/.lock"))["token"] == writer._lock.token
    assert not fs.exists(f"{root}/.lock")


def test_the_owner_renews_its_lease_and_notices_a_take_over(store_url: str) -> None:
    fs, root = resolve(store_url)
    fs.makedirs(root, exist_ok=True)
    lock = StoreLock(fs, root, lease_s=0.6)
    lock.acquire()
    try:
        first = json.loads(fs.cat_file(f"{root}/.lock"))["expires"]
        time.sleep(1.5)  # past the first lease: only renewal keeps it
        assert json.loads(fs.cat_file(f"{root}/.lock"))["expires"] > first
        with pytest.raises(StoreLockedError, match="lease expires in"):
            StoreLock(fs, root, lease_s=0.6).acquire()
        lock._stop.set()
        lock._renewer.join()
        time.sleep(0.7)  # the owner stalls: its lease runs out and a new writer takes over
        with StoreLock(fs, root, lease_s=30):
            with pytest.raises(StoreLockedError, match="lost the store's lock"):
                lock.check_held()
    finally:
        lock.release()


def test_a_renewal_racing_a_take_over_never_overwrites_the_new_holder(store_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner stalled past its lease and renews just as another writer takes over: exactly one of them holds
    the lock afterwards, and the lock file is that one's (a read-then-replace renewal overwrote the new holder)."""
    from e2kd.storage import _files

    fs, root = resolve(store_url)
    fs.makedirs(root, exist_ok=True)
    owner = StoreLock(fs, root, lease_s=0.3)
    owner.acquire()
    owner._stop.set()
    owner._renewer.join()
    time.sleep(0.5)  # the owner's lease has run out
    owner.lease_s = 30.0  # a renewal that wins gives a lease that outlasts a slow machine
    taker = StoreLock(fs, root, lease_s=30)
    outcome: list[str] = []

    def take_over() -> None:
        try:
            taker.acquire()
            outcome.append("taken")
        except StoreLockedError as exc:
            outcome.append(str(exc))

    read = _files._LockFile.read
    raced = threading.Event()

    def read_then_race(self: _files._LockFile) -> tuple[dict, str | None]:
        seen = read(self)
        if threading.current_thread() is threading.main_thread() and not raced.is_set():
            raced.set()  # between the owner's read and its write, the taker runs
            thread = threading.Thread(target=take_over)
            thread.start()
            thread.join(timeout=1.0)  # locally it waits for the owner's renewal; on s3 it completes
            race.append(thread)
        return seen

    race: list[threading.Thread] = []
    monkeypatch.setattr(_files._LockFile, "read", read_then_race)
    try:
        owner.renew()
        race[0].join(timeout=10)
        monkeypatch.undo()
        holder = json.loads(fs.cat_file(f"{root}/.lock"))["token"]
        holders = [lock for lock, held in ((owner, owner.lost is None), (taker, outcome == ["taken"])) if held]
        assert [lock.token for lock in holders] == [holder], (owner.lost, outcome)
        if "s3" in fs.protocol:  # no flock there: the taker went first, and the owner's conditional write failed
            assert outcome == ["taken"] and owner.lost and "pid" in owner.lost
        else:  # the taker waited for the renewal, then found a live lease
            assert owner.lost is None and "lease expires in" in outcome[0]
    finally:
        taker.release()
        owner.release()
    assert not fs.exists(f"{root}/.lock")


def test_the_lock_file_is_replaced_and_removed_only_at_the_version_read(s3: S3) -> None:
    from e2kd.storage._files import _LockFile

    s3.use()
    fs, root = resolve(s3.url("cas"))
    lock = _LockFile(fs, root)
    fs.pipe_file(lock.path, b'{"token": "a"}')
    holder, version = lock.read()
    assert holder == {"token": "a"} and version
    fs.pipe_file(lock.path, b'{"token": "b"}')  # another writer, meanwhile
    assert not lock.replace(b'{"token": "c"}', version) and not lock.remove(version)
    assert json.loads(fs.cat_file(lock.path)) == {"token": "b"}
    holder, version = lock.read()
    assert lock.replace(b'{"token": "c"}', version) and lock.read()[0] == {"token": "c"}
    assert lock.remove(lock.read()[1]) and lock.read() == ({}, None)


def test_a_server_without_conditional_writes_keeps_the_former_lock_behaviour() -> None:
    """An S3-compatible server that answers 501 to If-Match: renewal and release still work (read-then-replace)."""
    from e2kd.storage._files import _LockFile

    class NoIfMatch:  # the two calls an S3 filesystem makes, answering If-Match as such a server does
        protocol = ("s3", "s3a")

        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}

        def pipe_file(self, path: str, data: bytes, **kwargs: object) -> None:
            if "IfMatch" in kwargs:
                raise OSError("501 Not Implemented: A header you provided implies functionality that is not "
                              "implemented")
            self.objects[path] = data

        def call_s3(self, method: str, **kwargs: object) -> None:
            raise OSError("NotImplemented (501)")

        def rm(self, path: str) -> None:
            if self.objects.pop(path, None) is None:
                raise FileNotFoundError(path)

        def split_path(self, path: str) -> tuple[str, str, None]:
            return path.split("/", 1)[0], path.split("/", 1)[1], None

    fs = NoIfMatch()
    lock = _LockFile(fs, "bucket/store")  # type: ignore[arg-type]
    fs.objects[lock.path] = b'{"token": "a"}'
    assert lock.replace(b'{"token": "a", "expires": 1}', '"etag"') and fs.objects[lock.path].endswith(b"1}")
    assert lock.remove('"etag"') and lock.path not in fs.objects
    assert lock.remove('"etag"')  # already gone: nothing to do


@pytest.mark.parametrize(("answer", "raised"), [("412 Precondition Failed", FileExistsError),
                                                 ("At least one of the pre-conditions you specified did not hold",
                                                  FileExistsError),
                                                 ("501 Not Implemented", StoreLockedError)])
def test_an_exclusive_create_reads_the_servers_answer(answer: str, raised: type) -> None:
    """A create the server refuses means the lock exists; one it cannot do at all is a clear refusal to write."""
    from e2kd.storage._files import create_exclusive

    class Answers:
        protocol = "s3"

        def pipe_file(self, path: str, data: bytes, mode: str = "overwrite") -> None:
            raise OSError(answer)

    with pytest.raises(raised, match=".lock" if raised is FileExistsError else "no atomic create"):
        create_exclusive(Answers(), "bucket/store/.lock", b"{}")  # type: ignore[arg-type]


# ---- handing a cache over: e2kd copy ----------------------------------------------------------------------------
def test_copy_local_to_s3_and_back_is_verified_resumable_and_keeps_the_cache_id(cache: Path, s3: S3,
                                                                               tmp_path: Path) -> None:
    from e2kd.storage import copy_store

    s3.use()
    dst = s3.url("published")
    calls: list[str] = []

    def killed_after_two(name: str, nbytes: int) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the copy dies half-way

    with pytest.raises(KeyboardInterrupt):
        copy_store(str(cache), dst, on_shard=killed_after_two)
    with pytest.raises(FileNotFoundError):
        open_store(dst)  # the manifest comes last: a half-copied store is not a store
    code, out = _invoke("copy", str(cache), dst, "--quiet", "--storage-options", s3.options_json)
    assert code == 0 and "copied 4 shard(s)" in out and "2 already at" in out, out
    assert s3.fs.cat_file(f"{s3.bucket}/published/manifest.json") == (cache / "manifest.json").read_bytes()
    assert open_store(dst).cache_id == open_store(str(cache)).cache_id in out
    back = tmp_path / "back"
    code, out = _invoke("copy", dst, str(back), "--quiet", "--storage-options", s3.options_json)
    assert code == 0 and "copied 6 shard(s)" in out, out
    assert shard_checksums(back) == shard_checksums(cache) and open_store(str(back)).verify() == []
    code, out = _invoke("copy", str(cache), str(back), "--quiet")
    assert code == 0 and "copied 0 shard(s)" in out and "6 already at" in out, out
    code, out = _invoke("copy", str(tmp_path / "back"), s3.url("other"), "--quiet", "--storage-options",
                        s3.options_json)
    assert code == 0
    s3.fs.pipe_file(f"{s3.bucket}/other/manifest.json", b'{"schema": "something else"}')
    code, out = _invoke("copy", str(cache), s3.url("other"), "--quiet", "--storage-options", s3.options_json)
    assert code != 0 and "already holds another cache" in out and "--overwrite" in out, out


def test_a_tampered_object_is_named_by_verify_and_stops_training(s3_cache: str, bucket: S3, tmp_path: Path) -> None:
    tampered = bucket.url("tampered")
    code, out = _invoke("copy", s3_cache, tampered, "--quiet", "--storage-options", bucket.options_json)
    assert code == 0, out
    maps = [p for p in bucket.fs.find(f"{bucket.bucket}/tampered/shards/train-000001/data.zarr/maps")
            if not p.endswith("zarr.json")]
    data = bytearray(bucket.fs.cat_file(maps[0]))
    data[len(data) // 3] ^= 0x01
    bucket.fs.pipe_file(maps[0], bytes(data))
    code, out = _invoke("verify", tampered, "--storage-options", bucket.options_json)
    assert code != 0 and "train-000001" in out and "'maps'" in out, out
    code, out = _invoke("train-student", "--data", bucket.url("data/train-{000000..000003}.tar"), "--cache",
                        tampered, *STUDENT, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32",
                        "--quiet", "--storage-options", bucket.options_json)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert code != 0 and lines[-1].startswith("Error:") and "Traceback" not in out, out
    assert all(w in lines[-1] for w in (tampered, "shard train-000001", "array 'maps' is damaged")), lines[-1]


# ---- image folders on object storage ------------------------------------------------------------------------------
def test_an_image_folder_on_s3_caches_like_the_same_folder_on_disk(s3: S3, digits: Path, tmp_path: Path) -> None:
    import tarfile

    from conftest import cache_options

    from e2kd.pipeline._loader import plan_join
    from e2kd.pipeline._sources import list_shards
    from e2kd.stages._cache_teacher import run_cache_teacher

    local = tmp_path / "photos"
    with tarfile.open(digits / "train-000000.tar") as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")][:12]
        for i, member in enumerate(pngs):
            cls = ("cat", "dog")[i % 2]
            path = local / cls / ("sub" if i % 3 == 0 else "") / f"img-{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
    s3.fs.put(str(local), f"{s3.bucket}/photos", recursive=True)
    s3.use()
    remote = list_shards(s3.url("photos"))
    assert [(s.name, s.label) for s in remote] == [(s.name, s.label) for s in list_shards(str(local))]
    assert [k for s in remote for k in s.keys()] == [k for s in list_shards(str(local)) for k in s.keys()]
    stores = {}
    for where, data in (("local", str(local)), ("s3", s3.url("photos"))):
        stores[where] = tmp_path / f"cache-{where}"
        run_cache_teacher(cache_options(data, stores[where], None, teacher_checkpoint=None, random_teacher=True,
                                        num_classes=2, workers=1, storage_options=s3.options))
    assert shard_checksums(stores["s3"]) == shard_checksums(stores["local"])
    opened = open_store(str(stores["s3"]))
    assert len(opened) == 12 and opened.manifest.class_names == ("cat", "dog") and opened.verify() == []
    plan = plan_join(list_shards(s3.url("photos")), opened)  # the student side reads the same folder
    assert plan.num_samples == 12 and not plan.missing_in_cache


def test_an_empty_object_is_an_error_never_an_empty_cache(s3: S3, teacher_ckpt: Path, tmp_path: Path) -> None:
    s3.fs.pipe_file(f"{s3.bucket}/photos-typo", b"")
    code, out = _invoke(*_cache_args(s3.url("photos-typo"), str(tmp_path / "store"), teacher_ckpt, s3))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert code == 1 and lines[-1].startswith("Error: input s3://") and "is empty" in lines[-1], out
    assert not (tmp_path / "store").exists()


def test_glob_patterns_on_s3_list_the_matching_objects(bucket: S3) -> None:
    from e2kd.pipeline._sources import list_shards

    bucket.use()
    assert [s.name for s in list_shards(bucket.url("data/train-00000[0-2].tar"))] == [
        "train-000000", "train-000001", "train-000002"]
    assert [s.name for s in list_shards(bucket.url("data/train-*.tar"))] == [f"train-{i:06d}" for i in range(SHARDS)]
    assert all(s.url.startswith("s3://") for s in list_shards(bucket.url("data/train-00000?.tar")))
    with pytest.raises(ValueError, match="matches nothing"):
        list_shards(bucket.url("data/val-*.tar"))
