"""The cache manifest: a versioned, validated JSON document that makes a store self-describing."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from e2kd.storage.encoding import Encoding
from e2kd.storage.names import is_valid_shard_name

__all__ = ["SCHEMA", "SCHEMA_VERSION", "IDENTITY_FIELDS", "new_manifest", "validate_manifest", "check_compatible",
           "input_fingerprint", "ManifestError", "shard_record"]

SCHEMA = "e2kd.teacher-cache"
SCHEMA_VERSION = 1
#: Fields that define what a cache holds: a run whose values differ must not write into the store.
IDENTITY_FIELDS = ("format", "teacher", "explainer", "preprocessing", "views", "encoding", "precision")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest is malformed, of an unknown schema version, or does not match a run."""


def new_manifest(*, version: str, fmt: str, teacher: dict, explainer: dict, preprocessing: dict, views: dict,
                 encoding: dict, precision: str) -> dict[str, Any]:
    """A manifest with no shards yet."""
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "e2kd_version": version, "format": fmt,
            "teacher": teacher, "explainer": explainer, "preprocessing": preprocessing, "views": views,
            "encoding": encoding, "precision": precision, "map_shape": None,
            "inputs": {"urls": [], "fingerprint": None}, "shards": {}}


def shard_record(*, source: str, num_samples: int, num_errors: int, sha256: str, nbytes: int,
                 map_shape: list[int] | None, num_bad_labels: int = 0) -> dict[str, Any]:
    """A complete shard: ``num_errors`` samples skipped, ``num_bad_labels`` cached with their label set to −1."""
    return {"source": source, "num_samples": int(num_samples), "num_errors": int(num_errors), "sha256": sha256,
            "bytes": int(nbytes), "map_shape": map_shape, "complete": True, "num_bad_labels": int(num_bad_labels)}


def input_fingerprint(sources: dict[str, tuple[Any, ...]]) -> str:
    """sha256 over the sorted ``shard name → (input URL, bytes, content sha256)`` entries the cache was built from."""
    text = "\n".join(name + "\t" + "\t".join(map(str, entry)) for name, entry in sorted(sources.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(msg)


def validate_manifest(m: Any) -> dict[str, Any]:
    """Check structure, schema version and every shard record; return the manifest.

    Raises:
        ManifestError: naming the first bad field.
    """
    _require(isinstance(m, dict), "manifest is not a JSON object")
    _require(m.get("schema") == SCHEMA, f"not an e2kd teacher cache (schema {m.get('schema')!r}, expected {SCHEMA!r})")
    version = m.get("schema_version")
    _require(isinstance(version, int), "manifest has no integer schema_version")
    _require(version <= SCHEMA_VERSION, f"manifest schema_version {version} is newer than this e2kd understands "
                                        f"({SCHEMA_VERSION}); upgrade e2kd")
    _require(version == SCHEMA_VERSION, f"unknown manifest schema_version {version} (supported: {SCHEMA_VERSION})")
    _require(m.get("format") in ("zarr", "wds"), f"unknown store format {m.get('format')!r}")
    for field in ("teacher", "explainer", "preprocessing", "views", "encoding", "inputs", "shards"):
        _require(isinstance(m.get(field), dict), f"manifest field {field!r} is missing or not an object")
    _require(_is_int(m["teacher"].get("num_classes"), 1), "manifest teacher.num_classes is not a positive integer")
    _require(isinstance(m["teacher"].get("name"), str), "manifest teacher.name is not a string")
    size = m["preprocessing"].get("input_size")
    _require(isinstance(size, list) and len(size) == 2 and all(_is_int(v, 1, 1 << 16) for v in size),
             f"manifest preprocessing.input_size is not two positive integers: {size!r}")
    _require(_is_int(m["views"].get("k"), 1, 1 << 16), f"manifest views.k is not a positive integer: "
                                                        f"{m['views'].get('k')!r}")
    _require(isinstance(m["views"].get("policy"), str), "manifest views.policy is not a string")
    _require(isinstance(m["explainer"].get("name"), str) and isinstance(m["explainer"].get("family"), str),
             "manifest explainer needs string name and family")
    try:
        encoding = Encoding.from_dict(m["encoding"])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest encoding: {exc}") from None
    _require(encoding.num_classes == m["teacher"]["num_classes"],
             f"manifest encoding.num_classes {encoding.num_classes} differs from teacher.num_classes "
             f"{m['teacher']['num_classes']}")
    shape = m.get("map_shape")
    _require(shape is None or (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v, 1, 1 << 16)
                                                                                  for v in shape)),
             f"manifest map_shape is not three positive integers: {shape!r}")
    for name, rec in m["shards"].items():
        _require(is_valid_shard_name(name), f"unsafe shard name {name!r} in manifest")
        _require(isinstance(rec, dict), f"shard {name!r}: record is not an object")
        _require(_is_int(rec.get("num_samples"), 0),
                 f"shard {name!r}: bad num_samples")
        _require(isinstance(rec.get("sha256"), str) and bool(_SHA256.match(rec["sha256"])),
                 f"shard {name!r}: bad sha256")
        _require(isinstance(rec.get("complete"), bool), f"shard {name!r}: bad complete flag")
        _require(_is_int(rec.get("num_errors", 0), 0) and _is_int(rec.get("bytes", 0), 0),
                 f"shard {name!r}: bad num_errors or bytes")
    return m


def _is_int(value: Any, lo: int | None = None, hi: int | None = None) -> bool:
    """An ``int`` (not a bool) within ``[lo, hi]``."""
    return isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo) and \
        (hi is None or value <= hi)


def check_compatible(existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to mix runs: raise naming the first identity field whose value differs."""
    for field in IDENTITY_FIELDS:
        if existing.get(field) != wanted.get(field):
            raise ManifestError(f"the store was written with a different {field}: "
                                f"{_diff(existing.get(field), wanted.get(field))}; use --overwrite to start over "
                                f"or another --out")


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{key}={a.get(key)!r} in the store, {b.get(key)!r} now"
    return f"{a!r} in the store, {b!r} now"
