"""WebDataset shard format: the same columns as ``.npy`` members of one tar per shard, for sequential streaming.

Members are ``{row:08d}.{column}.npy`` (saved with ``allow_pickle=False``); anything else in the tar, or a
name that could escape a directory, is refused on reading.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import fsspec
import numpy as np

__all__ = ["write_columns", "read_columns", "columns_from_blobs", "DATA_NAME"]

DATA_NAME = "data.tar"
_MEMBER = re.compile(r"^(\d{8})\.([a-z_]+)\.npy$")


def write_columns(shard_dir: Path, columns: dict[str, np.ndarray], encoding: object = None) -> None:
    """Write the columns row by row into ``shard_dir/data.tar`` (deterministic: fixed mtime, owner, order)."""
    n = len(next(iter(columns.values())))
    with tarfile.open(shard_dir / DATA_NAME, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in range(n):
            for name in sorted(columns):
                buf = io.BytesIO()
                np.save(buf, np.array(columns[name][row]), allow_pickle=False)  # keeps 0-d rows 0-d
                info = tarfile.TarInfo(f"{row:08d}.{name}.npy")
                info.size, info.mtime, info.mode = buf.tell(), 0, 0o444
                buf.seek(0)
                tar.addfile(info, buf)


def read_columns(fs: fsspec.AbstractFileSystem, shard_path: str, names: list[str],
                 rows: slice | None = None) -> dict[str, np.ndarray]:
    """Stream the tar once and stack the requested columns (all rows, or a slice)."""
    with fs.open(f"{shard_path}/{DATA_NAME}", "rb") as f:
        return _read_tar(f, shard_path, names, rows)


def columns_from_blobs(blobs: dict[str, bytes], names: list[str], where: str = "shard",
                       specs: dict[str, tuple[str, tuple | None]] | None = None,
                       rows: int | None = None) -> dict[str, np.ndarray]:
    """Decode ``names`` from a shard's files already in memory (``relative path → bytes``, e.g. just verified).

    With ``specs`` (``column → (dtype, row shape)``) and ``rows``, each ``.npy`` header is checked before its
    array is loaded, and no more than ``rows`` rows are read.
    """
    if DATA_NAME not in blobs:
        raise KeyError(f"{where} has no {DATA_NAME}")
    return _read_tar(io.BytesIO(blobs[DATA_NAME]), where, names, None, specs, rows)


def _load_row(data: bytes, column: str, spec: tuple[str, tuple | None] | None) -> np.ndarray:
    """``np.load`` of one row, its header checked against ``spec`` first (no allocation sized by the file)."""
    buf = io.BytesIO(data)
    if spec is not None:
        version = np.lib.format.read_magic(buf)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"column {column!r}: unsupported .npy format version {version}")
        shape, _, dtype = readers[version](buf)
        want_dtype, row_shape = spec
        if str(dtype) != want_dtype or (row_shape is not None and tuple(shape) != tuple(row_shape)) or \
                (row_shape is None and len(shape) != 4) or int(np.prod(shape)) * dtype.itemsize > len(data):
            raise ValueError(f"column {column!r}: row header says {dtype} {tuple(shape)}, expected {want_dtype} "
                             f"{row_shape if row_shape is not None else '(V, C_e, h, w)'}")
        buf.seek(0)
    return np.load(buf, allow_pickle=False)


def _read_tar(f: io.IOBase, shard_path: str, names: list[str], rows: slice | None,
              specs: dict[str, tuple[str, tuple | None]] | None = None,
              max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Rows of every column must be ``0 … n−1``, once each and in order: a duplicated or missing row is an error."""
    per_row: dict[str, list[np.ndarray]] = {name: [] for name in names}
    next_row: dict[str, int] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            match = _MEMBER.match(member.name)
            if not member.isfile() or match is None:
                raise ValueError(f"{shard_path}: refused tar member {member.name!r} (not a row .npy file)")
            row, column = int(match.group(1)), match.group(2)
            if row != next_row.get(column, 0):
                raise ValueError(f"{shard_path}: tar member {member.name!r} out of order (expected row "
                                 f"{next_row.get(column, 0)} of column {column!r}): duplicated or missing row")
            next_row[column] = row + 1
            if max_rows is not None and row >= max_rows:
                raise ValueError(f"{shard_path}: more rows than the {max_rows} the manifest records")
            if column in per_row:
                data = tar.extractfile(member).read()
                per_row[column].append(_load_row(data, column, specs.get(column) if specs else None))
    if len(set(next_row.values())) > 1:
        raise ValueError(f"{shard_path}: columns have different row counts {dict(sorted(next_row.items()))}")
    out = {}
    for name, items in per_row.items():
        if not items:
            raise KeyError(f"shard {shard_path} has no column {name!r}")
        out[name] = np.stack(items)[rows if rows is not None else slice(None)]
    return out
