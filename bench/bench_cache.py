"""Benchmark of cache-teacher: stage throughput vs the bare teacher loop, and bytes/fidelity per encoding.

Run: ``make bench`` (or ``.venv/bin/python bench/bench_cache.py [--out bench/RESULTS.md]``).

1. Throughput, measured side by side in one run on the same images: the whole stage (Ray actors, decoding,
   view rendering, encoding, compression, checksums, commits; start-up reported separately) against a bare
   in-process ``explainer(x)`` loop over the same views already decoded and rendered in memory, using the
   same number of cores. The ratio is the figure (goal >= 0.9).
2. Storage: bytes per sample per view for GradCAM and B-cos maps under each map dtype and Blosc codec,
   with the cosine similarity of decoded maps to the float32 originals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from report import write_section  # noqa: E402

from e2kd.explain import build_explainer  # noqa: E402
from e2kd.models import create_model, input_transform  # noqa: E402
from e2kd.pipeline._datasets import make_digits_shift  # noqa: E402
from e2kd.pipeline._sources import Sample, iter_shard, list_shards  # noqa: E402
from e2kd.pipeline._views import ViewPolicy, render_view  # noqa: E402
from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher  # noqa: E402
from e2kd.storage import Encoding  # noqa: E402
from e2kd.storage._shards import stage_shard  # noqa: E402

TEACHER_KWARGS = {"channels": [32, 64, 128, 256], "stem_width": 32, "output_stride": 16}


def bare_loop(urls: str, size: int, views: ViewPolicy, batch: int, threads: int) -> tuple[float, int]:
    """Teacher forward + explanation only, over views already rendered in memory."""
    torch.set_num_threads(threads)
    model = create_model("resnet18", 10, **TEACHER_KWARGS).eval().requires_grad_(False)
    explainer, transform = build_explainer("gradcam", model), input_transform(model)
    inputs = []
    for shard in list_shards(urls):
        for s in iter_shard(shard):
            if isinstance(s, Sample):
                inputs += [render_view(s.image, v.as_list(), (size, size))
                           for v in views.views_for(s.key, *s.image.shape[1:])]
    t0 = time.perf_counter()
    for i in range(0, len(inputs), batch):
        explainer(transform(torch.stack(inputs[i:i + batch])))
    return time.perf_counter() - t0, len(inputs)


def stage(urls: str, out: Path, size: int, views: str, batch: int, workers: int) -> dict:
    opts = CacheTeacherOptions(data=urls, out=str(out), teacher="resnet18", num_classes=10,
                               teacher_kwargs=TEACHER_KWARGS, views=views, flip_p=0.0, input_size=size,
                               batch_size=batch, actors=workers, threads_per_actor=1, progress=False,
                               overwrite=True, random_teacher=True)
    return run_cache_teacher(opts)


def storage_table(size: int, n: int = 64) -> list[dict]:
    """Bytes per sample per view and decoded-map fidelity for GradCAM and B-cos maps."""
    torch.manual_seed(0)
    images = torch.rand(n, 3, size, size)
    rows = []
    for name, explainer_name, kwargs in (("resnet18", "gradcam", TEACHER_KWARGS),
                                         ("bcos:resnet18", "bcos", {"inplanes": 16})):
        model = create_model(name, 10, **kwargs).eval().requires_grad_(False)
        maps = build_explainer(explainer_name, model)(input_transform(model)(images))[0].numpy()[:, None]
        logits = np.zeros((n, 1, 10), np.float32)
        for map_dtype in ("float16", "uint8"):
            for cname in ("zstd", "lz4"):
                enc = Encoding(num_classes=10, map_dtype=map_dtype, cname=cname)
                cols = enc.encode(logits, maps)
                cols["labels"], cols["views"] = np.zeros(n, np.int32), np.zeros((n, 1, 5), np.float32)
                with tempfile.TemporaryDirectory() as tmp:
                    _, _, nbytes = stage_shard(Path(tmp), "zarr", cols, [f"k{i}" for i in range(n)], [], enc)
                dec = enc.decode_maps(cols).numpy().reshape(n, -1)
                ref = maps.reshape(n, -1)
                cos = (dec * ref).sum(1) / (np.linalg.norm(dec, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
                rows.append({"explainer": explainer_name, "map_shape": list(maps.shape[2:]), "map_dtype": map_dtype,
                             "codec": f"blosc-{cname}", "bytes_per_sample_view": nbytes / n,
                             "raw_float32_bytes": int(np.prod(maps.shape[2:]) * 4),
                             "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write a Markdown report here (default: print only)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", default="4")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="e2kd-bench-"))
    try:
        make_digits_shift(work / "data", image_size=args.size, shard_size=100)
        urls = f"{work}/data/teacher-train-{{000000..000010}}.tar"
        summary = stage(urls, work / "store", args.size, args.views, args.batch, workers=cores)
        bare_s, n_views = bare_loop(urls, args.size, ViewPolicy.parse(args.views, flip_p=0.0), args.batch, cores)
        stage_rate = summary["samples_per_s"] * int(args.views)
        bare_rate = n_views / bare_s
        result = {"cores": cores, "views_per_sample": int(args.views), "input_size": args.size,
                  "samples": summary["num_samples"], "stage_views_per_s": stage_rate,
                  "stage_startup_s": summary["startup_seconds"], "bare_views_per_s": bare_rate,
                  "ratio": stage_rate / bare_rate, "storage": storage_table(args.size)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        write_section(args.out, "cache-teacher", report(result, " ".join(sys.argv)))


def report(r: dict, command: str) -> str:
    lines = ["## cache-teacher", "", f"Command: `{command}` (via `make bench`), "
             f"{r['cores']} CPU cores, no GPU, {r['samples']} digits-shift images at {r['input_size']} px, "
             f"{r['views_per_sample']} views each, narrow ResNet-18 teacher (widths 32–256), GradCAM.", "",
             "| path | views/s |", "|---|---|",
             f"| whole stage (Ray actors, decode, render, encode, compress, checksum, commit) | "
             f"{r['stage_views_per_s']:.1f} |",
             f"| bare teacher forward + explanation on in-memory views | {r['bare_views_per_s']:.1f} |",
             f"| **ratio** (goal ≥ 0.9) | **{r['ratio']:.2f}** |", "",
             f"Stage start-up (Ray + loading one teacher per actor), not in the rate: {r['stage_startup_s']:.1f} s.",
             "", "### Bytes per sample per view and decoded-map fidelity", "",
             "| explainer | map | dtype | codec | bytes/sample/view | raw float32 | min cos | mean cos |",
             "|---|---|---|---|---|---|---|---|"]
    for s in r["storage"]:
        lines.append(f"| {s['explainer']} | {'×'.join(map(str, s['map_shape']))} | {s['map_dtype']} | {s['codec']} "
                     f"| {s['bytes_per_sample_view']:.0f} | {s['raw_float32_bytes']} | {s['min_cosine']:.5f} "
                     f"| {s['mean_cosine']:.5f} |")
    lines += ["", "bytes/sample/view include logits (float16), target, view box and label, compressed; "
              "B-cos maps are random-init nets' maps on random images, so compression is a lower bound.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
