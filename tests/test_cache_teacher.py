"""cache-teacher end to end: fidelity to a direct recomputation, determinism, resume after kill -9, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, cache_options, committed_shards, shard_checksums
from fsspec.implementations.local import LocalFileSystem

from e2kd.cli import main
from e2kd.explain import build_explainer
from e2kd.models import create_model, input_transform
from e2kd.pipeline._sources import iter_shard, list_shards
from e2kd.pipeline._views import ViewPolicy, render_view
from e2kd.stages._cache_teacher import run_cache_teacher
from e2kd.storage import ManifestError, open_store
from e2kd.storage._files import StoreLockedError

E2KD = [sys.executable, "-m", "e2kd.cli"]


def _cli_args(data: str, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", data, "--out", str(out), "--teacher", "resnet18", "--num-classes", "10",
            "--checkpoint", str(ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--views", "2",
            "--crop-scale", "0.3", "1.0", "--input-size", "64", "--batch-size", "16", "--quiet", *extra]


def test_cached_outputs_equal_a_direct_recomputation(cache: Path, train_urls: str, teacher_ckpt: Path) -> None:
    store = open_store(str(cache))
    assert len(store) == 300 and store.manifest.map_shape == (1, 4, 4)
    teacher = create_model("resnet18", 10, checkpoint=teacher_ckpt, **TEACHER_KWARGS).eval()
    explainer = build_explainer("gradcam", teacher)
    policy = ViewPolicy.from_dict(store.manifest.views)
    shard = list_shards(train_urls)[3]
    samples = [s for s in iter_shard(shard)][::7]
    for sample in samples:
        rec = store.read(sample.key)
        expected_views = policy.views_for(sample.key, *sample.image.shape[1:])
        np.testing.assert_array_equal(rec["views"].numpy(), np.array([v.as_list() for v in expected_views],
                                                                     dtype=np.float32))
        x = torch.stack([render_view(sample.image, v.tolist(), (64, 64)) for v in rec["views"]])
        maps, logits = explainer(input_transform(teacher)(x))
        torch.testing.assert_close(rec["logits"], logits, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(rec["maps"], maps, rtol=2e-3, atol=2e-3 * float(maps.abs().max()) + 1e-6)
        assert torch.equal(rec["target"], logits.argmax(1))
        assert rec["label"] == sample.label


def test_one_worker_gives_the_same_bytes_as_two(cache: Path, train_urls: str, teacher_ckpt: Path,
                                               tmp_path: Path) -> None:
    run_cache_teacher(cache_options(train_urls, tmp_path / "one", teacher_ckpt, workers=1))
    assert shard_checksums(tmp_path / "one") == shard_checksums(cache)


def test_decode_threads_give_the_same_bytes_and_an_oversized_request_is_capped(cache: Path, digits: Path,
                                                                             teacher_ckpt: Path,
                                                                             tmp_path: Path) -> None:
    urls = f"{digits}/train-{{000002..000003}}.tar"
    threads = (os.cpu_count() or 2) + 1  # 2 actors × (1 + threads) CPUs: more than this machine has
    with pytest.warns(UserWarning, match=f"--decode-workers {threads}.*each actor asks for"):
        run_cache_teacher(cache_options(urls, tmp_path / "threads", teacher_ckpt, actors=2, decode_workers=threads))
    reference = shard_checksums(cache)
    assert shard_checksums(tmp_path / "threads") == {n: reference[n] for n in ("train-000002", "train-000003")}


def _wait_for_complete_shards(manifest: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        try:
            if sum(r["complete"] for r in committed_shards(LocalFileSystem(), str(manifest.parent)).values()) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError("no shard completed in time")


def test_kill_minus_nine_and_resume_gives_identical_store(cache: Path, train_urls: str, teacher_ckpt: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([*E2KD, *_cli_args(train_urls, out, teacher_ckpt, "--workers", "1")], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_complete_shards(out / "manifest.json", 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver, Ray and its workers
        proc.wait()
    partial = committed_shards(LocalFileSystem(), str(out))  # the manifest and the commit records
    assert 2 <= len(partial) < 6, "the kill must land part-way"
    result = CliRunner().invoke(main, _cli_args(train_urls, out, teacher_ckpt, "--workers", "1"))
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    assert shard_checksums(out) == shard_checksums(cache)
    keys = list(open_store(str(out)).keys())
    assert len(keys) == len(set(keys)) == 300
    assert not (out / ".lock").exists() and not any((out / ".staging").glob("*"))


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_recorded_and_counted(tmp_path: Path, teacher_ckpt: Path) -> None:
    rng = np.random.default_rng(0)
    good = [_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    _write_tar(tmp_path / "mixed-000000.tar", [
        ("a.png", good[0]), ("a.cls", b"1"),
        ("broken.png", good[1][:40]), ("broken.cls", b"2"),  # truncated image
        ("nolabel.png", good[2]),  # unlabelled: first-class, label -1
        ("noimage.cls", b"3"),  # no image at all
        ("evil.png", good[0]), ("evil.pkl", b"\x80\x04K\x01."),  # pickle members are refused
    ])
    out = tmp_path / "store"
    summary = run_cache_teacher(cache_options(str(tmp_path / "mixed-000000.tar"), out, teacher_ckpt, workers=1))
    store = open_store(str(out))
    assert sorted(store.keys()) == ["a", "nolabel"]
    assert store.read("nolabel")["label"] == -1 and store.read("a")["label"] == 1
    reasons = {e["key"]: e["reason"] for e in store.errors()}
    assert set(reasons) == {"broken", "noimage", "evil"}
    assert "undecodable" in reasons["broken"] and "no image" in reasons["noimage"] and "pickle" in reasons["evil"]
    assert all(e["shard"] == "mixed-000000" for e in store.errors())
    assert summary["skipped"] == 3
    info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert info["errors"] == 3 and info["num_samples"] == 2
    listed = CliRunner().invoke(main, ["inspect", str(out), "--keys"]).output.splitlines()
    assert sorted(listed) == ["a", "nolabel"]
    errors = [json.loads(ln) for ln in CliRunner().invoke(main, ["inspect", str(out), "--errors"]).output.splitlines()]
    assert {e["key"] for e in errors} == {"broken", "noimage", "evil"}
    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "input 64×64 px" in text and "float16" in text and "random_resized_crop ×2" in text


def test_verify_names_the_shard_with_a_flipped_byte(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    assert CliRunner().invoke(main, ["verify", str(copy)]).exit_code == 0
    chunk = next(p for p in sorted((copy / "shards" / "train-000002" / "data.zarr" / "maps").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code != 0 and "train-000002" in result.output and "train-000001" not in result.output
    (copy / "shards" / "train-000004" / "keys.json").unlink()
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code != 0 and "train-000004" in result.output


def test_wds_format_round_trips_the_same_content(cache: Path, train_urls: str, teacher_ckpt: Path,
                                                tmp_path: Path) -> None:
    run_cache_teacher(cache_options(train_urls, tmp_path / "wds", teacher_ckpt, format="wds"))
    zarr_store, wds_store = open_store(str(cache)), open_store(str(tmp_path / "wds"))
    assert wds_store.manifest.format == "wds" and sorted(zarr_store.keys()) == sorted(wds_store.keys())
    for name in zarr_store.shard_names:
        for (k1, r1), (k2, r2) in zip(zarr_store.iter_shard(name), wds_store.iter_shard(name), strict=True):
            assert k1 == k2
            for field in ("logits", "target", "maps", "views"):
                assert torch.equal(r1[field], r2[field]), (k1, field)
            assert r1["label"] == r2["label"]
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "wds")]).exit_code == 0


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError("the Ray head node did not come up")


def test_real_local_ray_cluster_runs_the_same_job(cache: Path, train_urls: str, teacher_ckpt: Path,
                                                  tmp_path: Path) -> None:
    import tempfile

    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = 6391
    temp_dir = tempfile.mkdtemp(prefix="e2kd-ray-", dir="/tmp")  # own session dir, short socket paths
    # `ray start --block` keeps the head node in this process group, so the test can stop exactly it
    # (`ray stop` would also stop this test process's own Ray session).
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--object-store-memory", str(300 * 1024 * 1024),
                             "--disable-usage-stats", "--temp-dir", temp_dir],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, head)
        out = tmp_path / "cluster"
        args = [a for a in _cli_args(train_urls, out, teacher_ckpt, "--ray-address", f"127.0.0.1:{port}")
                if a != "--quiet"]  # with progress: stderr is a pipe here, as a cluster job's log file is
        result = subprocess.run([*E2KD, *args], env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "core_worker" not in result.stderr  # Ray's per-run warning about constructor args stays away
        progress = [ln for ln in result.stderr.splitlines() if ln.startswith("cache-teacher:")]
        assert "\r" not in result.stderr and progress and "300" in progress[-1] and "shards=6/6" in progress[-1], \
            result.stderr[-2000:]  # plain lines for a log (the last one the final count), no bar frames
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert shard_checksums(out) == shard_checksums(cache)


def test_resume_extends_with_new_shards_and_refuses_other_settings(cache: Path, digits: Path, train_urls: str,
                                                                   teacher_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "grow"
    first = f"{digits}/train-{{000000..000001}}.tar"
    run_cache_teacher(cache_options(first, out, teacher_ckpt))
    assert len(open_store(str(out)).manifest.shards) == 2
    summary = run_cache_teacher(cache_options(train_urls, out, teacher_ckpt))
    assert summary["shards_already_complete"] == 2 and summary["shards_cached_now"] == 4
    assert shard_checksums(out) == shard_checksums(cache)
    with pytest.raises(ManifestError, match="different explainer"):
        run_cache_teacher(cache_options(train_urls, out, teacher_ckpt, explainer="input_x_gradient"))
    with pytest.raises(ManifestError, match="different views"):
        run_cache_teacher(cache_options(train_urls, out, teacher_ckpt, views="3"))
    result = CliRunner().invoke(main, _cli_args(train_urls, out, teacher_ckpt, "--map-dtype", "uint8"))
    assert result.exit_code == 1 and "different encoding" in result.output and "map_dtype" in result.output


def test_a_second_writer_is_refused_and_a_dead_owners_lock_is_taken_over(cache: Path, train_urls: str,
                                                                         teacher_ckpt: Path, tmp_path: Path) -> None:
    import socket

    out = tmp_path / "locked"
    shutil.copytree(cache, out)
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        run_cache_teacher(cache_options(train_urls, out, teacher_ckpt))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    summary = run_cache_teacher(cache_options(train_urls, out, teacher_ckpt))
    assert summary["shards_already_complete"] == 6 and not (out / ".lock").exists()


def test_manifest_with_unknown_schema_version_is_refused(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "future"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="schema_version 99"):
        open_store(str(copy))
    manifest["schema_version"] = 1
    manifest["shards"]["../../etc"] = manifest["shards"].pop("train-000000")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="unsafe shard name"):
        open_store(str(copy))


def test_an_input_shard_that_changed_since_caching_is_refused(digits: Path, teacher_ckpt: Path,
                                                             tmp_path: Path) -> None:
    data = tmp_path / "in-000000.tar"
    shutil.copy(digits / "val-000000.tar", data)
    out = tmp_path / "store"
    run_cache_teacher(cache_options(str(data), out, teacher_ckpt, workers=1))
    fingerprint = open_store(str(out)).manifest.inputs["fingerprint"]
    record = open_store(str(out)).manifest.shards["in-000000"]
    assert record.source_bytes == data.stat().st_size
    assert record.source_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    with tarfile.open(digits / "val-000001.tar") as src, tarfile.open(data, "w") as dst:  # other content, size
        for member in list(src)[:20]:
            dst.addfile(member, src.extractfile(member))
    with pytest.raises(ManifestError, match="in-000000 changed since it was cached"):
        run_cache_teacher(cache_options(str(data), out, teacher_ckpt, workers=1))
    run_cache_teacher(cache_options(str(data), out, teacher_ckpt, workers=1, overwrite=True))
    assert open_store(str(out)).manifest.inputs["fingerprint"] != fingerprint
