"""Figures: the demo's explanation grid and ``e2kd show`` (image, view boxes, teacher / student maps)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from e2kd.explain import build_explainer
from e2kd.losses import explanation_similarity
from e2kd.models import create_model, input_transform
from e2kd.pipeline._sources import FolderShard, Sample, iter_shard, list_shards
from e2kd.pipeline._views import render_view
from e2kd.storage import CachedRecord, CacheStore

__all__ = ["explanation_grid", "show_key", "find_image"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # an SVG keeps its text as text
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
    samples: list[Sample] = []
    for shard in list_shards(data):
        samples += [s for s in iter_shard(shard) if isinstance(s, Sample) and s.key in store][: n - len(samples)]
        if len(samples) >= n:
            break
    size = store.manifest.input_size
    images = torch.stack([render_view(s.pixels, store.read(s.key)["views"][0].tolist(), size) for s in samples])
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
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.text(0.5, 0.015, "label: the image's class · T: the teacher's top-1 class, which every map explains",
             ha="center", fontsize=7)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def find_image(store: Any, key: str, data: str | None = None) -> torch.Tensor:
    """The uint8 image of ``key``: from ``data``, else from the manifest's input path (never a ``pipe:``).

    The manifest's path of an image-folder shard is its class directory (keys relative to the folder above it).
    """
    name, _ = store.index[key]
    source = data or store.manifest.shards[name].source
    if source.startswith("pipe:"):
        raise ValueError(f"the manifest names a pipe: command for shard {name}; pass --data (commands from a shared "
                         f"store are never run)")
    if data is None and "://" not in source and not os.path.exists(source):
        raise ValueError(f"the input of shard {name} is not reachable here ({source}, recorded when the cache was "
                         f"built): pass --data with the shard or image folder that holds key {key!r}")
    for shard in _shards_of(source, name):
        for sample in iter_shard(shard):
            if isinstance(sample, Sample) and sample.key == key:
                return sample.pixels
    raise KeyError(f"key {key!r} not found in {source}")


def _shards_of(source: str, name: str) -> list[Any]:
    """Input shards of ``source``; a class directory of an image folder stands for itself (keys relative to its
    parent, as when the folder was cached)."""
    path = Path(source)
    if path.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return [FolderShard(name=name, url=str(path), root=str(path.parent))]
    return list_shards(source)


def show_key(store_uri: str, key: str, out: str | Path, data: str | None = None, student: str | None = None,
             weights: str | None = None, student_kwargs: dict[str, Any] | None = None,
             more_caches: list[str] | None = None, shared_scale: bool = False) -> list[float]:
    """One row per cached view: the image with the view's box, the teacher's map, the student's map (with
    ``student`` and ``weights``; its own prediction in the title) and the teacher's map over the view, each map
    with a colour bar — one scale for a row's teacher and student maps with ``shared_scale`` (so a nearly flat
    student map looks flat), else each map its own.

    Returns the per-view cosine between the student's and the teacher's map (taken at the input size, as
    train-student's loss takes it); empty without a student. ``more_caches``: further teachers' caches of the
    same inputs (as train-student's several ``--cache``), each teacher's map in a column of its own.
    """
    from e2kd.pipeline._student_cache import open_student_cache
    from e2kd.storage import open_store

    with_student = bool(student and weights)  # a student must fit the cache (the same checks as train-student)
    store = open_student_cache(store_uri, what="store").store if with_student else open_store(store_uri)
    rec, image = store.read(key), find_image(store, key, data)
    size = store.manifest.input_size
    inputs = torch.stack([render_view(image, v.tolist(), size) for v in rec["views"]])
    student_maps, cosines, predicted = None, [], []
    if with_student:
        net = create_model(student or "", store.manifest.num_classes, checkpoint=weights,
                           **(student_kwargs or {})).eval()
        student_maps = _student_maps(net, store.manifest.explainer_name, inputs, rec["target"])
        with torch.no_grad():
            predicted = net(input_transform(net)(inputs)).argmax(1).tolist()
        cosines = explanation_similarity(student_maps.float(), rec["maps"].float(), size).tolist()
    others = _other_teachers(store, key, more_caches or [])
    plt = _plt()
    cols = (4 if student_maps is not None else 3) + len(others)
    views = len(rec["views"])
    fig, axes = plt.subplots(views, cols, figsize=(2.8 * cols, 2.7 * views), squeeze=False, constrained_layout=True)
    name = store.manifest.class_name
    for v in range(views):
        row = axes[v]
        _image_with_box(row[0], image, rec["views"][v].tolist(), f"{key}\nlabel {name(rec['label'])}, view {v}")
        scale = _shared_range(size, rec["maps"][v], student_maps[v]) if shared_scale and student_maps is not None \
            else None
        _map_panel(fig, row[1], rec["maps"][v], size, f"teacher map\nexplains class {name(int(rec['target'][v]))}",
                   scale)
        if student_maps is not None:
            _map_panel(fig, row[2], student_maps[v], size, f"student map (cos {cosines[v]:.3f})\n"
                       f"explains {name(int(rec['target'][v]))}, predicts {name(predicted[v])}", scale)
        for j, (_, other) in enumerate(others):
            col = (3 if student_maps is not None else 2) + j
            _map_panel(fig, row[col], other["maps"][v], size, f"teacher {j + 2} map, class "
                       f"{store.manifest.class_name(int(other['target'][v]))}")
        row[-1].imshow(inputs[v].permute(1, 2, 0).numpy())
        row[-1].imshow(_heat(rec["maps"][v], size).numpy(), cmap="jet", alpha=0.5)
        row[-1].set_title("teacher map\nover the view", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return cosines


def _other_teachers(store: CacheStore, key: str, uris: list[str]) -> list[tuple[str, CachedRecord]]:
    """The record of ``key`` in each further teacher's cache, which must join ``store`` (the same checks as
    train-student's several ``--cache``)."""
    if not uris:
        return []
    from e2kd.pipeline._student_cache import open_student_caches

    opened = open_student_caches([store.uri, *uris])
    return [(uri, o.store.read(key)) for uri, o in zip(uris, opened[1:], strict=True)]


def _image_with_box(ax: Any, image: torch.Tensor, view: list[float], title: str) -> None:
    from matplotlib.patches import Rectangle

    _, h, w = image.shape
    top, left, vh, vw, _flip = view
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.add_patch(Rectangle((left * w, top * h), vw * w, vh * h, fill=False, lw=1.5, edgecolor="red"))
    ax.set_title(title, fontsize=7)


def _upsampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps.float().sum(0, keepdim=True)[None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _shared_range(size: tuple[int, int], *maps: torch.Tensor) -> tuple[float, float]:
    """One colour range over several maps (as drawn: channel sum, upsampled)."""
    drawn = [_upsampled(m, size) for m in maps]
    return min(float(d.min()) for d in drawn), max(float(d.max()) for d in drawn)


def _map_panel(fig: Any, ax: Any, maps: torch.Tensor, size: tuple[int, int], title: str,
               scale: tuple[float, float] | None = None) -> None:
    """A map (channel sum, upsampled to the input size) with a colour bar in the map's units: its own range, or
    ``scale`` (shared with the other maps of its row)."""
    m = _upsampled(maps, size)
    image = ax.imshow(m.numpy(), cmap="jet", vmin=scale[0] if scale else None, vmax=scale[1] if scale else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=7)
