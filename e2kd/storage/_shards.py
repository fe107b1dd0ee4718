"""Staging one shard: columns + key index + error list written into a private local directory, checksummed."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from e2kd.storage._encoding import Encoding
from e2kd.storage._files import checksum_local_dir
from e2kd.storage._formats import get_format

__all__ = ["stage_shard", "KEYS_NAME", "ERRORS_NAME"]

KEYS_NAME = "keys.json"
ERRORS_NAME = "errors.json"


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
        get_format(fmt).write(shard_dir, columns, keys, encoding)
        (shard_dir / KEYS_NAME).write_text(json.dumps(keys))
        (shard_dir / ERRORS_NAME).write_text(json.dumps(errors, sort_keys=True))
        sha, nbytes = checksum_local_dir(shard_dir)
    except BaseException:
        shutil.rmtree(shard_dir, ignore_errors=True)
        raise
    return shard_dir, sha, nbytes
