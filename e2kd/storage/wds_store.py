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

__all__ = ["write_columns", "read_columns", "DATA_NAME"]

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
    per_row: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with fs.open(f"{shard_path}/{DATA_NAME}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            match = _MEMBER.match(member.name)
            if not member.isfile() or match is None:
                raise ValueError(f"{shard_path}: refused tar member {member.name!r} (not a row .npy file)")
            if match.group(2) in per_row:
                data = tar.extractfile(member).read()
                per_row[match.group(2)].append(np.load(io.BytesIO(data), allow_pickle=False))
    out = {}
    for name, items in per_row.items():
        if not items:
            raise KeyError(f"shard {shard_path} has no column {name!r}")
        out[name] = np.stack(items)[rows if rows is not None else slice(None)]
    return out
