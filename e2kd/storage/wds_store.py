"""WebDataset shard format: the same columns as ``.npy`` members of one tar per shard, for sequential streaming.

The tar is a real WebDataset: members are ``<sample key>.<column>.npy`` written by ``webdataset.TarWriter``
(fixed mtime, owner and order), so plain webdataset code can read it and join it with the input by
``__key__``. A key that cannot be a WebDataset member name (a dot in its last path part — webdataset would
split the key there —, an empty, ``.`` or ``..`` path part, a leading ``/``, control characters, or too long
for a USTAR header) is written under its row number ``<row:08d>`` instead; ``keys.json`` always holds the
true key of every row. Stores written by e2kd 0.1 (every row under its number) read unchanged.

Beside the tar, ``members.json`` holds a CRC32 of every member (the shard's member index); a reader checks each
member as it reads it, so a damaged row is named by column and row.

Reading never extracts anything: each member's row comes from its key (``keys.json``) or its number, so a
name that could escape a directory, a foreign member, a duplicated, missing or reordered row is refused;
every ``.npy`` is loaded with ``allow_pickle=False`` after its header is checked.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from e2kd.storage.ownership import SHARD_MARKER, SHARD_MARKER_KEY, read_marker

__all__ = ["WdsFormat", "read_columns", "member_key", "DATA_NAME", "MEMBERS_NAME"]

DATA_NAME = "data.tar"
MEMBERS_NAME = "members.json"
_COLUMN = re.compile(r"^[a-z0-9_]+$")  # column names (field prefixes may hold digits)
_USTAR_NAME_MAX = 100


def member_key(key: str, row: int, longest_column: int = 16) -> str:
    """The ``__key__`` under which row ``row`` is written: the sample key if WebDataset can carry it, else the row."""
    parts = key.split("/")
    safe = (key and not key.startswith("/") and all(p not in ("", ".", "..") for p in parts)
            and "." not in parts[-1] and "\\" not in key and key.isprintable()
            and len(key.encode()) + longest_column + 6 <= _USTAR_NAME_MAX)
    return key if safe else f"{row:08d}"


def _npy_bytes(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(value), allow_pickle=False)  # np.array keeps 0-d rows 0-d
    return buf.getvalue()


class WdsFormat:
    """Columns as ``.npy`` members of one WebDataset tar, one sample per row."""

    name = "wds"
    data_name = DATA_NAME
    random_access = False
    joinable_by_key = True

    def write(self, shard_dir: Path, columns: dict[str, np.ndarray], keys: list[str], encoding: Any = None) -> None:
        from webdataset import TarWriter

        longest = max((len(name) for name in columns), default=0)
        digests: dict[str, int] = {}
        with TarWriter(str(shard_dir / DATA_NAME), encoder=False, mtime=0, user="e2kd", group="e2kd") as sink:
            for row, key in enumerate(keys):
                prefix = member_key(key, row, longest)
                sample = {f"{name}.npy": _npy_bytes(columns[name][row]) for name in columns}
                digests.update({f"{prefix}.{ext}": zlib.crc32(data) for ext, data in sample.items()})
                sink.write({"__key__": prefix, **sample})
        members = {"crc32": digests, SHARD_MARKER_KEY: SHARD_MARKER}  # the marker: e2kd wrote this shard
        (shard_dir / MEMBERS_NAME).write_text(json.dumps(members, sort_keys=True))

    def is_marked(self, fs: Any, path: str) -> bool:
        """Whether the shard at ``path`` carries e2kd's marker (in its ``members.json``)."""
        return read_marker(fs, f"{path}/{MEMBERS_NAME}")

    def read(self, blobs: dict[str, bytes], names: list[str], where: str,
             specs: dict[str, tuple[str, tuple | None]] | None, keys: list[str]) -> dict[str, np.ndarray]:
        """Decode from memory; each ``.npy`` header is checked against ``specs`` before its array is loaded."""
        if DATA_NAME not in blobs:
            raise KeyError(f"{where} has no {DATA_NAME}")
        return _read_tar(io.BytesIO(blobs[DATA_NAME]), where, names, specs, keys, _member_digests(blobs, where))


def _member_digests(blobs: dict[str, bytes], where: str) -> dict[str, int] | None:
    """The shard's member CRC32s (None for a shard written before they were recorded)."""
    if MEMBERS_NAME not in blobs:
        return None
    try:
        digests = json.loads(blobs[MEMBERS_NAME])["crc32"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: {MEMBERS_NAME} is unreadable ({type(exc).__name__})") from None
    if not isinstance(digests, dict) or not all(isinstance(v, int) for v in digests.values()):
        raise ValueError(f"{where}: {MEMBERS_NAME} is not a member → CRC32 map")
    return digests


def read_columns(fs: fsspec.AbstractFileSystem, shard_path: str, names: list[str],
                 keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Stream one shard's tar and stack the requested columns (rows named by number unless ``keys`` are given)."""
    with fs.open(f"{shard_path}/{DATA_NAME}", "rb") as f:
        return _read_tar(f, shard_path, names, None, keys)


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


def _row_and_column(member: tarfile.TarInfo, rows: dict[str, int]) -> tuple[int, str] | None:
    """``(row, column)`` of a member named ``<key>.<column>.npy`` or ``<row:08d>.<column>.npy``, else None."""
    if not member.isfile() or not member.name.endswith(".npy") or "." not in member.name[:-4]:
        return None
    prefix, column = member.name[:-4].rsplit(".", 1)  # column names hold no dot; keys may
    if not _COLUMN.match(column):
        return None
    if prefix in rows:
        return rows[prefix], column
    if re.fullmatch(r"\d{8}", prefix):
        return int(prefix), column
    return None


def _read_tar(f: io.IOBase, where: str, names: list[str], specs: dict[str, tuple[str, tuple | None]] | None,
              keys: list[str] | None, digests: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Rows of every column must be ``0 … n−1``, once each and in order: a duplicated or missing row is an error."""
    per_row: dict[str, list[np.ndarray]] = {name: [] for name in names}
    next_row: dict[str, int] = {}
    rows = {key: row for row, key in enumerate(keys or [])}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            found = _row_and_column(member, rows)
            if found is None:
                raise ValueError(f"{where}: refused tar member {member.name!r} (not a row .npy file of this shard)")
            row, column = found
            if row != next_row.get(column, 0):
                raise ValueError(f"{where}: tar member {member.name!r} out of order (expected row "
                                 f"{next_row.get(column, 0)} of column {column!r}): duplicated or missing row")
            next_row[column] = row + 1
            if keys is not None and row >= len(keys):
                raise ValueError(f"{where}: more rows than the {len(keys)} the manifest records")
            if column in per_row:
                data = tar.extractfile(member).read()
                if digests is not None and digests.get(member.name) != zlib.crc32(data):
                    raise ValueError(f"array {column!r} is damaged at row {row} (member {member.name!r}: its CRC32 "
                                     f"does not match {MEMBERS_NAME})")
                per_row[column].append(_load_row(data, column, specs.get(column) if specs else None))
    if len(set(next_row.values())) > 1:
        raise ValueError(f"{where}: columns have different row counts {dict(sorted(next_row.items()))}")
    out = {}
    for name, items in per_row.items():
        if not items:
            raise KeyError(f"shard {where} has no column {name!r}")
        out[name] = np.stack(items)
    return out
