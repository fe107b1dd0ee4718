"""Figures: the demo's explanation grid and ``e2kd show`` (image, view boxes, teacher / student maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from e2kd.explain import build_explainer
from e2kd.models import create_model, input_transform
from e2kd.pipeline.sources import Sample, iter_shard, list_shards
from e2kd.pipeline.views import render_view

__all__ = ["explanation_grid", "show_key", "find_image"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heat(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ``[C_e, h, w]`` map → ``[H, W]`` in [0, 1] for display (channel sum, upsampled, min-max)."""
    m = F.interpolate(maps.float().sum(0, keepdim=True)[None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (m - m.min()) / (m.max() - m.min() + 1e-12)


def _student_maps(model: torch.nn.Module, explainer: str, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return build_explainer(explainer, model.eval())(input_transform(model)(images), targets)[0]


def explanation_grid(data: str, cache: str | Path, students: dict[str, Path], model: str, kwargs: dict[str, Any],
                     out: str | Path, n: int = 6) -> None:
    """Rows: images, teacher maps (cached), one row of maps per student; for the teacher's top-1 class."""
    from e2kd.storage import open_store

    store = open_store(str(cache))
    samples = []
    for shard in list_shards(data):
        samples += [s for s in iter_shard(shard) if isinstance(s, Sample) and s.key in store][: n - len(samples)]
        if len(samples) >= n:
            break
    size = store.manifest.input_size
    images = torch.stack([render_view(s.image, store.read(s.key)["views"][0].tolist(), size) for s in samples])
    records = [store.read(s.key) for s in samples]
    targets = torch.stack([r["target"][0] for r in records])
    rows = [("image", None), ("teacher", torch.stack([r["maps"][0] for r in records]))]
    for name, weights in students.items():
        net = create_model(model, store.manifest.num_classes, checkpoint=weights, **kwargs)
        rows.append((f"{name} student", _student_maps(net, store.manifest.explainer_name, images, targets)))
    plt = _plt()
    fig, axes = plt.subplots(len(rows), len(samples), figsize=(1.6 * len(samples), 1.7 * len(rows)), squeeze=False)
    for r, (title, maps) in enumerate(rows):
        for c in range(len(samples)):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).numpy())
            if maps is not None:
                ax.imshow(_heat(maps[c], size).numpy(), cmap="jet", alpha=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
            if r == 0:
                ax.set_title(f"label {samples[c].label} / T {int(targets[c])}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def find_image(store: Any, key: str, data: str | None = None) -> torch.Tensor:
    """The uint8 image of ``key``: from ``data``, else from the manifest's local input path (never a ``pipe:``)."""
    name, _ = store.index[key]
    source = data or store.manifest.shards[name].source
    if source.startswith("pipe:"):
        raise ValueError(f"the manifest names a pipe: command for shard {name}; pass --data (commands from a shared "
                         f"store are never run)")
    for shard in list_shards(source):
        for sample in iter_shard(shard):
            if isinstance(sample, Sample) and sample.key == key:
                return sample.image
    raise KeyError(f"key {key!r} not found in {source}")


def show_key(store_uri: str, key: str, out: str | Path, data: str | None = None, student: str | None = None,
             weights: str | None = None, student_kwargs: dict[str, Any] | None = None) -> None:
    """Image with view boxes, then per view the teacher map (and the student's map beside it)."""
    from matplotlib.patches import Rectangle

    from e2kd.storage import open_store

    store = open_store(store_uri)
    rec, image = store.read(key), find_image(store, key, data)
    size = store.manifest.input_size
    inputs = torch.stack([render_view(image, v.tolist(), size) for v in rec["views"]])
    student_maps = None
    if student and weights:
        net = create_model(student, store.manifest.num_classes, checkpoint=weights,
                           **(student_kwargs or {}))
        student_maps = _student_maps(net, store.manifest.explainer_name, inputs, rec["target"])
    views = len(rec["views"])
    cols = 1 + views * (2 if student_maps is not None else 1)
    plt = _plt()
    fig, axes = plt.subplots(1, cols, figsize=(2.2 * cols, 2.4), squeeze=False)
    _, h, w = image.shape
    axes[0][0].imshow(image.permute(1, 2, 0).numpy())
    axes[0][0].set_title(f"{key} (label {rec['label']})", fontsize=7)
    for v, (top, left, vh, vw, _flip) in enumerate(rec["views"].tolist()):
        axes[0][0].add_patch(Rectangle((left * w, top * h), vw * w, vh * h, fill=False, lw=1,
                                       edgecolor=plt.cm.tab10(v % 10)))
    col = 1
    for v in range(views):
        panels = [("teacher", rec["maps"][v])] + ([("student", student_maps[v])] if student_maps is not None else [])
        for title, maps in panels:
            ax = axes[0][col]
            ax.imshow(inputs[v].permute(1, 2, 0).numpy())
            ax.imshow(_heat(maps, size).numpy(), cmap="jet", alpha=0.5)
            ax.set_title(f"view {v} {title}, class {int(rec['target'][v])}", fontsize=7)
            col += 1
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
