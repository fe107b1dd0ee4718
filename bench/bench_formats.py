"""Bytes per sample per view of the same cached values as Zarr, as WebDataset (e2kd ≥ 0.4) and as the wds layout of
e2kd 0.3 (one tar member per column).

Run: ``RAY_AUTH_MODE=disabled .venv/bin/python bench/bench_formats.py [--out bench/RESULTS.md]`` (part of
``make bench``).

Each configuration runs the real ``cache-teacher`` (zarr) over digits-shift images (real handwritten digits,
rendered at 64 px); every cached shard's columns are then written again, through the real shard writer, in each
WebDataset layout. Bytes are whole shards (data, keys, errors, member index) over samples × views.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from legacy_wds import write_column_members  # noqa: E402
from report import write_section  # noqa: E402

from e2kd.pipeline._datasets import make_digits_shift  # noqa: E402
from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher  # noqa: E402
from e2kd.storage import open_store  # noqa: E402
from e2kd.storage._shards import stage_shard  # noqa: E402
from e2kd.storage._wds_store import WdsFormat  # noqa: E402

NARROW = {"channels": [32, 64, 128, 256], "stem_width": 32, "output_stride": 16}
CONFIGS = {  # name → cache-teacher options
    "GradCAM, 10 classes, 1 view (full)": dict(teacher="resnet18", num_classes=10, teacher_kwargs=NARROW,
                                              views="full", explainer="gradcam"),
    "GradCAM, 10 classes, 4 views": dict(teacher="resnet18", num_classes=10, teacher_kwargs=NARROW, views="4",
                                         explainer="gradcam"),
    "GradCAM, 1000 classes, 1 view": dict(teacher="resnet18", num_classes=1000, teacher_kwargs=NARROW, views="full",
                                          explainer="gradcam"),
    "B-cos 6×64×64 maps, 10 classes, 1 view": dict(teacher="bcos:resnet18", num_classes=10,
                                                   teacher_kwargs={"inplanes": 16}, views="full", explainer="bcos"),
}


def _restaged_bytes(store: object, work: Path, fmt: str, legacy: bool) -> int:
    """The store's shards written again in ``fmt`` (``legacy``: the e2kd 0.3 wds layout); total bytes."""
    original = WdsFormat.write
    if legacy:
        WdsFormat.write = write_column_members  # type: ignore[method-assign]
    try:
        total = 0
        for name in store.shard_names:  # type: ignore[attr-defined]
            keys, cols = store.shard_columns(name)  # type: ignore[attr-defined]
            shard, _, nbytes = stage_shard(work, fmt, cols, keys, store.shard_errors(name),  # type: ignore
                                           store.encoding)  # type: ignore[attr-defined]
            shutil.rmtree(shard)
            total += nbytes
        return total
    finally:
        WdsFormat.write = original  # type: ignore[method-assign]


def measure(urls: str, work: Path) -> list[dict]:
    rows = []
    for label, config in CONFIGS.items():
        out = work / "store"
        run_cache_teacher(CacheTeacherOptions(data=urls, out=str(out), input_size=64, batch_size=32, actors=2,
                                              random_teacher=True, progress=False, overwrite=True, **config))
        store = open_store(str(out))
        per = len(store) * store.manifest.num_views
        zarr = sum(store.manifest.shards[n].nbytes for n in store.shard_names)
        wds = _restaged_bytes(store, work / "stage", "wds", legacy=False)
        old = _restaged_bytes(store, work / "stage", "wds", legacy=True)
        rows.append({"config": label, "samples": len(store), "views": store.manifest.num_views,
                     "zarr": zarr / per, "wds": wds / per, "wds_0_3": old / per})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the table into this RESULTS.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="e2kd-formats-"))
    try:
        make_digits_shift(work / "data", image_size=64, shard_size=100)
        rows = measure(f"{work}/data/teacher-train-{{000000..000003}}.tar", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ("| configuration | samples × views | zarr B/view | wds B/view | wds ÷ zarr (goal ≤ 2) "
             "| wds of e2kd 0.3 B/view | 0.3 ÷ zarr |\n|---|---:|---:|---:|---:|---:|---:|\n" +
             "\n".join(f"| {r['config']} | {r['samples']} × {r['views']} | {r['zarr']:.0f} | {r['wds']:.0f} | "
                       f"{r['wds'] / r['zarr']:.2f} | {r['wds_0_3']:.0f} | {r['wds_0_3'] / r['zarr']:.2f} |"
                       for r in rows))
    print(table)
    if args.out:
        write_section(args.out, "bench-formats", f"""### Store formats: bytes per sample per view

`RAY_AUTH_MODE=disabled .venv/bin/python bench/bench_formats.py --out bench/RESULTS.md` — cache-teacher (zarr,
random-init teachers) over 400 digits-shift images at 64 px; the same cached columns written again as WebDataset
shards (one gzip-compressed tar, one structured `.npy` record per sample) and in e2kd 0.3's wds layout (one
uncompressed tar member per column). Whole shards: data, keys, errors and member index.

{table}""")


if __name__ == "__main__":
    main()
