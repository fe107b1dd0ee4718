"""The training order's locality: how often each rank reads each input (and cache) shard per epoch, and how far
apart the samples of one shard land.

Run: ``.venv/bin/python bench/bench_order.py [--out bench/RESULTS.md]`` (part of ``make bench``; pure computation
over :class:`e2kd.pipeline._order.Order`, no data).

A reader is one partition (read by one DataLoader worker of one rank, front to back); a rank reads a shard once for
every one of its partitions the shard falls in. Configurations: an ImageNet-sized input (1,281 shards of ~1,000
samples) at 8 ranks × 32 and 8 workers each, and the digits-shift demo's training data at 1 rank × 16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from e2kd.pipeline._order import Order, default_partitions  # noqa: E402

CONFIGS = {  # name → (shards, samples per shard, ranks, batch per rank, workers)
    "ImageNet-sized, 8 ranks × 32, 8 workers": (1281, 1000, 8, 32, 8),
    "ImageNet-sized, 1 rank × 256, 8 workers": (1281, 1000, 1, 256, 8),
    "digits-shift train (6 × 50), 1 rank × 16": (6, 50, 1, 16, 0),
}


def measure(shards: int, per_shard: int, ranks: int, batch: int, workers: int) -> dict[str, float]:
    keys = {f"shard-{i:06d}": [f"{i}/{j}" for j in range(per_shard - (i % 7))] for i in range(shards)}
    global_batch = batch * ranks
    order = Order(keys, seed=0, global_batch=global_batch,
                  partitions=default_partitions(global_batch, ranks * max(1, workers)))
    steps = order.steps_per_pass
    reads: Counter[tuple[int, str]] = Counter()  # (rank, shard) → readers of that rank that read it
    steps_of: dict[str, list[int]] = defaultdict(list)
    per_rank = order.partitions // ranks
    for p in range(order.partitions):
        rank, touched = p // per_rank, set()
        for step in range(steps):
            for item in order.partition_items(0, step, p):
                touched.add(item.shard)
                steps_of[item.shard].append(step)
        for shard in touched:
            reads[rank, shard] += 1
    spans = [max(s) - min(s) + 1 for s in steps_of.values()]
    counts = list(reads.values())
    return {"partitions": order.partitions, "steps": steps, "max_reads": max(counts),
            "twice": sum(1 for c in counts if c > 1) / len(counts), "span_median": statistics.median(spans),
            "span_share": statistics.median(spans) / steps, "shards_per_batch": order.partitions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the table into this RESULTS.md")
    args = parser.parse_args()
    rows = {name: measure(*config) for name, config in CONFIGS.items()}
    table = ("| configuration | partitions | steps / epoch | reads of a shard by one rank (max) | (rank, shard) pairs "
             "read twice | a shard's samples span (median steps) | of the epoch |\n"
             "|---|---:|---:|---:|---:|---:|---:|\n" +
             "\n".join(f"| {name} | {r['partitions']} | {r['steps']} | {r['max_reads']} | {100 * r['twice']:.1f} % | "
                       f"{r['span_median']:.0f} | {100 * r['span_share']:.1f} % |" for name, r in rows.items()))
    print(table)
    if args.out:
        write_section(args.out, "bench-order", f"""### The training order: reads per shard and locality

`.venv/bin/python bench/bench_order.py --out bench/RESULTS.md` — computed from `e2kd.pipeline._order.Order` with the
default partitions (the smallest multiple of ranks × workers ≥ 8 dividing the global batch). Each partition is read
front to back by one worker of one rank; a shard cut by a partition boundary is read by the readers on both sides
(when both belong to the same rank, that rank reads it twice). Every global batch draws global batch / partitions
consecutive (block-shuffled) samples from each partition, so a shard's samples land within a stretch of the epoch.

{table}""")


if __name__ == "__main__":
    main()
