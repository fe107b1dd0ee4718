"""WebDataset shard format: one compressed WebDataset tar per shard, one member per sample, for streaming.

Since e2kd 0.4 a shard is ``data.tar.gz``: a gzip-compressed tar (webdataset reads it as is) whose members are
``<sample key>.e2kd.npy``, each one ``.npy`` record of a structured dtype holding every column of that sample
(``record["logits"]``, ``record["maps"]``, …), written by ``webdataset.TarWriter`` with fixed mtime, owner and
order; plain webdataset code reads it (its ``.npy`` decoder loads without pickle) and joins it with the input by
``__key__``. One member per sample and the compressed stream cost a few bytes of header per sample where one
member per column cost a 512-byte header and padding each. ``members.json`` holds a CRC32 of every member in
row order, so a damaged row is named.

A key that cannot be a WebDataset member name (a dot in its last path part — webdataset would split the key
there —, an empty, ``.`` or ``..`` path part, a leading ``/``, control characters, or too long for a USTAR
header) is written under its row number ``<row:08d>`` instead; ``keys.json`` always holds the true key.

Shards of earlier e2kd (``data.tar``, one ``<key>.<column>.npy`` member per column, ``members.json`` a
member → CRC32 map; e2kd 0.1: every row under its number) read unchanged.

Reading never extracts anything: each member's row comes from its key (``keys.json``) or its number, so a
name that could escape a directory, a foreign member, a duplicated, missing or reordered row is refused;
every ``.npy`` is loaded with ``allow_pickle=False`` after its header is checked.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from e2kd.storage._ownership import SHARD_MARKER, SHARD_MARKER_KEY, read_marker

__all__ = ["WdsFormat", "read_columns", "member_key", "SAMPLES_NAME", "DATA_NAME", "MEMBERS_NAME", "RECORD_EXT"]

SAMPLES_NAME = "data.tar.gz"  #: one member per sample (e2kd ≥ 0.4)
DATA_NAME = "data.tar"  #: one member per sample and column (earlier stores; read only)
RECORD_EXT = "e2kd.npy"
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


def _record_dtype(columns: dict[str, np.ndarray]) -> np.dtype:
    """One sample's record: a field per column (sorted by name), each of that column's row shape."""
    return np.dtype([(name, columns[name].dtype, columns[name].shape[1:]) for name in sorted(columns)])


class WdsFormat:
    """A shard as one compressed WebDataset tar: a structured ``.npy`` record per sample."""

    name = "wds"
    data_name = SAMPLES_NAME
    random_access = False
    joinable_by_key = True

    def write(self, shard_dir: Path, columns: dict[str, np.ndarray], keys: list[str], encoding: Any = None) -> None:
        from webdataset import TarWriter

        dtype = _record_dtype(columns)
        record = np.zeros((), dtype)
        crcs = []
        with open(shard_dir / SAMPLES_NAME, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as stream:
            with TarWriter(stream, encoder=False, mtime=0, user="e2kd", group="e2kd") as sink:
                for row, key in enumerate(keys):
                    for name in dtype.names or ():
                        record[name] = columns[name][row]
                    data = _npy_bytes(record)
                    crcs.append(zlib.crc32(data))
                    sink.write({"__key__": member_key(key, row, len(RECORD_EXT)), RECORD_EXT: data})
        members = {"layout": "sample-records", "crc32": crcs, SHARD_MARKER_KEY: SHARD_MARKER}  # marker: e2kd's
        (shard_dir / MEMBERS_NAME).write_text(json.dumps(members, sort_keys=True))

    def is_marked(self, fs: Any, path: str) -> bool:
        """Whether the shard at ``path`` carries e2kd's marker (in its ``members.json``)."""
        return read_marker(fs, f"{path}/{MEMBERS_NAME}")

    def read(self, blobs: dict[str, bytes], names: list[str], where: str,
             specs: dict[str, tuple[str, tuple | None]] | None, keys: list[str]) -> dict[str, np.ndarray]:
        """Decode from memory; each ``.npy`` header is checked against ``specs`` before its array is loaded."""
        if SAMPLES_NAME in blobs:
            return _read_records(blobs[SAMPLES_NAME], where, names, specs, keys, _row_digests(blobs, where))
        if DATA_NAME not in blobs:
            raise KeyError(f"{where} has no {SAMPLES_NAME}")
        return _read_tar(io.BytesIO(blobs[DATA_NAME]), where, names, specs, keys, _member_digests(blobs, where))


def _row_digests(blobs: dict[str, bytes], where: str) -> list[int]:
    try:
        digests = json.loads(blobs[MEMBERS_NAME])["crc32"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: {MEMBERS_NAME} is missing or unreadable ({type(exc).__name__})") from None
    if not isinstance(digests, list) or not all(isinstance(v, int) for v in digests):
        raise ValueError(f"{where}: {MEMBERS_NAME} is not a list of row CRC32s")
    return digests


def _check_record_header(data: bytes, specs: dict[str, tuple[str, tuple | None]] | None, names: list[str]) -> None:
    """The record's ``.npy`` header, before anything is allocated: a 0-d record of exactly the expected fields."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version} in a record header")
    shape, _, dtype = readers[version](buf)
    fields: dict[str, Any] = dict(dtype.fields or {})
    if shape != () or dtype.hasobject or dtype.itemsize > len(data) or not set(names) <= set(fields) or \
            (specs is not None and set(fields) != set(specs)):
        raise ValueError(f"record header says {dtype} {tuple(shape)}, expected one record of fields "
                         f"{sorted(specs or names)}")
    for name in names:
        sub = fields[name][0]
        base, row_shape = (sub.base, sub.shape) if sub.subdtype else (sub, ())
        want_dtype, want_shape = specs[name] if specs is not None else (str(base), row_shape)
        if str(base) != want_dtype or (want_shape is not None and tuple(row_shape) != tuple(want_shape)) or \
                (want_shape is None and len(row_shape) != 4):
            raise ValueError(f"column {name!r}: record header says {base} {tuple(row_shape)}, expected {want_dtype} "
                             f"{want_shape if want_shape is not None else '(V, C_e, h, w)'}")


def _record_row(member: tarfile.TarInfo, rows: dict[str, int]) -> int | None:
    """The row of a member named ``<key>.e2kd.npy`` or ``<row:08d>.e2kd.npy``, else None."""
    suffix = "." + RECORD_EXT
    if not member.isfile() or not member.name.endswith(suffix):
        return None
    prefix = member.name[:-len(suffix)]
    if prefix in rows:
        return rows[prefix]
    return int(prefix) if re.fullmatch(r"\d{8}", prefix) else None


def _read_records(data: bytes, where: str, names: list[str], specs: dict[str, tuple[str, tuple | None]] | None,
                  keys: list[str], digests: list[int] | None) -> dict[str, np.ndarray]:
    """Rows ``0 … n−1``, once each and in order; each record's CRC32 and header checked before it is loaded."""
    rows = {key: row for row, key in enumerate(keys)}
    records: list[np.ndarray] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz") as tar:
            for member in tar:
                row = _record_row(member, rows)
                if row is None:
                    raise ValueError(f"{where}: refused tar member {member.name!r} (not a record of this shard)")
                if row != len(records):
                    raise ValueError(f"{where}: tar member {member.name!r} out of order (expected row "
                                     f"{len(records)}): duplicated or missing row")
                if row >= len(keys):
                    raise ValueError(f"{where}: more rows than the {len(keys)} the manifest records")
                payload = _member_bytes(tar, member)
                if digests is not None and (row >= len(digests) or digests[row] != zlib.crc32(payload)):
                    raise ValueError(f"row {row} is damaged (member {member.name!r}: its CRC32 does not match "
                                     f"{MEMBERS_NAME})")
                _check_record_header(payload, specs, names)
                records.append(np.load(io.BytesIO(payload), allow_pickle=False))
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{SAMPLES_NAME} is damaged after row {len(records)} ({type(exc).__name__}: {exc})") \
            from None
    if len(records) != len(keys):
        raise ValueError(f"{where}: {len(records)} rows, the manifest records {len(keys)}")
    table = np.stack(records) if records else None
    if table is None:
        raise KeyError(f"shard {where} has no rows")
    return {name: np.ascontiguousarray(table[name]) for name in names}


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
    if fs.exists(f"{shard_path}/{SAMPLES_NAME}"):  # members named by key: the shard's key file gives the rows
        rows = keys if keys is not None else json.loads(fs.cat_file(f"{shard_path}/keys.json"))
        return _read_records(fs.cat_file(f"{shard_path}/{SAMPLES_NAME}"), shard_path, names, None, rows, None)
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
                data = _member_bytes(tar, member)
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


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes (anything else — a link, a directory — is refused)."""
    handle = tar.extractfile(member) if member.isfile() else None
    if handle is None:
        raise ValueError(f"tar member {member.name!r} is not a regular file")
    return handle.read()
