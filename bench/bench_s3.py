"""Benchmark of caches on object storage: a loopback S3 server (moto) through s3fs, side by side with local disk.

Run: ``make bench`` (or ``.venv/bin/python bench/bench_s3.py --out bench/RESULTS.md``).

- **Objects per shard** of a Zarr store shard (sharding codec: one object per column) and the time to read one
  shard from s3 vs local disk.
- **Time to first step** of train-student (prepare + first batch + one step), data and cache on s3: 8 vs 64
  shards of the same size (goal ≈ 8×, O(shards)), 64 small vs 64 large shards (goal ≈ 1×, not O(bytes)), and
  the former plan that lists every input tar, for comparison.
- **s/step** of train-student reading ``--data``/``--cache`` from s3 vs local disk (goal ≤ 1.1×).
- **s/step of epoch 2** from s3 with and without ``--local-cache`` (epoch 1 fills the local cache; epoch 2 reads
  every shard from it instead of downloading it again), alternating.

Caches here are written through the storage API with synthetic teacher outputs (the teacher's values do not
change what is read); the images are real digits-shift PNGs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))

from report import write_section  # noqa: E402

STUDENT = ("resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16})


def _server() -> tuple[Any, dict[str, Any]]:
    """moto's standalone S3 server in its own process (as a real server would be: not sharing our GIL)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench",
               "client_kwargs": {"region_name": "us-west-2"}}
    return server, options


def _samples(digits: Path) -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of the digits-shift train split."""
    import webdataset as wds

    out = []
    for url in sorted(digits.glob("train-*.tar")):
        for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False):
            out.append((s["png"], int(s["cls"])))
    return out


def _write_shards(root: Path, prefix: str, count: int, per_shard: int, samples: list) -> list[Path]:
    """``count`` tars of ``per_shard`` samples each (keys unique across shards)."""
    from webdataset import TarWriter

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"{prefix}-{i:06d}.tar"
        with TarWriter(str(path), mtime=0) as sink:
            for j in range(per_shard):
                png, label = samples[(i * per_shard + j) % len(samples)]
                sink.write({"__key__": f"{prefix}{i:03d}-{j:05d}", "png": png, "cls": str(label).encode()})
        paths.append(path)
    return paths


def _cache(uri: str, tars: list[Path], data_uri: str, k: int = 1) -> None:
    """A zarr cache of synthetic teacher outputs keyed like the tars (10 classes, 1×4×4 maps)."""
    from e2kd.pipeline._sources import list_shards
    from e2kd.storage import Encoding, Manifest, create_store

    enc = Encoding(num_classes=10)
    manifest = Manifest(e2kd_version="bench", format="zarr", teacher={"name": "synthetic", "num_classes": 10,
                                                                      "kwargs": {}},
                        explainer={"name": "gradcam", "family": "gradcam"},
                        preprocessing={"input_size": [64, 64]}, views={"policy": "full", "k": 1},
                        encoding=enc, precision="fp32")
    rng = np.random.default_rng(0)
    with create_store(uri, manifest, overwrite=True) as writer:
        for shard, tar in zip(list_shards(data_uri), tars, strict=True):
            keys_labels = list(shard.keys())
            n = len(keys_labels)
            cols = enc.encode(rng.normal(size=(n, k, 10)).astype(np.float32),
                              rng.random((n, k, 1, 4, 4), dtype=np.float32))
            cols["labels"] = np.array([v for _, v in keys_labels], dtype=np.int32)
            cols["views"] = np.tile(np.array([0, 0, 1, 1, 0], np.float32), (n, k, 1))
            keys = [key for key, _ in keys_labels]
            record = writer.write_shard(shard.name, cols, keys, [], source=shard.url)
            writer.record(shard.name, record, keys, source_bytes=tar.stat().st_size)


def _upload(fs: Any, local: Path, remote: str) -> None:
    fs.put(str(local), remote, recursive=True)


def _options(data: str, cache: str, out: Path, **kw: Any) -> Any:
    from e2kd.stages._train_student import TrainOptions

    return TrainOptions(data=data, cache=cache, student=STUDENT[0], student_kwargs=dict(STUDENT[1]), out=str(out),
                        **{"epochs": 1, "batch_size": 32, "progress": False, "overwrite": True,
                           "crop_scale": (0.7, 1.0), **kw})


def _first_step(data: str, cache: str, out: Path, listing: bool = False) -> float:
    """Seconds from nothing to one optimiser step (plan, model, first batch, step)."""
    import e2kd.pipeline._loader as loader
    from e2kd.stages._train_student import prepare_student

    real = loader._trusted
    if listing:
        loader._trusted = lambda shard, store: False  # the former plan: list every input tar
    try:
        t0 = time.perf_counter()
        run = prepare_student(_options(data, cache, out))
        run.trainer.stream.set_epoch(0)
        run.trainer.step(next(iter(run.trainer.loader)))
        return time.perf_counter() - t0
    finally:
        loader._trusted = real


def _plan_time(data: str, cache: str, listing: bool = False) -> float:
    """Seconds to open the cache and plan the join (the part that scales with the input)."""
    import e2kd.pipeline._loader as loader
    from e2kd.pipeline._sources import list_shards
    from e2kd.storage import open_store

    real = loader._trusted
    if listing:
        loader._trusted = lambda shard, store: False
    try:
        t0 = time.perf_counter()
        loader.plan_join(list_shards(data), open_store(cache), labels=False)
        return time.perf_counter() - t0
    finally:
        loader._trusted = real


def _step_time(data: str, cache: str, out: Path, steps: int) -> float:
    """s/step over ``steps`` loader steps (first pass over the data: every shard read from its store)."""
    from e2kd.pipeline._train_stream import endless_batches
    from e2kd.stages._train_student import prepare_student

    run = prepare_student(_options(data, cache, out, workers=0))
    run.trainer.stream.set_epoch(0)
    it = endless_batches(run.trainer.stream, run.trainer.loader)  # more steps than an epoch may have
    run.trainer.step(next(it))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        run.trainer.step(next(it))
    return (time.perf_counter() - t0) / steps


def _epoch2_step_time(data: str, cache: str, out: Path, local_cache: Path | None) -> float:
    """s/step of the second epoch (the first is run untimed: with ``local_cache`` it fills it)."""
    import shutil

    from e2kd.stages._train_student import prepare_student

    if local_cache is not None:
        shutil.rmtree(local_cache, ignore_errors=True)
    run = prepare_student(_options(data, cache, out, workers=0, epochs=2,
                                   local_cache=str(local_cache) if local_cache else None))
    trainer = run.trainer
    trainer.train_epoch(0, 0)
    trainer.stream.set_epoch(1)
    it = iter(trainer.loader)
    t0 = time.perf_counter()
    for _ in range(trainer.steps_per_epoch):
        trainer.step(next(it))
    return (time.perf_counter() - t0) / trainer.steps_per_epoch


def local_cache_section(work: Path, rounds: int = 3) -> str:
    """Epoch-2 s/step from s3 with and without --local-cache (the 8 × 50 set, data and cache on s3)."""
    data, cache = "s3://bench/a/a-{000000..000007}.tar", "s3://bench/cache-a"
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        times["without"].append(_epoch2_step_time(data, cache, work / "run", None))
        times["with"].append(_epoch2_step_time(data, cache, work / "run", work / "local-cache"))
    print("local cache", times, flush=True)
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    return (f"**Epoch 2 from s3 with `--local-cache`** (8 shards × 50 samples, data and cache on s3, batch 32, "
            f"no DataLoader workers, median of {rounds} alternating runs): without {without * 1e3:.1f} ms/step, "
            f"with {with_ * 1e3:.1f} ms/step → **{with_ / without:.2f}×** (every shard read from local disk "
            f"after epoch 1, verified by sha256; on loopback S3 a download costs little, on a cloud region more).")


def _objects_and_read(fs: Any, local_store: Path, remote_store: str) -> dict[str, Any]:
    from e2kd.storage import open_store

    name = open_store(str(local_store)).shard_names[0]
    objects = len(fs.find(f"{remote_store[5:]}/shards/{name}"))
    rec = open_store(str(local_store)).manifest.shards[name]
    times = {}
    for where, uri in (("local", str(local_store)), ("s3", remote_store)):
        runs = []
        for _ in range(5):
            store = open_store(uri)
            t0 = time.perf_counter()
            store.shard_columns(name)
            runs.append(time.perf_counter() - t0)
        times[where] = statistics.median(runs)
    return {"objects": objects, "samples": rec.num_samples, "bytes": rec.nbytes, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/RESULTS.md")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--steps-only", action="store_true", help="Only the s/step comparison (printed).")
    parser.add_argument("--local-cache-only", action="store_true", help="Only the --local-cache comparison.")
    args = parser.parse_args()

    import s3fs
    import torch

    from e2kd.pipeline._datasets import make_digits_shift
    from e2kd.storage._options import apply_storage_options

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    server, options = _server()
    apply_storage_options({"s3": options})
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench")
    work = Path(tempfile.mkdtemp(prefix="e2kd-bench-s3-"))
    make_digits_shift(work / "digits", seed=0, image_size=64, shard_size=250)
    samples = _samples(work / "digits")

    sets = {"8 small": ("a", 8, 50), "64 small": ("b", 64, 50), "64 large": ("c", 64, 400)}
    if args.local_cache_only:
        tars = _write_shards(work / "a", "a", 8, 50, samples)
        _upload(fs, work / "a", "bench/a")
        _cache("s3://bench/cache-a", tars, "s3://bench/a/a-{000000..000007}.tar")
        _write_local_cache(args.out, local_cache_section(work), "--local-cache-only ")
        server.terminate()
        return
    if args.steps_only:
        sets = {"64 large": sets["64 large"]}
    first: dict[str, dict[str, float]] = {}
    for label, (prefix, count, per) in sets.items():
        tars = _write_shards(work / prefix, prefix, count, per, samples)
        local_data = f"{work / prefix}/{prefix}-{{000000..{count - 1:06d}}}.tar"
        _upload(fs, work / prefix, f"bench/{prefix}")
        s3_data = f"s3://bench/{prefix}/{prefix}-{{000000..{count - 1:06d}}}.tar"
        _cache(f"s3://bench/cache-{prefix}", tars, s3_data)
        size = sum(t.stat().st_size for t in tars)
        cache = f"s3://bench/cache-{prefix}"
        first[label] = {"bytes": size, "trusted": min(_first_step(s3_data, cache, work / "run") for _ in range(2)),
                        "listing": _first_step(s3_data, cache, work / "run", listing=True),
                        "plan": min(_plan_time(s3_data, cache) for _ in range(3)),
                        "plan_listing": _plan_time(s3_data, cache, listing=True)}
        print(label, first[label], flush=True)

    # s/step, s3 vs local: the same 64 large shards and cache, alternating
    prefix = "c"
    local_data = f"{work / prefix}/{prefix}-{{000000..000063}}.tar"
    _cache(str(work / "cache-c"), sorted((work / prefix).glob("*.tar")), local_data)
    s3_data = f"s3://bench/{prefix}/{prefix}-{{000000..000063}}.tar"
    steps: dict[str, list[float]] = {"local": [], "s3": []}
    for _ in range(3):
        steps["local"].append(_step_time(local_data, str(work / "cache-c"), work / "run", args.steps))
        steps["s3"].append(_step_time(s3_data, "s3://bench/cache-c", work / "run", args.steps))
    print(steps, flush=True)
    if args.steps_only:
        server.terminate()
        return

    local_cache = local_cache_section(work)

    # objects per shard and one shard's read time (1000 samples, 64-sample chunks: 16 chunks per column)
    big = _write_shards(work / "d", "d", 1, 1000, samples)
    _cache(str(work / "cache-d"), big, str(big[0]))
    _upload(fs, work / "cache-d", "bench/cache-d")
    objects = _objects_and_read(fs, work / "cache-d", "s3://bench/cache-d")
    server.terminate()

    lines = [f"Command: `.venv/bin/python bench/bench_s3.py --out {args.out}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; "
             f"{time.strftime('%Y-%m-%d')}. S3 = moto's standalone server (its own process) on loopback through s3fs "
             f"(request latency of a local HTTP server, not of a cloud region).", "",
             "**Objects per store shard** (zarr, sharding codec, a CRC32C per chunk): one shard of "
             f"{objects['samples']} samples, {objects['bytes']} B → **{objects['objects']} objects** (one data "
             f"object per column + metadata + keys/errors; without the sharding codec every 64-sample chunk of "
             f"every column was its own object). Reading that shard (verified): local "
             f"{objects['local'] * 1e3:.1f} ms, s3 {objects['s3'] * 1e3:.1f} ms.", "",
             "**Time to first step** (train-student, `--data` and `--cache` on s3: plan, model, first batch, one "
             "step; best of 2):", "",
             "| input | bytes | first step: key index (now) | first step: listing every tar (before) | "
             "plan only: key index | plan only: listing |", "|---|---|---|---|---|---|"]
    for label, row in first.items():
        lines.append(f"| {label} shards | {row['bytes'] / 1e6:.1f} MB | {row['trusted']:.2f} s | "
                     f"{row['listing']:.2f} s | {row['plan']:.3f} s | {row['plan_listing']:.2f} s |")
    r8, p8 = (first["64 small"][k] / first["8 small"][k] for k in ("trusted", "plan"))
    rl, pl = (first["64 large"][k] / first["64 small"][k] for k in ("trusted", "plan"))
    per_shard = (first["64 small"]["trusted"] - first["8 small"]["trusted"]) / 56
    lines += ["", f"Ratios with the key index — 64 / 8 small shards: plan **{p8:.1f}×**, first step {r8:.2f}× "
              f"(shards ratio 8×; ≈ {per_shard * 1e3:.0f} ms per shard on top of a fixed ≈ "
              f"{first['8 small']['trusted'] - 8 * per_shard:.1f} s for model, first batch and step); 64 large / "
              f"64 small: plan **{pl:.2f}×**, first step {rl:.2f}× (bytes ratio "
              f"{first['64 large']['bytes'] / first['64 small']['bytes']:.1f}×). The plan costs three small "
              f"requests per shard (the input's size, the cache shard's keys.json and errors.json).", ""]
    local, remote = statistics.median(steps["local"]), statistics.median(steps["s3"])
    lines += [f"**s/step from s3 vs local** (64 shards × 400 samples, batch 32, first pass, {args.steps} steps, "
              f"median of 3 alternating runs; the server shares the 2 cores with training): local "
              f"{local * 1e3:.1f} ms, s3 {remote * 1e3:.1f} ms → "
              f"**{remote / local:.2f}×** (goal ≤ 1.1×)."]
    write_section(args.out, "s3", "## Object storage (s3)\n\n" + "\n".join(lines))
    _write_local_cache(args.out, local_cache, "")
    print("\n".join(lines))


def _write_local_cache(out: str, section: str, flag: str) -> None:
    write_section(out, "s3-local-cache", "## Object storage: a local shard cache\n\nCommand: "
                  f"`.venv/bin/python bench/bench_s3.py {flag}--out {out}`; {os.cpu_count()} cores, no GPU, "
                  f"{time.strftime('%Y-%m-%d')}.\n\n" + section)


if __name__ == "__main__":
    main()
