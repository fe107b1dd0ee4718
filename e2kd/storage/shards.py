"""Writing one shard: columns + key index + error list into a private staging directory, then commit."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import ModuleType

import numpy as np

from e2kd.storage import wds_store, zarr_store
from e2kd.storage.encoding import Encoding
from e2kd.storage.files import checksum_local_dir

__all__ = ["FORMATS", "shard_format", "stage_shard", "KEYS_NAME", "ERRORS_NAME"]

FORMATS: dict[str, ModuleType] = {"zarr": zarr_store, "wds": wds_store}
KEYS_NAME = "keys.json"
ERRORS_NAME = "errors.json"


def shard_format(name: str) -> ModuleType:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown store format {name!r}; available: {', '.join(sorted(FORMATS))}") from None


def stage_shard(staging_root: Path, fmt: str, columns: dict[str, np.ndarray], keys: list[str],
                errors: list[dict[str, str]], encoding: Encoding) -> tuple[Path, str, int]:
    """Write a complete shard into a fresh directory under ``staging_root``; return (dir, sha256, bytes)."""
    missing = set(encoding.column_names()) - set(columns)
    if missing:
        raise ValueError(f"shard columns missing: {sorted(missing)}")
    if any(len(col) != len(keys) for col in columns.values()):
        raise ValueError("every column needs one row per key")
    shard_dir = staging_root / uuid.uuid4().hex
    shard_dir.mkdir(parents=True)
    try:
        shard_format(fmt).write_columns(shard_dir, columns, encoding)
        (shard_dir / KEYS_NAME).write_text(json.dumps(keys))
        (shard_dir / ERRORS_NAME).write_text(json.dumps(errors, sort_keys=True))
        sha, nbytes = checksum_local_dir(shard_dir)
    except BaseException:
        shutil.rmtree(shard_dir, ignore_errors=True)
        raise
    return shard_dir, sha, nbytes
