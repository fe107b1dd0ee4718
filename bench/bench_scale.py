"""Stores of many shards: what one commit, a resume, ``inspect``, ``verify`` and train-student's plan cost per shard.

Run: ``.venv/bin/python bench/bench_scale.py [--shards 100,1000,10000] [--json] [--out bench/RESULTS.md]``
(``make bench`` runs the default sizes).

For each size, a synthetic store of that many shards of 16 samples each (one view, 10 classes, 7×7 maps) is written
through the real writer (``write_shard`` then ``record``, as cache-teacher's driver does). Per size it prints:

- ``commit``: the median time of making one written shard visible to readers (``record``: its commit record), timed
  side by side: once every store is built, ``--rounds`` more shards are committed into each, round by round, one
  per store (so the machine's drift — on this VM mostly fsync latency — hits every size alike); its mean over
  every commit (building included, compactions too: the amortised cost) and the slowest one;
- ``rewrite``: what one commit cost before commit records — rewriting the whole manifest at this size (median of 5);
- ``close``: the final compaction; ``resume``: reopening the store for writing (manifest, records, key index);
  ``inspect``, ``verify``, ``plan``: ``summarise_store``, ``open_store(…).verify()`` and ``plan_join`` over inputs
  whose sizes match the cache (the plan's fast path), each per shard.

The last line with ``--json`` is one JSON object: ``{"commit_ms_per_shard": {"100": …}, …}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from e2kd.pipeline._loader import plan_join  # noqa: E402
from e2kd.pipeline._sources import list_shards  # noqa: E402
from e2kd.stages._inspect import summarise_store  # noqa: E402
from e2kd.storage import Encoding, Manifest, create_store, open_store  # noqa: E402
from e2kd.storage._files import MANIFEST, resolve, write_json_atomic  # noqa: E402

SAMPLES, CLASSES = 16, 10


def _manifest(fmt: str) -> Manifest:
    return Manifest(e2kd_version="bench", format=fmt, teacher={"name": "t", "num_classes": CLASSES, "kwargs": {}},
                    explainer={"name": "gradcam", "family": "gradcam"}, preprocessing={"input_size": [64, 64]},
                    views={"policy": "random_resized_crop", "k": 1}, encoding=Encoding(num_classes=CLASSES),
                    precision="fp32")


def _columns(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    encoding = Encoding(num_classes=CLASSES)
    cols = encoding.encode(rng.normal(size=(SAMPLES, 1, CLASSES)).astype(np.float32),
                           rng.random((SAMPLES, 1, 1, 7, 7), dtype=np.float32))
    cols["labels"] = rng.integers(0, CLASSES, SAMPLES).astype(np.int32)
    cols["views"] = rng.random((SAMPLES, 1, 5), dtype=np.float32)
    return cols


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


class _Store:
    """One synthetic store being written: ``n`` input stand-ins, the writer, the commit timings."""

    def __init__(self, n: int, work: Path, fmt: str) -> None:
        self.n, self.inputs, self.uri = n, work / "inputs", str(work / "store")
        self.inputs.mkdir(parents=True)
        self.manifest, self.cols, self.written = _manifest(fmt), _columns(0), 0
        self.writer = create_store(self.uri, self.manifest)

    def commit_one(self) -> float:
        """Write the next shard (untimed) and make it visible (timed: ``record``); seconds."""
        name = f"in-{self.written:06d}"
        (self.inputs / f"{name}.tar").write_bytes(name.encode())  # the plan trusts a shard whose size it recorded
        keys = [f"{name}/{j}" for j in range(SAMPLES)]
        record = self.writer.write_shard(name, self.cols, keys, [], source=str(self.inputs / f"{name}.tar"))
        self.written += 1
        return _timed(lambda: self.writer.record(name, record, keys, source_bytes=len(name)))

    def finish(self) -> dict[str, float]:
        """Close the writer (the final compaction), then time resume, inspect, verify and the plan."""
        close = _timed(self.writer.close)
        n, uri = self.written, self.uri
        resume = _timed(lambda: create_store(uri, self.manifest).close())
        inspect = _timed(lambda: summarise_store(uri))
        verify = _timed(lambda: open_store(uri).verify())
        plan = _timed(lambda: plan_join(list_shards(f"{self.inputs}/in-{{000000..{n - 1:06d}}}.tar"),
                                        open_store(uri)))
        fs, root = resolve(uri)
        full = open_store(uri).manifest
        name = next(iter(full.shards))
        rewrite = statistics.median(_timed(lambda: write_json_atomic(
            fs, f"{root}/{MANIFEST}.bench", full.with_shard(name, full.shards[name]).to_json())) for _ in range(5))
        ms = 1000.0
        return {"rewrite_ms": rewrite * ms, "close_ms": close * ms, "resume_ms_per_shard": resume * ms / n,
                "inspect_ms_per_shard": inspect * ms / n, "verify_ms_per_shard": verify * ms / n,
                "plan_ms_per_shard": plan * ms / n}


def measure(sizes: list[int], work: Path, fmt: str, rounds: int) -> list[dict[str, float]]:
    """Build a store of each size, then commit ``rounds`` more shards into each, interleaved (round by round, one
    commit per store: the machine's drift hits every size alike), and time the rest."""
    stores, building = [], []
    for n in sizes:
        store = _Store(n, work / str(n), fmt)
        building.append([store.commit_one() for _ in range(n)])
        stores.append(store)
        print(f"  {n} shards written", file=sys.stderr)
    side_by_side: list[list[float]] = [[] for _ in sizes]
    for _ in range(rounds):
        for i, store in enumerate(stores):
            side_by_side[i].append(store.commit_one())
    ms = 1000.0
    return [{"shards": n, "commit_ms_median": statistics.median(timed) * ms,
             "commit_ms_mean": statistics.fmean(built + timed) * ms, "commit_ms_max": max(built + timed) * ms,
             "build_commit_ms_median": statistics.median(built) * ms, **store.finish()}
            for n, store, built, timed in zip(sizes, stores, building, side_by_side, strict=True)]


def _table(rows: list[dict[str, float]]) -> str:
    head = ("| shards | commit median, side by side (ms) | commit mean (ms) | commit max (ms) "
            "| manifest rewrite (ms, the old commit) | close (ms) | resume / shard (ms) | inspect / shard (ms) "
            "| verify / shard (ms) | plan / shard (ms) |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['shards']:,} | {r['commit_ms_median']:.2f} | {r['commit_ms_mean']:.2f} | {r['commit_ms_max']:.1f} | "
        f"{r['rewrite_ms']:.1f} | {r['close_ms']:.0f} | {r['resume_ms_per_shard']:.2f} | "
        f"{r['inspect_ms_per_shard']:.2f} | {r['verify_ms_per_shard']:.2f} | {r['plan_ms_per_shard']:.2f} |"
        for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="100,1000,10000", help="comma-separated store sizes (shards)")
    parser.add_argument("--format", default="wds", choices=["wds", "zarr"], help="shard format (commits do not "
                        "depend on it; wds writes faster)")
    parser.add_argument("--rounds", type=int, default=300, help="commits timed per store, interleaved across sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--out", help="write the table into this RESULTS.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.shards.split(",")]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="e2kd-scale-") as tmp:
        rows = measure(sizes, Path(tmp), args.format, args.rounds)
    for row in rows:
        print(f"{row['shards']} shards: {json.dumps({k: round(v, 3) for k, v in row.items()})}", file=sys.stderr)
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    table = _table(rows)
    print(table)
    first, last = rows[0], rows[-1]
    ratio = last["commit_ms_median"] / first["commit_ms_median"]
    print(f"commit cost per shard at {last['shards']:,} shards / at {first['shards']:,}: {ratio:.2f}x (median), "
          f"{last['commit_ms_mean'] / first['commit_ms_mean']:.2f}x (mean)")
    if args.out:
        write_section(args.out, "bench-scale", f"""### Stores of many shards: commit, resume, inspect, verify, plan

`.venv/bin/python bench/bench_scale.py --shards {args.shards} --out bench/RESULTS.md` — synthetic {args.format}
stores of {SAMPLES}-sample shards written through the real writer, on this machine (2 cores). A commit is one
commit record (`commits/<shard>.json`); the manifest absorbs the records when they reach a quarter of its shards
and when the writer closes. "Manifest rewrite" is what each commit cost before (the whole manifest rewritten),
timed in the same run.

{table}

Commit cost per shard at {last['shards']:,} shards is {ratio:.2f}× that at {first['shards']:,} (median;
{last['commit_ms_mean'] / first['commit_ms_mean']:.2f}× the mean, compactions included).""")
    if args.json:
        print(json.dumps({"commit_ms_per_shard": {str(r["shards"]): round(r["commit_ms_median"], 4) for r in rows},
                          "commit_ms_mean": {str(r["shards"]): round(r["commit_ms_mean"], 4) for r in rows},
                          "rows": rows}))


if __name__ == "__main__":
    main()
