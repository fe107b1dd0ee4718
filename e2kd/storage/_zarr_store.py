"""Zarr v3 shard format: one Zarr group per shard, one array per column, Blosc-compressed, checksummed chunks.

Each array is written with Zarr v3's sharding codec: all its chunks (``encoding.chunk_samples`` rows each) go into
one object with an index, so a store shard is a handful of objects (one per column plus metadata), not one per
chunk — what object storage wants. Every chunk carries a CRC32C (``Crc32cCodec`` after the compressor; the
shard index has its own), checked whenever the chunk is decoded, so a damaged chunk is named by array.

Half-precision columns (logits, maps) use Blosc's bit-shuffle: neighbouring float16 values share sign and
exponent bits, which bit-shuffling lines up for the compressor (about 1.5× smaller than byte-shuffle on maps).
Stores written before sharding (one object per chunk, no CRC) read unchanged: the layout is in each array's
metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from e2kd.storage._encoding import Encoding
from e2kd.storage._ownership import SHARD_MARKER, SHARD_MARKER_KEY, read_marker

__all__ = ["ZarrFormat", "DATA_NAME"]

DATA_NAME = "data.zarr"


def _compressors(encoding: Encoding, dtype: np.dtype) -> list[Any]:
    """Blosc, then a CRC32C of the compressed chunk (verified on every decode)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "bitshuffle" if dtype.itemsize == 2 else ("shuffle" if dtype.itemsize > 1 else "noshuffle")
    # cname and shuffle are names Encoding validated; zarr types them as literals
    blosc = BloscCodec(cname=encoding.cname, clevel=encoding.clevel, shuffle=shuffle,  # type: ignore[arg-type]
                       typesize=dtype.itemsize)
    return [blosc, Crc32cCodec()]


class ZarrFormat:
    """Columns as Zarr v3 arrays (chunks of ``encoding.chunk_samples`` rows)."""

    name = "zarr"
    data_name = DATA_NAME
    random_access = True
    joinable_by_key = False

    def write(self, shard_dir: Path, columns: dict[str, np.ndarray], keys: list[str], encoding: Encoding) -> None:
        import zarr

        group = zarr.open_group(zarr.storage.LocalStore(str(shard_dir / DATA_NAME)), mode="w", zarr_format=3,
                                attributes={SHARD_MARKER_KEY: SHARD_MARKER})  # e2kd wrote this shard (cleanup)
        for name in sorted(columns):
            data = np.ascontiguousarray(columns[name])
            rows = max(1, min(encoding.chunk_samples, data.shape[0]))
            chunks = (rows,) + tuple(max(1, s) for s in data.shape[1:])
            shard = (-(-max(1, data.shape[0]) // rows) * rows,) + chunks[1:]  # every chunk in one object
            arr = group.create_array(name, shape=data.shape, chunks=chunks, shards=shard, dtype=data.dtype,
                                     compressors=_compressors(encoding, data.dtype), fill_value=0,
                                     config={"write_empty_chunks": True})  # every chunk stored: none reads as fill
            if data.size:
                arr[...] = data

    def is_marked(self, fs: Any, path: str) -> bool:
        """Whether the shard at ``path`` carries e2kd's marker (its group's attributes)."""
        return read_marker(fs, f"{path}/{DATA_NAME}/zarr.json")

    def read(self, blobs: dict[str, bytes], names: list[str], where: str,
             specs: dict[str, tuple[str, tuple | None]] | None, keys: list[str]) -> dict[str, np.ndarray]:
        """Decode from memory; with ``specs`` every array's dtype, shape and chunk shape is checked before any
        chunk is decoded, so a hostile header cannot make the reader allocate."""
        import zarr
        from zarr.core.buffer import cpu

        prefix = f"{DATA_NAME}/"
        store = zarr.storage.MemoryStore({k[len(prefix):]: cpu.Buffer.from_bytes(v) for k, v in blobs.items()
                                          if k.startswith(prefix)}, read_only=True)
        group = zarr.open_group(store, mode="r", zarr_format=3)
        marked = group.attrs.get(SHARD_MARKER_KEY) == SHARD_MARKER
        out = {}
        for name in names:
            arr = group.get(name)
            if not isinstance(arr, zarr.Array):
                raise KeyError(f"{where} has no array {name!r}")
            if specs is not None:
                _check_array(arr, name, specs[name], len(keys))
            if keys and (marked or name in _NEVER_FILL):
                _check_every_chunk(arr, name)
            try:
                out[name] = np.asarray(arr[...])
            except Exception as exc:  # noqa: BLE001 - a CRC32C mismatch, a truncated chunk or index, bad bytes
                why = "a chunk's CRC32C does not match" if "checksum" in str(exc) else f"{type(exc).__name__}: {exc}"
                raise ValueError(f"array {name!r} is damaged ({why})") from None
        return out


#: Columns whose chunks can never be all fill value (a view box has a positive size): required in any shard.
#: Shards written since the marker (e2kd 0.3) store every chunk, so there every column's chunks are required;
#: older writers skipped all-zero chunks (Zarr's default), which a reader cannot tell from a lost object.
_NEVER_FILL = frozenset({"views"})


def _check_every_chunk(arr: Any, name: str) -> None:
    """Every chunk the array's shape implies is stored: a lost object (or an emptied shard-index entry) would
    otherwise read as fill values — zeros — without a word."""
    stored, wanted = arr.nchunks_initialized, arr.nchunks
    if stored != wanted:
        raise ValueError(f"array {name!r} is missing {wanted - stored} of its {wanted} chunk(s) (they would read "
                         f"as zeros)")


def _check_array(arr: Any, name: str, spec: tuple[str, tuple | None], rows: int) -> None:
    dtype, row_shape = spec
    shape = tuple(arr.shape)
    if str(arr.dtype) != dtype:
        raise ValueError(f"array {name!r} has dtype {arr.dtype}, expected {dtype}")
    if shape[:1] != (rows,) or (row_shape is not None and shape[1:] != tuple(row_shape)) or \
            (row_shape is None and len(shape) != 5):
        want = (rows, *row_shape) if row_shape is not None else (rows, "V", "C_e", "h", "w")
        raise ValueError(f"array {name!r} has shape {shape}, expected {want}")
    if any(c > max(1, s) for c, s in zip(arr.chunks, shape, strict=True)):
        raise ValueError(f"array {name!r} has chunks {arr.chunks} larger than its shape {shape}")
    shards = getattr(arr, "shards", None)
    if shards is not None:  # a hostile shard shape would size the shard index
        whole = -(-max(1, rows) // arr.chunks[0]) * arr.chunks[0]
        if shards[0] > whole or tuple(shards[1:]) != tuple(arr.chunks[1:]):
            raise ValueError(f"array {name!r} has shards {shards} that do not fit chunks {arr.chunks}, shape {shape}")
