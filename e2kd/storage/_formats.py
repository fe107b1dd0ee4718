"""Shard formats behind one small protocol, registered by name (the CLI's ``--format`` choices come from here).

A format turns a shard's columns into files inside a private staging directory and back from those files'
bytes (already read and checksummed by the reader). Everything else — keys, errors, checksums, commit,
manifest — is the same for every format and lives in :mod:`e2kd.storage._writer` / :mod:`e2kd.storage._reader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from e2kd.storage._encoding import Encoding
from e2kd.storage._wds_store import WdsFormat
from e2kd.storage._zarr_store import ZarrFormat

__all__ = ["ShardFormat", "ColumnSpecs", "register_format", "get_format", "list_formats"]

#: ``column → (dtype, shape of one row)``; a ``None`` shape means "any map shape ``(V, C_e, h, w)``".
ColumnSpecs = dict[str, tuple[str, tuple | None]]


@runtime_checkable
class ShardFormat(Protocol):
    """How one shard's columns are laid out on disk."""

    name: str  #: registry name, recorded in the manifest
    data_name: str  #: the file or directory inside a shard that holds the columns
    random_access: bool  #: rows can be read without streaming the whole shard
    joinable_by_key: bool  #: plain WebDataset code can join the shard's rows by ``__key__``

    def write(self, shard_dir: Path, columns: dict[str, np.ndarray], keys: list[str], encoding: Encoding) -> None:
        """Write ``columns`` (one row per key) into ``shard_dir/data_name`` (a fresh local directory)."""
        ...

    def is_marked(self, fs: Any, path: str) -> bool:
        """Whether the shard directory ``path`` carries e2kd's shard marker in this format's metadata (only what
        carries it is ever removed by a store's clean-up; see :mod:`e2kd.storage._ownership`)."""
        ...

    def read(self, blobs: dict[str, bytes], names: list[str], where: str, specs: ColumnSpecs | None,
             keys: list[str]) -> dict[str, np.ndarray]:
        """Decode ``names`` from a shard's files (``relative path → bytes``), checking headers against ``specs``.

        Raises:
            KeyError / ValueError: a column is missing, malformed, or disagrees with ``specs`` or ``keys``.
        """
        ...


_FORMATS: dict[str, ShardFormat] = {}


def register_format(fmt: ShardFormat) -> ShardFormat:
    """Make ``fmt`` available by its name (to ``cache-teacher --format`` and to readers of such stores)."""
    if not isinstance(fmt, ShardFormat):
        raise TypeError(f"{fmt!r} does not implement the ShardFormat protocol")
    if fmt.name in _FORMATS:
        raise ValueError(f"store format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ShardFormat:
    """The format registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown store format {name!r}; available: {', '.join(list_formats())}") from None


def list_formats() -> list[str]:
    return sorted(_FORMATS)


register_format(ZarrFormat())
register_format(WdsFormat())
