"""Views: what the teacher (and later the student) sees of an image.

A view is ``(top, left, height, width, flip)`` in normalised image coordinates. Views are drawn from an
RNG seeded by ``(seed, key, view index)`` so they never depend on which worker ran a shard, and one
function, :func:`render_view`, turns an image and a view into the model's input, for both stages.

Views are resampled in uint8 (torch's vectorised antialiased kernel, as torchvision's ``Resize`` on uint8 images):
a rendered view is a uint8 image, 4× fewer bytes to hand between processes and to the GPU than float32, and
:func:`to_unit_float` (or :class:`~e2kd.models.InputTransform`) scales it to ``[0, 1]``. Caches written before
e2kd 0.2 resampled in float32; their manifests record no ``resample_dtype`` and the student replays their views
with that float path (:func:`resample_dtype`), so replay stays exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["View", "ViewPolicy", "FULL_VIEW", "draw_views", "draw_view", "render_view", "render_view_uint8",
           "render_views_batch", "to_unit_float", "resample_dtype", "crop_map", "crop_weights", "crop_weights_batch",
           "apply_crop", "RENDER_SPEC", "RESAMPLE_DTYPES", "view_rng", "pixel_view"]

#: How :func:`render_view` resamples: recorded in every cache manifest.
RENDER_SPEC = {"crop": "round-to-pixel", "interpolation": "bilinear", "antialias": True, "align_corners": False,
               "resample_dtype": "uint8"}
#: ``uint8``: today's renderer; ``float32``: caches written before ``resample_dtype`` was recorded.
RESAMPLE_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class View:
    """A crop box in normalised coordinates plus a horizontal flip flag."""

    top: float
    left: float
    height: float
    width: float
    flip: bool = False

    def as_list(self) -> list[float]:
        return [self.top, self.left, self.height, self.width, float(self.flip)]


FULL_VIEW = View(0.0, 0.0, 1.0, 1.0, False)


@dataclass(frozen=True)
class ViewPolicy:
    """``full`` (one view: the whole image) or ``k`` RandomResizedCrop + flip views per image.

    Args:
        k: number of views; ``0`` means the ``full`` policy.
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio (width / height, in pixels).
        flip_p: probability of a horizontal flip (0 for data where a mirror changes the meaning).
        seed: the seed views are drawn from, together with the sample key and view index.
    """

    k: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"view count must be >= 0 (0 = full), got {self.k}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not (0 <= self.flip_p <= 1):
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_p}")

    @property
    def num_views(self) -> int:
        return max(1, self.k)

    @property
    def is_full(self) -> bool:
        """One whole-image view per sample (❄ frozen e²KD: students joint-crop image and map)."""
        return self.k == 0

    @property
    def replayable(self) -> bool:
        """Students replay the cached views exactly (K random views, rendered at the cache's input size)."""
        return not self.is_full

    @classmethod
    def parse(cls, text: str | int, **kwargs) -> ViewPolicy:
        """``"full"`` or an integer K >= 1."""
        if str(text) == "full":
            return cls(k=0, **kwargs)
        try:
            k = int(text)
        except ValueError:
            raise ValueError(f"--views must be 'full' or an integer K >= 1, got {text!r}") from None
        if k < 1:
            raise ValueError(f"--views must be 'full' or an integer K >= 1, got {k}")
        return cls(k=k, **kwargs)

    def to_dict(self) -> dict:
        return {"policy": "full" if self.is_full else "random_resized_crop", "k": self.num_views,
                "scale": list(self.scale), "ratio": list(self.ratio), "flip_p": self.flip_p, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> ViewPolicy:
        k = 0 if d["policy"] == "full" else int(d["k"])
        return cls(k=k, scale=tuple(d["scale"]), ratio=tuple(d["ratio"]), flip_p=float(d["flip_p"]),
                   seed=int(d["seed"]))

    def views_for(self, key: str, height: int, width: int) -> list[View]:
        """The views of one image (``[FULL_VIEW]`` for the full policy)."""
        if self.is_full:
            return [FULL_VIEW]
        return draw_views(self.seed, key, self.k, height, width, self.scale, self.ratio, self.flip_p)


def view_rng(seed: int, key: str, index: int) -> torch.Generator:
    """A generator seeded by ``(seed, key, index)`` only: independent of workers and order."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_views(seed: int, key: str, k: int, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> list[View]:
    """``k`` RandomResizedCrop + flip views of an ``height × width`` image (torchvision's sampling rule)."""
    return [_draw_one(view_rng(seed, key, i), height, width, scale, ratio, flip_p) for i in range(k)]


def draw_view(seed: int, key: str, index: int, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
              ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> View:
    """The ``index``-th view of :func:`draw_views` alone (e.g. one fresh crop per epoch)."""
    return _draw_one(view_rng(seed, key, index), height, width, scale, ratio, flip_p)


def _draw_one(gen: torch.Generator, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
              flip_p: float) -> View:
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            box = (top, left, h, w)
            break
    if box is None:  # fallback: central crop with the ratio clamped into range
        in_ratio = width / height
        w, h = (width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else (
            (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(float(torch.rand(1, generator=gen)) < flip_p)
    top, left, h, w = box
    return View(top / height, left / width, h / height, w / width, flip)


def _pixel_box(view: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    top = min(max(int(round(float(view[0]) * height)), 0), height - 1)
    left = min(max(int(round(float(view[1]) * width)), 0), width - 1)
    h = min(max(int(round(float(view[2]) * height)), 1), height - top)
    w = min(max(int(round(float(view[3]) * width)), 1), width - left)
    return top, left, h, w


def resample_dtype(render: dict | None) -> str:
    """The ``resample_dtype`` a cache's views were rendered with, from its manifest's ``preprocessing.render``
    (``float32`` where it is not recorded: caches from before e2kd 0.2).

    Raises:
        ValueError: the cache was rendered some other way (its views could not be replayed exactly).
    """
    render = dict(render or {})
    dtype = render.pop("resample_dtype", "float32")
    ours = {k: v for k, v in RENDER_SPEC.items() if k != "resample_dtype"}
    if dtype not in RESAMPLE_DTYPES or (render and render != ours):
        raise ValueError(f"the cache's views were rendered as {render | {'resample_dtype': dtype}}; this e2kd renders "
                         f"{RENDER_SPEC} (or resample_dtype float32): its views cannot be replayed exactly")
    return str(dtype)


def _crop(image_uint8_chw: Tensor, view: Sequence[float]) -> Tensor:
    if image_uint8_chw.dtype != torch.uint8 or image_uint8_chw.ndim != 3:
        raise ValueError(f"render_view expects a uint8 [C, H, W] tensor, got {image_uint8_chw.dtype} "
                         f"{tuple(image_uint8_chw.shape)}")
    _, height, width = image_uint8_chw.shape
    top, left, h, w = _pixel_box(view, height, width)
    return image_uint8_chw[:, top:top + h, left:left + w].unsqueeze(0)


def render_view_uint8(image_uint8_chw: Tensor, view: Sequence[float], size: tuple[int, int]) -> Tensor:
    """Crop, resize (bilinear, antialias, resampled in uint8) and flip an image into uint8 ``[3, H, W]``.

    Fastest from a channels-last image (:func:`~e2kd.pipeline._sources.decode_image` returns one).
    """
    crop = _crop(image_uint8_chw, view).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1) if float(view[4]) >= 0.5 else out


def render_view(image_uint8_chw: Tensor, view: Sequence[float], size: tuple[int, int],
                dtype: str = "uint8") -> Tensor:
    """Crop, resize (bilinear, antialias) and flip an image into float32 ``[3, H, W]`` in ``[0, 1]``: the model's
    input, exactly ``to_unit_float(render_view_uint8(...))``.

    Args:
        image_uint8_chw: uint8 tensor ``[3, h, w]``.
        view: any 5-sequence ``(top, left, height, width, flip)`` in normalised image coordinates.
        size: output ``(H, W)``.
        dtype: the resampling ``uint8`` (today's caches) or ``float32`` (caches from before e2kd 0.2; see
            :func:`resample_dtype`).
    """
    if dtype == "uint8":
        return to_unit_float(render_view_uint8(image_uint8_chw, view, size))
    if dtype != "float32":
        raise ValueError(f"resample dtype must be one of {RESAMPLE_DTYPES}, got {dtype!r}")
    crop = _crop(image_uint8_chw, view).float().div_(255.0)
    out = F.interpolate(crop, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]
    if float(view[4]) >= 0.5:
        out = out.flip(-1)
    return out.clamp_(0.0, 1.0)


def render_views_batch(images: Sequence[Tensor], views: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`render_view_uint8` of a batch at once, on the images' device: uint8 ``[B, 3, H, W]`` from uint8
    ``[3, h_i, w_i]`` images of any sizes and views ``[B, 5]``. The same pixel boxes and torch's antialiased
    bilinear weights, applied as two batched products (``rows @ crop @ cols.T``) in float32 — within one grey level
    of the uint8 kernel, which works in fixed point. For images decoded on a GPU (one kernel per step, not one per
    image; CUDA has no uint8 resampling)."""
    out_h, out_w = size
    boxes = [_pixel_box(v, *img.shape[1:]) for img, v in zip(images, views.tolist(), strict=True)]
    span_h, span_w = max(b[2] for b in boxes), max(b[3] for b in boxes)
    device = images[0].device
    crops = torch.zeros(len(images), 3, span_h, span_w, dtype=torch.float32, device=device)
    for crop, img, (top, left, h, w) in zip(crops, images, boxes, strict=True):
        crop[:, :h, :w] = img[:, top:top + h, left:left + w]
    heights = torch.tensor([b[2] for b in boxes], device=device)
    widths = torch.tensor([b[3] for b in boxes], device=device)
    rows = _aa_bilinear_weights_batch(heights, out_h, span_h)
    cols = _aa_bilinear_weights_batch(widths, out_w, span_w)
    cols = torch.where((views[:, 4] >= 0.5).to(device)[:, None, None], cols.flip(1), cols)
    out = torch.einsum("bph,bchw,bqw->bcpq", rows, crops, cols)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _aa_bilinear_weights_batch(length: Tensor, out: int, span: int) -> Tensor:
    """``[B, out, span]`` float32 weights of torch's antialiased bilinear resize (``align_corners=False``) from
    ``length[b]`` input pixels (the first of ``span``) to ``out``: a triangle filter as wide as the scale when
    shrinking, normalised per output pixel."""
    length = length.double()[:, None, None]
    scale = length / out
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out, dtype=torch.float64, device=length.device)[None, :, None] + 0.5)
    j = torch.arange(span, dtype=torch.float64, device=length.device)[None, None, :]
    weights = (1.0 - ((j + 0.5 - centre) / support).abs()).clamp(min=0.0) * (j < length)
    return (weights / weights.sum(-1, keepdim=True)).float()


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 images (``[..., 3, H, W]``, 0–255) → float32 in ``[0, 1]``; float images pass through unchanged (the
    scaling :class:`~e2kd.models.InputTransform` applies first)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images


def pixel_view(view: Sequence[float], height: int, width: int) -> View:
    """The view exactly as :func:`render_view` crops it (snapped to whole pixels), in normalised coordinates."""
    top, left, h, w = _pixel_box(view, height, width)
    return View(top / height, left / width, h / height, w / width, float(view[4]) >= 0.5)


def crop_map(maps: Tensor, view: Sequence[float], image_hw: tuple[int, int],
             size: tuple[int, int] | None = None) -> Tensor:
    """Apply an image view to a map of the **whole** image: RoIAlign over the same (pixel-snapped) box, then flip.

    The result has the map's own resolution ``[C_e, h, w]`` unless ``size`` is given; this is the ❄
    frozen-e²KD joint crop of a ``full`` cache. Computed as torchvision's ``roi_align`` (``aligned=True``,
    adaptive sampling) defines it, but separably (:func:`crop_weights`, :func:`apply_crop`).
    """
    rows, cols = crop_weights(view, image_hw, (int(maps.shape[-2]), int(maps.shape[-1])), size)
    return apply_crop(maps, rows, cols)


def crop_weights(view: Sequence[float], image_hw: tuple[int, int], map_hw: tuple[int, int],
                 size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """:func:`crop_map` as two float64 matrices, ``rows [H_out, h]`` and ``cols [W_out, w]`` (the flip folded into
    ``cols``): RoIAlign's bilinear samples and bin averages factor along the axes, so the crop is
    ``rows @ map @ cols.T`` — two small products instead of a kernel that computes every output pixel's four taps
    (~5× less at 224 px). One view of :func:`crop_weights_batch`."""
    s = pixel_view(view, *image_hw)
    rows, cols = crop_weights_batch(torch.tensor([[s.top, s.left, s.height, s.width, float(s.flip)]],
                                                 dtype=torch.float64), map_hw, size)
    return rows[0], cols[0]


def crop_weights_batch(views: Tensor, map_hw: tuple[int, int],
                       size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """:func:`crop_weights` of a batch of pixel-snapped views ``[B, 5]`` (:func:`pixel_view`'s top, left, height,
    width, flip), float64 on the views' device: ``rows [B, H_out, h]`` and ``cols [B, W_out, w]``. The loader hands
    over 5 numbers per sample and the weights are made here for the whole batch (equal to the per-sample ones)."""
    h, w = map_hw
    out_h, out_w = size or (h, w)
    views = views.double()
    rows = _roi_align_weights_batch(views[:, 0] * h, views[:, 2] * h, out_h, h)
    cols = _roi_align_weights_batch(views[:, 1] * w, views[:, 3] * w, out_w, w)
    return rows, torch.where((views[:, 4] >= 0.5)[:, None, None], cols.flip(1), cols)


def _roi_align_weights_batch(start: Tensor, length: Tensor, pooled: int, size: int) -> Tensor:
    """``[B, pooled, size]`` weights of RoIAlign along one axis for ``B`` boxes (``start``, ``length`` of shape
    ``[B]``; ``aligned=True``, ``sampling_ratio=-1``): output bin ``p`` averages ``ceil(length / pooled)`` bilinear
    samples at the bin's sub-centres (boxes with fewer samples per bin than the largest are masked); a sample beyond
    ``[-1, size]`` counts as zero, one in ``[-1, 0]`` is clamped to 0, one past the last pixel takes its value."""
    grid = torch.ceil(length / pooled).clamp(min=0).long()
    out = torch.zeros(len(start), pooled, size, dtype=torch.float64, device=start.device)
    most = int(grid.max()) if len(grid) else 0
    if most <= 0:
        return out
    step = length / pooled
    per = grid.clamp(min=1).double()
    g = torch.arange(most, dtype=torch.float64, device=start.device)
    sub = (g[None, :] + 0.5) * step[:, None] / per[:, None]  # [B, G]
    bins = torch.arange(pooled, dtype=torch.float64, device=start.device)
    pos = (start - 0.5)[:, None, None] + bins[None, :, None] * step[:, None, None] + sub[:, None, :]  # [B, P, G]
    live = g[None, None, :] < grid[:, None, None].double()
    valid = ((pos >= -1.0) & (pos <= size) & live).double() / per[:, None, None]
    pos = pos.clamp(min=0.0)
    low = torch.floor(pos).long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    frac = torch.where(edge, 0.0, pos - low.double())
    out.scatter_add_(2, low, (1.0 - frac) * valid)
    out.scatter_add_(2, high, frac * valid)
    return out


def apply_crop(maps: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``rows @ maps @ cols.T`` per channel, for one map ``[C, h, w]`` or a batch ``[B, C, h, w]`` (with ``[B, …]``
    weights), in the maps' dtype."""
    return torch.einsum("...ph,...chw,...qw->...cpq", rows.to(maps.dtype), maps, cols.to(maps.dtype))
