"""Input data: WebDataset tar shards or an image folder, as per-shard streams of decoded samples.

Identity is the sample key (``__key__``, or the image folder's relative path without extension), never a
list position. Only images and the integer ``cls`` label are decoded; a sample that cannot be decoded is
yielded as a :class:`BadSample` with its key, shard and reason instead of stopping the job.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from e2kd.storage.names import shard_name_for

__all__ = ["InputShard", "Sample", "BadSample", "list_shards", "iter_shard", "iter_keys", "decode_image",
           "input_size_bytes", "input_sha256", "IMAGE_EXTS"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REFUSED_EXTS = ("pkl", "pyd", "pickle", "pth", "pt")
_FOLDER_EXTS = {"." + e for e in IMAGE_EXTS}


@dataclass(frozen=True)
class InputShard:
    """One unit of input: a tar shard (``kind="wds"``) or one class directory of an image folder."""

    name: str
    url: str
    kind: str = "wds"
    label: int = -1  # folder shards: the class index
    root: str = ""  # folder shards: the folder root keys are relative to


@dataclass
class Sample:
    key: str
    image: Tensor  # uint8 [3, H, W]
    label: int
    shard: str


@dataclass
class BadSample:
    key: str
    shard: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "shard": self.shard, "reason": self.reason}


def _expand(urls: str | Sequence[str]) -> list[str]:
    import braceexpand

    parts = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for part in parts:
        for item in _split_outside_braces(str(part).replace("\n", ",")):
            item = item.strip()
            if item:
                try:
                    out.extend(braceexpand.braceexpand(item))
                except braceexpand.UnbalancedBracesError as exc:
                    raise ValueError(f"input pattern {item!r}: {exc}") from None
    return out


def _split_outside_braces(text: str) -> list[str]:
    """Split a comma-separated list of URLs, keeping commas inside ``{a,b}`` brace lists."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _shard_name(url: str) -> str:
    """The store shard name of an input URL: its file name without extension, made safe (see ``storage.names``)."""
    base = url.rstrip("/").rsplit("/", 1)[-1].split("::")[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return shard_name_for(base)


def list_shards(urls: str | Sequence[str]) -> list[InputShard]:
    """Expand comma-separated URLs / brace patterns into input shards; a local directory is an image folder.

    Raises:
        ValueError: nothing matched, a local file is missing, or two shards share a name.
    """
    shards: list[InputShard] = []
    for url in _expand(urls):
        if "://" not in url and not url.startswith("pipe:") and os.path.isdir(url):
            shards.extend(_folder_shards(url))
            continue
        if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url):
            raise ValueError(f"input shard not found: {url}")
        shards.append(InputShard(name=_shard_name(url), url=url))
    if not shards:
        raise ValueError(f"no input shards in {urls!r}")
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen and seen[s.name] != s.url:
            raise ValueError(f"two input shards share the name {s.name!r}: {seen[s.name]} and {s.url}")
        seen[s.name] = s.url
    return shards


def _folder_shards(root: str) -> list[InputShard]:
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-directories (expected root/<class>/<file>)")
    return [InputShard(name=shard_name_for(f"class-{c}"), url=str(Path(root) / c), kind="folder", label=i, root=root)
            for i, c in enumerate(classes)]


def input_size_bytes(shard: InputShard) -> int | None:
    """Size of an input shard in bytes (a folder: its image files), or None where it cannot be known (``pipe:``)."""
    if shard.kind == "folder":
        return sum(p.stat().st_size for p in Path(shard.url).rglob("*") if p.is_file() and
                   p.suffix.lower() in _FOLDER_EXTS)
    if shard.url.startswith("pipe:"):
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(shard.url)
    return int(fs.size(path))


def input_sha256(shard: InputShard) -> str | None:
    """sha256 of an input tar's bytes (provenance for the manifest); None for folders and ``pipe:`` commands."""
    if shard.kind == "folder" or shard.url.startswith("pipe:"):
        return None
    import hashlib

    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(shard.url, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_image(data: bytes) -> Tensor:
    """Decode image bytes to uint8 ``[3, H, W]`` RGB (raises on corrupt data)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey: scale, never clip, to 8 bit
            rgb = np.repeat(_to_uint8(np.asarray(img), img.mode)[..., None], 3, axis=-1)
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"degenerate image of shape {rgb.shape}")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (0…65535) or 32-bit integer grey values → 0…255 by scaling (``convert("RGB")`` would clip)."""
    top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def iter_shard(shard: InputShard) -> Iterator[Sample | BadSample]:
    """Yield the decoded samples of one input shard, bad ones as :class:`BadSample`."""
    if shard.kind == "folder":
        yield from _iter_folder(shard)
    else:
        yield from _iter_tar(shard)


def iter_keys(shard: InputShard) -> Iterator[tuple[str, int]]:
    """``(key, label)`` of every sample in a shard without decoding images (a cheap listing pass)."""
    if shard.kind == "folder":
        for path in sorted(p for p in Path(shard.url).rglob("*") if p.is_file() and p.suffix.lower() in _FOLDER_EXTS):
            yield str(path.relative_to(shard.root).with_suffix("")).replace(os.sep, "/"), shard.label
        return
    try:
        for raw in _raw_samples(shard.url):
            try:
                label = int(raw["cls"].decode().strip()) if "cls" in raw else -1
            except (ValueError, UnicodeDecodeError):
                label = -1
            yield str(raw.get("__key__", "")), label
    except (tarfile.ReadError, EOFError, OSError):  # a truncated tar: the keys before the damage are listed
        return


def _raw_samples(url: str) -> Iterator[dict]:
    """Raw (undecoded) samples of one tar: open → tar members → samples grouped by key (webdataset's stages).

    The stream is opened with fsspec (``pipe:`` through webdataset's ``gopen``), so a local file name is never
    parsed as a URL (``a b;c.tar`` stays one path); e2kd splits shards over ranks and workers itself.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = _open_stream(url)
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def _open_stream(url: str) -> Any:
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _iter_folder(shard: InputShard) -> Iterator[Sample | BadSample]:
    files = sorted(p for p in Path(shard.url).rglob("*") if p.is_file() and p.suffix.lower() in _FOLDER_EXTS)
    for path in files:
        key = str(path.relative_to(shard.root).with_suffix("")).replace(os.sep, "/")
        try:
            yield Sample(key, decode_image(path.read_bytes()), shard.label, shard.name)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample, recorded
            yield BadSample(key, shard.name, f"undecodable image: {type(exc).__name__}: {exc}")


def _iter_tar(shard: InputShard) -> Iterator[Sample | BadSample]:
    seen: set[str] = set()
    stream = _raw_samples(shard.url)  # raw bytes, no decoders
    while True:
        try:
            raw = next(stream)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a truncated / unreadable tar ends the shard, recorded
            yield BadSample("*", shard.name, f"unreadable shard after {len(seen)} samples: {type(exc).__name__}: {exc}")
            return
        key = str(raw.get("__key__", ""))
        if key in seen:
            yield BadSample(key, shard.name, "duplicate key within the shard")
            continue
        seen.add(key)
        yield _decode_tar_sample(raw, key, shard.name)


def _decode_tar_sample(raw: dict, key: str, shard: str) -> Sample | BadSample:
    refused = [k for k in raw if k.rsplit(".", 1)[-1].lower() in REFUSED_EXTS]
    if refused:
        return BadSample(key, shard, f"refused pickle-like member(s) {refused}: e2kd never unpickles data")
    image_field = next((k for k in raw if k.lower() in IMAGE_EXTS), None)
    if image_field is None:
        return BadSample(key, shard, f"no image member (have {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        label = int(raw["cls"].decode().strip()) if "cls" in raw else -1
    except (ValueError, UnicodeDecodeError) as exc:
        return BadSample(key, shard, f"cls is not an integer: {exc}")
    if not -(2**31) <= label < 2**31:  # labels stored as int32; ones outside [0, C) are handled by the cache stage
        return BadSample(key, shard, f"cls {label} is out of range (not a 32-bit integer)")
    try:
        return Sample(key, decode_image(raw[image_field]), label, shard)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample, recorded
        return BadSample(key, shard, f"undecodable {image_field}: {type(exc).__name__}: {exc}")
