"""Logit codecs at 1000 classes: stored bytes per view (through the real shard writer, compressed) and the bias of
the KD gradient each gives, for `full`, `topk:10` and `sampled:12`.

Run: ``.venv/bin/python bench/bench_logits.py [--out bench/RESULTS.md]`` (also part of ``make bench``).

Teacher logits are synthetic (normal × 3 over 1000 classes: the top 10 classes hold ~70 % of the mass, as for an
ImageNet teacher); the student's logits are normal. The KD gradient (temperature 1) of each codec's decoded target
is compared with the full-logit gradient: relative error ‖ḡ − g‖/‖g‖ and cosine, for one cache and averaged over
256 independently drawn caches (what remains after averaging is the bias), each the mean over 8 random pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from e2kd.losses import kd_loss  # noqa: E402
from e2kd.storage import Encoding  # noqa: E402
from e2kd.storage._codecs import SampledLogits  # noqa: E402
from e2kd.storage._encoding import parse_logits  # noqa: E402
from e2kd.storage._shards import stage_shard  # noqa: E402

CLASSES, SAMPLES, VIEWS = 1000, 512, 1
SPECS = ("full", "topk:10", "sampled:12")


def _logits(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(SAMPLES, VIEWS, CLASSES)) * 3).astype(np.float32)


def bytes_per_view(spec: str, logits: np.ndarray, work: Path) -> float:
    """Bytes of the logit columns per view in a zarr shard written by the real writer (Blosc/zstd + CRC32C)."""
    encoding = Encoding(num_classes=CLASSES, **parse_logits(spec))
    maps = np.zeros((SAMPLES, VIEWS, 1, 1, 1), np.float32)
    cols = encoding.encode(logits, maps)
    cols.update(labels=np.zeros(SAMPLES, np.int32), views=np.full((SAMPLES, VIEWS, 5), 0.5, np.float32))
    shard, _, _ = stage_shard(work, "zarr", cols, [f"k{i}" for i in range(SAMPLES)], [], encoding)
    names = encoding.logits_codec.columns(VIEWS, None)
    total = sum(p.stat().st_size for name in names for p in (shard / "data.zarr" / name).rglob("*") if p.is_file())
    return total / (SAMPLES * VIEWS)


def gradient_errors(spec: str, caches: int = 256, pairs: int = 8) -> dict[str, float]:
    """The codec's KD gradient against the full-logit one, averaged over ``pairs`` random (teacher, student) pairs."""
    results = [_pair_errors(spec, caches, seed) for seed in range(1, pairs + 1)]
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]} | {"pairs": pairs}


def _pair_errors(spec: str, caches: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(1, 1, CLASSES)) * 3).astype(np.float32)
    student = torch.from_numpy(rng.normal(size=(1, CLASSES)).astype(np.float32))

    def grad(teacher: torch.Tensor) -> torch.Tensor:
        s = student.clone().requires_grad_(True)
        kd_loss(s, teacher, 1.0).backward()
        return s.grad

    full = grad(torch.from_numpy(z[:, 0]))
    if spec.startswith("sampled"):
        draws = int(spec.split(":")[1])
        codecs = [SampledLogits(samples=draws, num_classes=CLASSES, seed=1000 * seed + i) for i in range(caches)]
        grads = torch.stack([grad(c.decode(c.encode(z))[:, 0]) for c in codecs])
    else:
        codec = Encoding(num_classes=CLASSES, **parse_logits(spec)).logits_codec
        grads = grad(codec.decode(codec.encode(z))[:, 0])[None]  # deterministic: one cache is every cache

    def stats(g: torch.Tensor) -> tuple[float, float]:
        cos = torch.nn.functional.cosine_similarity(g.flatten(), full.flatten(), 0)
        return float((g - full).norm() / full.norm()), float(cos)

    one_err, one_cos = stats(grads[0])
    mean_err, mean_cos = stats(grads.mean(0))
    return {"one_cache_rel_error": one_err, "one_cache_cosine": one_cos, "mean_rel_error": mean_err,
            "mean_cosine": mean_cos, "caches_averaged": len(grads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write a Markdown report here (default: print only)")
    args = parser.parse_args()
    logits = _logits(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="e2kd-bench-") as work:
        for spec in SPECS:
            rows.append({"logits": spec, "bytes_per_view": bytes_per_view(spec, logits, Path(work)),
                         **gradient_errors(spec)})
    print(json.dumps(rows, indent=1))
    if args.out:
        write_section(args.out, "logit-codecs", report(rows, " ".join(["bench/bench_logits.py", *sys.argv[1:]])))


def report(rows: list[dict], command: str) -> str:
    lines = ["## Logit codecs at 1000 classes", "", f"Command: `.venv/bin/python {command}`. Synthetic teacher "
             f"logits (normal × 3: top-10 mass ≈ 0.7), {SAMPLES} samples × {VIEWS} view through the real zarr shard "
             f"writer; KD gradient at temperature 1 against the full-logit gradient (relative error ‖ḡ − g‖/‖g‖), each "
             f"figure the mean over {rows[0]['pairs']} random (teacher, student) pairs.",
             "", "| --logits | bytes/view (compressed) | one cache: rel. error / cosine | mean of 256 caches: rel. "
             "error / cosine |", "|---|---|---|---|"]
    for r in rows:
        mean = (f"{r['mean_rel_error']:.3f} / {r['mean_cosine']:.4f}" if r["caches_averaged"] > 1 else
                f"{r['mean_rel_error']:.3f} / {r['mean_cosine']:.4f} (deterministic)")
        lines.append(f"| `{r['logits']}` | {r['bytes_per_view']:.0f} | {r['one_cache_rel_error']:.3f} / "
                     f"{r['one_cache_cosine']:.4f} | {mean} |")
    lines += ["", "Full logits are exact; top-k's error is a bias (the same in every cache, it never averages away); "
              "sampled logits are noisy per cache and unbiased: their error shrinks like 1/√caches (over epochs and "
              "samples the noise averages out as SGD noise)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
