"""Images decoded and rendered on the training device: the last stage of the student's loader with
``--decode-on-device``.

On a GPU node the student's loader is bound by JPEG decoding on the CPU (an H200 step of a ResNet-18 student wants
~3,300 photos/s; a core decodes ~450). With this stage the DataLoader workers only read records and headers: each
sample travels as its encoded bytes and its view (5 numbers), and per batch the JPEGs are decoded at once by
nvjpeg (``torchvision.io.decode_jpeg`` on the device, ~18,000 photos/s on an H200) and the views rendered by
:func:`~e2kd.pipeline._views.render_views_batch`. Other formats (PNG, CMYK JPEG, …) are decoded on the CPU by
:func:`~e2kd.pipeline._sources.decode_image` and moved over. The images equal the workers' rendering to within one
grey level (float instead of fixed-point resampling; nvjpeg may differ from libjpeg by a level too), so a K-view
cache is replayed nearly, not bit-, exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from e2kd.pipeline._sources import decode_image
from e2kd.pipeline._views import render_views_batch

__all__ = ["DeviceImages", "decode_batch_images"]


class DeviceImages:
    """Iterates ``loader``'s batches with ``image`` decoded and rendered on ``device`` (``[B, 3, H, W]`` uint8)."""

    def __init__(self, loader: Iterable[dict[str, Any]], device: torch.device | str, size: tuple[int, int]) -> None:
        self.loader, self.device, self.size = loader, torch.device(device), size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield decode_batch_images(batch, self.device, self.size)


def decode_batch_images(batch: dict[str, Any], device: torch.device, size: tuple[int, int]) -> dict[str, Any]:
    """``batch`` with its ``encoded`` images (and their ``view`` and ``jpeg`` flags) replaced by ``image``."""
    if "encoded" not in batch:
        return batch
    encoded, views, jpeg = batch.pop("encoded"), batch.pop("view"), batch.pop("jpeg")
    images = _decode(list(encoded), [bool(j) for j in jpeg.tolist()], list(batch["key"]), device)
    batch["image"] = render_views_batch(images, views, size)
    return batch


def _decode(encoded: list[bytes], jpeg: list[bool], keys: list[str], device: torch.device) -> list[Tensor]:
    """Every image as uint8 ``[3, h, w]`` on ``device``: the JPEGs in one nvjpeg call, the rest on the CPU."""
    images: list[Tensor | None] = [None] * len(encoded)
    on_device = [i for i, j in enumerate(jpeg) if j]
    if on_device:
        for i, image in zip(on_device, _decode_jpegs([encoded[i] for i in on_device], device), strict=True):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:  # not a JPEG nvjpeg takes, or one it refused: the CPU decoder, as in the workers
            try:
                images[i] = decode_image(encoded[i]).to(device, non_blocking=True)
            except Exception as exc:  # noqa: BLE001 - any decoder failure names the sample
                raise ValueError(f"sample {keys[i]!r} cannot be decoded ({type(exc).__name__}: {exc}); without "
                                 f"--decode-on-device an unreadable sample is replaced by a readable one of its "
                                 f"block") from None
    return images  # type: ignore[return-value]


def _decode_jpegs(data: list[bytes], device: torch.device) -> list[Tensor | None]:
    """nvjpeg (or libjpeg on a CPU device) over the batch; where the batch call fails, each image alone (None:
    left to the CPU decoder)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notes on its image decoding's future
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[Tensor | None] = []
        for tensor in tensors:
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out
