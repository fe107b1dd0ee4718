"""The WebDataset shard layout of e2kd 0.1–0.3 (one ``<key>.<column>.npy`` member per column in ``data.tar``,
``members.json`` a member → CRC32 map), written as those versions wrote it: readers must keep reading it."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from e2kd.storage._ownership import SHARD_MARKER, SHARD_MARKER_KEY
from e2kd.storage._wds_store import DATA_NAME, MEMBERS_NAME, member_key


def write_column_members(self: Any, shard_dir: Path, columns: dict[str, np.ndarray], keys: list[str],
                         encoding: Any = None) -> None:
    """``WdsFormat.write`` as e2kd 0.3 had it (monkeypatch it in to write an old-layout store)."""
    from webdataset import TarWriter

    longest = max((len(name) for name in columns), default=0)
    digests: dict[str, int] = {}
    with TarWriter(str(shard_dir / DATA_NAME), encoder=False, mtime=0, user="e2kd", group="e2kd") as sink:
        for row, key in enumerate(keys):
            prefix = member_key(key, row, longest)
            sample = {}
            for name in columns:
                buf = io.BytesIO()
                np.save(buf, np.array(columns[name][row]), allow_pickle=False)
                sample[f"{name}.npy"] = buf.getvalue()
            digests.update({f"{prefix}.{ext}": zlib.crc32(data) for ext, data in sample.items()})
            sink.write({"__key__": prefix, **sample})
    (shard_dir / MEMBERS_NAME).write_text(json.dumps({"crc32": digests, SHARD_MARKER_KEY: SHARD_MARKER},
                                                     sort_keys=True))
