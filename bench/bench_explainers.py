"""The marginal cost of a second explanation field: cache-teacher's worker over the same shards with one explainer
(GradCAM), with two (GradCAM + input×gradient) sharing one teacher forward, and with the two in separate passes,
interleaved, best of three each.

Run: ``.venv/bin/python bench/bench_explainers.py [--out bench/RESULTS.md]`` (also part of ``make bench``).
In-process worker (no Ray), narrow ResNet-18 teacher, digits-shift at 64 px, 2 views per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from e2kd.pipeline._datasets import make_digits_shift  # noqa: E402
from e2kd.pipeline._sources import list_shards  # noqa: E402
from e2kd.pipeline._views import ViewPolicy  # noqa: E402
from e2kd.stages._cache_teacher.worker import TeacherWorker, WorkerSpec  # noqa: E402
from e2kd.storage import Encoding, ShardWriter  # noqa: E402
from e2kd.storage._fields import Field  # noqa: E402

TEACHER = {"name": "resnet18", "num_classes": 10, "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16,
                                                             "output_stride": 16}}


def _worker(explainers: list[str], work: Path) -> TeacherWorker:
    encoding = Encoding(num_classes=10, map_size=(4, 4))
    fields = (Field("logits", "logits", encoding.logits_codec, {"name": "teacher"}),
              *(Field(n, "explanation", encoding.map_codec, {"name": n}, "" if i == 0 else f"{n}__")
                for i, n in enumerate(explainers)))
    encoding = encoding.with_fields(fields)
    spec = WorkerSpec(teacher=TEACHER, explainer={"name": explainers[0]},
                      extra_explainers=tuple({"name": n} for n in explainers[1:]),
                      views=ViewPolicy(k=2, scale=(0.3, 1.0), flip_p=0.5, seed=0).to_dict(), input_size=(64, 64),
                      encoding=encoding, writer=ShardWriter(str(work), "zarr", encoding), batch_size=64,
                      threads=torch.get_num_threads())
    torch.manual_seed(0)
    return TeacherWorker(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write a Markdown report here (default: print only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="e2kd-bench-") as work:
        make_digits_shift(Path(work) / "data", image_size=64, shard_size=200)
        shards = list_shards(f"{work}/data/teacher-train-{{000000..000002}}.tar")
        separate = _worker(["gradcam", "input_x_gradient"], Path(work))
        for explainer in separate.explainers.values():  # the fallback: each explainer its own forward
            explainer.shared_needs = lambda: None  # type: ignore[method-assign]
        workers = {"gradcam": _worker(["gradcam"], Path(work)),
                   "gradcam+input_x_gradient": _worker(["gradcam", "input_x_gradient"], Path(work)),
                   "separate passes": separate}
        best = {name: float("inf") for name in workers}
        samples = 0
        for _ in range(3):  # interleaved: the machine's noise hits both alike
            for name, worker in workers.items():
                t0 = time.perf_counter()
                samples = sum(len(worker.compute(shard)[1]) for shard in shards)
                best[name] = min(best[name], time.perf_counter() - t0)
    result = {"samples": samples, "views": 2, "seconds": best,
              "marginal_cost": best["gradcam+input_x_gradient"] / best["gradcam"] - 1}
    print(json.dumps(result, indent=1))
    if args.out:
        write_section(args.out, "explainers", report(result, " ".join(["bench/bench_explainers.py", *sys.argv[1:]])))


def report(r: dict, command: str) -> str:
    one, two, apart = (r["seconds"][k] for k in ("gradcam", "gradcam+input_x_gradient", "separate passes"))
    return "\n".join([
        "## A second explanation field (cache-teacher --explainers)", "",
        f"Command: `.venv/bin/python {command}`. The worker's compute (decode, render, teacher, explanations, "
        f"encode; no Ray) over {r['samples']} digits-shift images × {r['views']} views at 64 px, narrow ResNet-18, "
        f"best of 3 interleaved runs, {torch.get_num_threads()} torch threads.", "",
        "| explainers | s | samples/s |", "|---|---|---|",
        f"| gradcam | {one:.2f} | {r['samples'] / one:.0f} |",
        f"| gradcam,input_x_gradient (one shared forward and backward) | {two:.2f} | {r['samples'] / two:.0f} |",
        f"| the same two in separate passes (before sharing) | {apart:.2f} | {r['samples'] / apart:.0f} |", "",
        f"Marginal cost of the second field: **+{100 * r['marginal_cost']:.0f} %** of the one-explainer time "
        f"(+{100 * (apart / one - 1):.0f} % without the shared pass). The teacher's forward, decoding, rendering "
        f"and the store are shared; what remains is the backward through the whole network to the input, which "
        f"input × gradient needs and GradCAM (stopping at the last feature map) does not."])


if __name__ == "__main__":
    main()
