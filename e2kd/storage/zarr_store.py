"""Zarr v3 shard format: one Zarr group per input shard, one array per column, Blosc-compressed chunks."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from e2kd.storage.encoding import Encoding
from e2kd.storage.files import is_local

__all__ = ["write_columns", "read_columns", "columns_from_blobs", "DATA_NAME"]

DATA_NAME = "data.zarr"


def _codec(encoding: Encoding, dtype: np.dtype) -> BloscCodec:
    shuffle = "bitshuffle" if dtype.itemsize == 2 else ("shuffle" if dtype.itemsize > 1 else "noshuffle")
    return BloscCodec(cname=encoding.cname, clevel=encoding.clevel, shuffle=shuffle, typesize=dtype.itemsize)


def write_columns(shard_dir: Path, columns: dict[str, np.ndarray], encoding: Encoding) -> None:
    """Write all columns of one shard into ``shard_dir/data.zarr`` (a private, local staging directory)."""
    group = zarr.open_group(zarr.storage.LocalStore(str(shard_dir / DATA_NAME)), mode="w", zarr_format=3)
    for name in sorted(columns):
        data = np.ascontiguousarray(columns[name])
        chunks = (max(1, min(encoding.chunk_samples, data.shape[0])),) + tuple(max(1, s) for s in data.shape[1:])
        arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                                 compressors=[_codec(encoding, data.dtype)], fill_value=0)
        if data.size:
            arr[...] = data


def _open(fs: fsspec.AbstractFileSystem, shard_path: str) -> zarr.Group:
    path = f"{shard_path}/{DATA_NAME}"
    if is_local(fs):
        store = zarr.storage.LocalStore(path, read_only=True)
    else:
        store = zarr.storage.FsspecStore.from_url(fs.unstrip_protocol(path), read_only=True)
    return zarr.open_group(store, mode="r", zarr_format=3)


def read_columns(fs: fsspec.AbstractFileSystem, shard_path: str, names: list[str],
                 rows: slice | None = None) -> dict[str, np.ndarray]:
    """Read ``names`` (all rows, or a slice of rows) from one shard."""
    return _columns(_open(fs, shard_path), shard_path, names, rows)


def columns_from_blobs(blobs: dict[str, bytes], names: list[str], where: str = "shard",
                       specs: dict[str, tuple[str, tuple | None]] | None = None,
                       rows: int | None = None) -> dict[str, np.ndarray]:
    """Decode ``names`` from a shard's files already in memory (``relative path → bytes``, e.g. just verified).

    With ``specs`` (``column → (dtype, row shape)``) and ``rows``, every array's metadata — dtype, shape, chunk
    shape — is checked before any chunk is decoded, so a hostile header cannot make the reader allocate.
    """
    from zarr.core.buffer import cpu

    prefix = f"{DATA_NAME}/"
    store = zarr.storage.MemoryStore({k[len(prefix):]: cpu.Buffer.from_bytes(v) for k, v in blobs.items()
                                      if k.startswith(prefix)}, read_only=True)
    group = zarr.open_group(store, mode="r", zarr_format=3)
    if specs is not None and rows is not None:
        for name in names:
            if name not in group:
                raise KeyError(f"{where} has no array {name!r}")
            _check_array(group[name], name, specs[name], rows)
    return _columns(group, where, names, None)


def _check_array(arr: zarr.Array, name: str, spec: tuple[str, tuple | None], rows: int) -> None:
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


def _columns(group: zarr.Group, where: str, names: list[str], rows: slice | None) -> dict[str, np.ndarray]:
    sel = rows if rows is not None else slice(None)
    out = {}
    for name in names:
        if name not in group:
            raise KeyError(f"{where} has no array {name!r}")
        out[name] = group[name][sel]
    return out
