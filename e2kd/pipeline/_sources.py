"""Input data: WebDataset tar shards or an image folder, as per-shard streams of decoded samples.

Identity is the sample key (``__key__``, or the image folder's relative path without extension), never a
list position. Only images and the integer ``cls`` label are decoded; a sample that cannot be decoded is
yielded as a :class:`BadSample` with its key, shard and reason instead of stopping the job.

One class per source kind: :class:`TarShard` (a WebDataset tar: local path, fsspec URL or ``pipe:`` command)
and :class:`FolderShard` (one class directory of an ``root/<class>/<file>`` image folder), both
:class:`InputShard`. Shards are frozen, hashable and picklable: they travel to Ray actors and DataLoader workers.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from e2kd.storage import shard_name_for
from e2kd.storage._local_cache import LocalCache

__all__ = ["InputShard", "TarShard", "FolderShard", "Sample", "BadSample", "InputShardError", "list_shards",
           "class_names", "read_class_names", "iter_shard", "iter_keys", "decode_image", "input_size_bytes",
           "input_sha256", "IMAGE_EXTS", "local_copy", "EncodedImage", "read_header"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REFUSED_EXTS = ("pkl", "pyd", "pickle", "pth", "pt")
_FOLDER_EXTS = {"." + e for e in IMAGE_EXTS}
_INT32 = 2**31
_REMOTE_BLOCK = 16 * 2**20  # bytes per read of a remote input tar (one request each)


@dataclass
class Sample:
    """One decoded sample: ``image`` is uint8 ``[3, H, W]`` RGB (or an :class:`EncodedImage`, decoded later where
    the reader asked for that); ``label`` is -1 where the sample has none."""

    key: str
    image: Tensor | EncodedImage  # uint8 [3, H, W]
    label: int
    shard: str

    @property
    def pixels(self) -> Tensor:
        """The decoded image (``TypeError`` where it was left encoded)."""
        if not isinstance(self.image, Tensor):
            raise TypeError(f"sample {self.key!r}: its image was left encoded (decoded on the device later)")
        return self.image


@dataclass(frozen=True)
class EncodedImage:
    """An image still encoded, to be decoded elsewhere (on the training GPU): its bytes and its size, read from the
    header. ``jpeg``: a baseline or progressive RGB / greyscale JPEG that nvjpeg decodes; other images are decoded
    with :func:`decode_image`."""

    data: bytes
    height: int
    width: int
    jpeg: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.height, self.width)


def read_header(data: bytes) -> EncodedImage:
    """The image's size from its header, its pixels left encoded (raises on bytes that are no image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
    if width < 1 or height < 1:
        raise ValueError(f"degenerate image of size {width}×{height}")
    return EncodedImage(bytes(data), int(height), int(width), jpeg)


@dataclass
class BadSample:
    """A sample that could not be decoded (``key`` ``"*"``: the rest of an unreadable shard)."""

    key: str
    shard: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "shard": self.shard, "reason": self.reason}


# ---- the source kinds ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputShard(ABC):
    """One unit of input, named ``name`` in the store; build them with :func:`list_shards`."""

    name: str
    url: str

    def samples(self) -> Iterator[Sample | BadSample]:
        """The decoded samples, in stored order; bad ones as :class:`BadSample` (:meth:`decode` of :meth:`raw`)."""
        for raw in self.raw():
            yield raw if isinstance(raw, BadSample) else self.decode(raw)

    @abstractmethod
    def raw(self) -> Iterator[Any]:
        """The shard's undecoded records in stored order (cheap: I/O only), or :class:`BadSample` where a record
        is bad before decoding. Decoding them (:meth:`decode`) can run in other threads, in any order."""

    @abstractmethod
    def decode(self, raw: Any, image: Callable[[bytes], Any] | None = None) -> Sample | BadSample:
        """Decode one record of :meth:`raw` (pure: the same record gives the same sample in any thread); ``image``
        turns the image's bytes into the sample's image (default :func:`decode_image`; :func:`read_header` leaves it
        encoded)."""

    @abstractmethod
    def keys(self) -> Iterator[tuple[str, int]]:
        """``(key, label)`` of every sample without decoding images (a cheap listing pass)."""

    @abstractmethod
    def size_bytes(self) -> int | None:
        """Size of the input in bytes, or None where it cannot be known."""

    @abstractmethod
    def sha256(self) -> str | None:
        """sha256 of the input's bytes (provenance for the manifest), or None where it is not taken."""


class InputShardError(RuntimeError):
    """An input shard could not be opened at all (unlike a truncated tar, whose readable samples count)."""


@dataclass(frozen=True)
class TarShard(InputShard):
    """A WebDataset tar: a local path, an fsspec URL (``s3://…``, ``simplecache::…``) or a ``pipe:`` command."""

    def raw(self) -> Iterator[dict | BadSample]:
        """The tar's samples as webdataset groups its members (bytes); a duplicate key or the unreadable rest of
        a truncated tar as :class:`BadSample`."""
        seen: set[str] = set()
        for raw in _raw_samples_or_bad(self.url, self.name, seen):
            if isinstance(raw, BadSample):
                yield raw
                return
            key = str(raw.get("__key__", ""))
            if key in seen:
                yield BadSample(key, self.name, "duplicate key within the shard")
                continue
            seen.add(key)
            yield raw

    def decode(self, raw: dict, image: Callable[[bytes], Any] | None = None) -> Sample | BadSample:
        return _decode_tar_sample(raw, str(raw.get("__key__", "")), self.name, image)

    def keys(self) -> Iterator[tuple[str, int]]:
        try:
            for raw in _raw_samples(self.url):
                try:
                    label = _parse_label(raw)
                except (ValueError, UnicodeDecodeError):
                    label = -1
                yield str(raw.get("__key__", "")), label
        except (tarfile.ReadError, EOFError, OSError):  # a truncated tar: the keys before the damage are listed
            return

    def size_bytes(self) -> int | None:
        """Size of the tar in bytes; None for a ``pipe:`` command."""
        if self.url.startswith("pipe:"):
            return None
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.url)
            return int(fs.size(path))
        except Exception as exc:  # noqa: BLE001 - missing object, credentials, network: all name the URL
            raise InputShardError(f"cannot open input shard {self.url}: {type(exc).__name__}: {exc}") from None

    def sha256(self) -> str | None:
        """sha256 of the tar's bytes; None for a ``pipe:`` command (reading it twice may differ)."""
        if self.url.startswith("pipe:"):
            return None
        import fsspec

        digest = hashlib.sha256()
        with fsspec.open(self.url, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()


@dataclass(frozen=True)
class FolderShard(InputShard):
    """One class directory ``url`` of an image folder: class index ``label``, keys relative to ``root``.

    ``url`` and ``root`` are local paths or fsspec URLs (``s3://bucket/photos/cat``): a folder on object storage is
    read like a local one (listed once, each image fetched when it is decoded)."""

    label: int = -1
    root: str = ""

    @property
    def remote(self) -> bool:
        return not _is_local(self.url)

    def raw(self) -> Iterator[Path | str]:
        """The image files, sorted (read and decoded by :meth:`decode`)."""
        return iter(self._files())

    def decode(self, raw: Path | str, image: Callable[[bytes], Any] | None = None) -> Sample | BadSample:
        key = self._key(raw)
        try:
            data = raw.read_bytes() if isinstance(raw, Path) else _read_url(raw)
        except Exception as exc:  # noqa: BLE001 - a vanished or unreadable file is a bad sample, recorded
            return BadSample(key, self.name, f"unreadable image: {type(exc).__name__}: {exc}")
        try:
            return Sample(key, (image or decode_image)(data), self.label, self.name)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample, recorded
            return BadSample(key, self.name, f"undecodable image: {type(exc).__name__}: {exc}")

    def keys(self) -> Iterator[tuple[str, int]]:
        for path in self._files():
            yield self._key(path), self.label

    def size_bytes(self) -> int | None:
        """Total size of the directory's image files."""
        if self.remote:
            return sum(size for _, size in _remote_images(self.url))
        return sum(Path(p).stat().st_size for p in self._files())

    def sha256(self) -> str | None:
        """None: a folder's content is not hashed."""
        return None

    def _files(self) -> list[Path] | list[str]:
        """The image files under the class directory (any depth), sorted."""
        if self.remote:
            return [url for url, _ in _remote_images(self.url)]
        return sorted(p for p in Path(self.url).rglob("*") if p.is_file() and p.suffix.lower() in _FOLDER_EXTS)

    def _key(self, path: Path | str) -> str:
        """A file's sample key: its path relative to the folder root, without extension, ``/``-separated."""
        if isinstance(path, str):
            rel = path[len(self.root.rstrip("/")) + 1:]
            stem, dot, ext = rel.rpartition(".")
            return stem if dot and "/" not in ext else rel
        return str(path.relative_to(self.root).with_suffix("")).replace(os.sep, "/")


def _read_url(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def _remote_images(url: str) -> list[tuple[str, int]]:
    """``(URL, bytes)`` of the image files under a folder on object storage, sorted by URL.

    Raises:
        InputShardError: the folder cannot be listed (named, with the cause).
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        listing = fs.find(path.rstrip("/"), detail=True)
    except Exception as exc:  # noqa: BLE001 - credentials, network, permissions: all name the URL
        raise InputShardError(f"cannot list image folder {url}: {type(exc).__name__}: {exc}") from None
    base, prefix = path.rstrip("/"), url.rstrip("/")
    found = [(prefix + p[len(base):], int(info.get("size") or 0)) for p, info in listing.items()
             if info.get("type") != "directory" and os.path.splitext(p)[1].lower() in _FOLDER_EXTS]
    return sorted(found)


# ---- module-level API (thin wrappers over the shard methods) -------------------------------------------
def iter_shard(shard: InputShard) -> Iterator[Sample | BadSample]:
    """Yield the decoded samples of one input shard, bad ones as :class:`BadSample`."""
    return shard.samples()


def iter_keys(shard: InputShard) -> Iterator[tuple[str, int]]:
    """``(key, label)`` of every sample in a shard without decoding images (a cheap listing pass)."""
    return shard.keys()


def input_size_bytes(shard: InputShard) -> int | None:
    """Size of an input shard in bytes (a folder: its image files), or None where it cannot be known (``pipe:``)."""
    return shard.size_bytes()


def input_sha256(shard: InputShard) -> str | None:
    """sha256 of an input tar's bytes (provenance for the manifest); None for folders and ``pipe:`` commands."""
    return shard.sha256()


# ---- listing -------------------------------------------------------------------------------------------
def class_names(shards: Sequence[InputShard]) -> list[str] | None:
    """Class names by index from an image folder's class directories; None unless every shard is one."""
    if not shards or not all(isinstance(s, FolderShard) for s in shards):
        return None
    by_label = {s.label: Path(s.url).name for s in shards}  # type: ignore[attr-defined]
    return [by_label[i] for i in range(len(by_label))] if sorted(by_label) == list(range(len(by_label))) else None


def read_class_names(path: str | Path) -> list[str]:
    """A class-names file: one name per line, line i is class i (blank lines and ``#`` comments skipped)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def local_copy(shard: InputShard, cache: LocalCache | None) -> InputShard:
    """``shard`` read from ``cache``: a remote WebDataset tar is fetched whole into it once and read locally after
    (the copy named by URL, size and version — ETag or modification time — and verified by its sha256 on each use).
    Without a cache, for a local path, a ``pipe:`` command or an image folder: ``shard`` itself."""
    if cache is None or not isinstance(shard, TarShard) or shard.url.startswith("pipe:"):
        return shard
    import fsspec

    from e2kd.storage._files import is_local

    fs, path = fsspec.core.url_to_fs(shard.url)
    if is_local(fs):
        return shard
    info = fs.info(path)
    version = next((str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "updated") if info.get(k)), "")
    local = cache.file(f"{shard.url}\x00{info.get('size')}\x00{version}", lambda to: fs.get_file(path, str(to)))
    return shard if local is None else replace(shard, url=str(local))  # same name: same keys


def list_shards(urls: str | Sequence[str]) -> list[InputShard]:
    """Expand comma-separated URLs, brace patterns (``{000..009}``) and glob patterns (``*``, ``?``, ``[…]``, locally
    and on fsspec URLs: ``data/train-*.tar``, ``s3://b/train-0000[0-4].tar``) into input shards; a directory —
    local or on object storage (``s3://bucket/photos``) — is an image folder.

    Raises:
        ValueError: nothing matched, a local file is missing, a brace pattern is unbalanced, a glob pattern matches
            nothing, or two shards share a name.
    """
    shards: list[InputShard] = []
    for url in _globbed(_expand(urls)):
        if _is_local(url):  # absolute: Ray workers and DataLoader workers need not share the driver's cwd
            url = os.path.abspath(url)
        if _is_local(url) and os.path.isdir(url):
            shards.extend(_folder_shards(url))
        elif _is_local(url) and not os.path.isfile(url):
            raise ValueError(f"input shard not found: {url}")
        elif not _is_local(url) and not _looks_like_tar(url) and _remote_isdir(url):
            shards.extend(_folder_shards(url.rstrip("/")))
        else:
            shards.append(TarShard(name=_shard_name(url), url=url))
    if not shards:
        raise ValueError(f"no input shards in {urls!r}")
    _check_unique_names(shards)
    return shards


def _looks_like_tar(url: str) -> bool:
    return url.startswith("pipe:") or url.rstrip("/").endswith((".tar", ".tgz", ".tar.gz"))


def _remote_isdir(url: str) -> bool:
    """Whether an fsspec URL names a directory (a prefix with objects under it)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.isdir(path.rstrip("/")))
    except Exception as exc:  # noqa: BLE001 - credentials, network: named with the URL
        raise InputShardError(f"cannot open input {url}: {type(exc).__name__}: {exc}") from None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _check_unique_names(shards: list[InputShard]) -> None:
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen and seen[s.name] != s.url:
            raise ValueError(f"two input shards share the name {s.name!r}: {seen[s.name]} and {s.url}")
        seen[s.name] = s.url


def _folder_shards(root: str) -> list[FolderShard]:
    if _is_local(root):
        classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        entries = fs.ls(path.rstrip("/"), detail=True)
        classes = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")
        classes = [c for c in classes if not c.startswith(".")]
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-directories (expected root/<class>/<file>)")
    join = (lambda c: str(Path(root) / c)) if _is_local(root) else (lambda c: f"{root}/{c}")
    return [FolderShard(name=shard_name_for(f"class-{c}"), url=join(c), label=i, root=root)
            for i, c in enumerate(classes)]


def _shard_name(url: str) -> str:
    """The store shard name of an input URL: its file name without extension, made safe (see ``storage.names``)."""
    base = url.rstrip("/").rsplit("/", 1)[-1].split("::")[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return shard_name_for(base)


# Not ``webdataset.shardlists.expand_urls`` (webdataset 1.0.2): it splits a string on "::", which would break
# fsspec chained URLs such as ``simplecache::s3://bucket/x.tar`` (see ``_shard_name``), it does not split on
# commas or newlines, and it substitutes ``${VAR}`` from ``WDS_VAR`` environment variables (an AssertionError
# where one is missing). Wrapping it to undo all that leaves nothing but its ``braceexpand`` call, so the
# splitting is done here and ``braceexpand`` is called directly.
def _expand(urls: str | Sequence[str]) -> list[str]:
    """Comma- or newline-separated URL lists and brace patterns (``{a,b}``, ``{000..009}``) → URLs."""
    parts = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for part in parts:
        for item in _split_outside_braces(str(part).replace("\n", ",")):
            item = item.strip()
            if item:
                out.extend(_brace_expand(item))
    return out


_GLOB_CHARS = frozenset("*?[")


def _globbed(urls: list[str]) -> list[str]:
    """Each glob pattern replaced by its matches, sorted (a path that exists as written is kept as is; ``pipe:``
    commands are never globbed). Chained fsspec URLs (``simplecache::s3://…``) keep their chain."""
    out: list[str] = []
    for url in urls:
        if url.startswith("pipe:") or not _GLOB_CHARS & set(url):
            out.append(url)
            continue
        if _is_local(url):
            matches = [url] if os.path.exists(url) else sorted(glob.glob(url))
        else:
            import fsspec

            chain, _, inner = url.rpartition("::")
            fs, path = fsspec.core.url_to_fs(inner)
            matches = [url] if fs.exists(path) else \
                [f"{chain}::{m}" if chain else m for m in sorted(fs.unstrip_protocol(p) for p in fs.glob(path))]
        if not matches:
            raise ValueError(f"input pattern {url!r} matches nothing")
        out.extend(matches)
    return out


def _brace_expand(pattern: str) -> list[str]:
    """``braceexpand`` of one pattern; an unbalanced one raises ValueError naming it."""
    import braceexpand

    try:
        return list(braceexpand.braceexpand(pattern))
    except ValueError as exc:  # braceexpand's UnbalancedBracesError
        raise ValueError(f"input pattern {pattern!r}: {exc}") from None


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


# ---- decoding ------------------------------------------------------------------------------------------
# PIL decodes every format. ``torchvision.io.decode_image`` (0.29) was bit-identical to PIL on 8-bit JPEG and
# PNG, but it is not used: it kills the process (SIGSEGV) on a PNG whose IDAT fails zlib's data check where
# PIL raises OSError (a hostile input must give a BadSample, not a crashed worker), it returns 16-bit PNGs
# unscaled as uint16, and torchvision's image decoding is deprecated since 0.29.
def decode_image(data: bytes) -> Tensor:
    """Decode image bytes to uint8 ``[3, H, W]`` RGB (raises on corrupt data).

    The tensor is channels-last in memory (a ``[3, H, W]`` view of the decoder's ``H × W × 3`` pixels): no
    transpose copy, and the layout :func:`~e2kd.pipeline._views.render_view_uint8` resamples fastest.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = _pil_to_rgb(img)
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"degenerate image of shape {rgb.shape}")
    return torch.from_numpy(np.array(rgb, copy=not rgb.flags.writeable)).permute(2, 0, 1)


def _pil_to_rgb(img: Any) -> np.ndarray:
    """A loaded PIL image → uint8 ``[H, W, 3]``; 16/32-bit grey is scaled, never clipped, to 8 bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.repeat(_to_uint8(np.asarray(img), img.mode)[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (0…65535) or 32-bit integer grey values → 0…255 by scaling (``convert("RGB")`` would clip)."""
    top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


# ---- tar internals -------------------------------------------------------------------------------------
def _raw_samples(url: str) -> Iterator[dict]:
    """Raw (undecoded) samples of one tar: open → tar members → samples grouped by key (webdataset's stages).

    The stream is opened with fsspec (``pipe:`` through webdataset's ``gopen``), so a local file name is never
    parsed as a URL (``a b;c.tar`` stays one path); e2kd splits shards over ranks and workers itself.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = _open_stream(url)
    except Exception as exc:  # noqa: BLE001 - credentials, network, permissions, a missing object: all errors
        raise InputShardError(f"cannot open input shard {url}: {type(exc).__name__}: {exc}") from None
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def _raw_samples_or_bad(url: str, shard: str, seen: set[str]) -> Iterator[dict | BadSample]:
    """:func:`_raw_samples`, ending with one ``"*"`` :class:`BadSample` where the tar cannot be read further."""
    stream = _raw_samples(url)
    while True:
        try:
            raw = next(stream)
        except StopIteration:
            return
        except InputShardError:
            raise  # never opened: an error, not an empty shard
        except Exception as exc:  # noqa: BLE001 - a truncated / unreadable tar ends the shard, recorded
            yield BadSample("*", shard, f"unreadable shard after {len(seen)} samples: {type(exc).__name__}: {exc}")
            return
        yield raw


def _open_stream(url: str) -> Any:
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    if "://" in url and not url.startswith("file://"):
        # object storage: large blocks, the next one fetched in the background while this one is decoded
        try:
            return fsspec.open(url, "rb", cache_type="background", block_size=_REMOTE_BLOCK).open()
        except TypeError:  # a backend whose files take no cache options
            pass
    return fsspec.open(url, "rb").open()


def _parse_label(raw: dict) -> int:
    """The integer ``cls`` member, -1 where there is none (raises ValueError/UnicodeDecodeError if not an int)."""
    return int(raw["cls"].decode().strip()) if "cls" in raw else -1


def _decode_tar_sample(raw: dict, key: str, shard: str,
                       image: Callable[[bytes], Any] | None = None) -> Sample | BadSample:
    refused = [k for k in raw if k.rsplit(".", 1)[-1].lower() in REFUSED_EXTS]
    if refused:
        return BadSample(key, shard, f"refused pickle-like member(s) {refused}: e2kd never unpickles data")
    image_field = next((k for k in raw if k.lower() in IMAGE_EXTS), None)
    if image_field is None:
        return BadSample(key, shard, f"no image member (have {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        label = _parse_label(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return BadSample(key, shard, f"cls is not an integer: {exc}")
    if not -_INT32 <= label < _INT32:  # labels stored as int32; ones outside [0, C) are handled by the cache stage
        return BadSample(key, shard, f"cls {label} is out of range (not a 32-bit integer)")
    try:
        return Sample(key, (image or decode_image)(raw[image_field]), label, shard)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample, recorded
        return BadSample(key, shard, f"undecodable {image_field}: {type(exc).__name__}: {exc}")
