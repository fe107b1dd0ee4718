"""The cache manifest: a versioned, validated JSON document that makes a store self-describing.

:class:`Manifest` and :class:`ShardRecord` are frozen values: ``from_json`` validates every field once,
``to_json`` writes them back, and the checks that decide whether a run may use a store live beside them
(:meth:`Manifest.check_same_run` for writers, :meth:`Manifest.check_student` for train-student and evaluate).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from e2kd.storage.encoding import Encoding
from e2kd.storage.names import is_valid_shard_name

__all__ = ["SCHEMA", "SCHEMA_VERSION", "IDENTITY_FIELDS", "PRECISIONS", "Manifest", "ShardRecord", "ManifestError",
           "CompatibilityError", "input_fingerprint", "cache_id_of"]

SCHEMA = "e2kd.teacher-cache"
SCHEMA_VERSION = 1
#: Fields that define what a cache holds: a run whose values differ must not write into the store.
IDENTITY_FIELDS = ("format", "teacher", "explainer", "preprocessing", "views", "encoding", "precision")
#: Teacher autocast precisions a cache may record.
PRECISIONS = ("fp32", "bf16", "fp16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest is malformed, of an unknown schema version, or does not match a run."""


class CompatibilityError(ManifestError):
    """A cache does not fit a student run (one line, naming the field)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(msg)


def _is_int(value: Any, lo: int | None = None, hi: int | None = None) -> bool:
    """An ``int`` (not a bool) within ``[lo, hi]``."""
    return isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo) and \
        (hi is None or value <= hi)


def _shape(value: Any, what: str) -> tuple[int, ...] | None:
    _require(value is None or (isinstance(value, (list, tuple)) and len(value) == 3 and
                               all(_is_int(v, 1, 1 << 16) for v in value)),
             f"{what} is not three positive integers: {value!r}")
    return tuple(value) if value is not None else None


@dataclass(frozen=True)
class ShardRecord:
    """One shard in the manifest: ``num_errors`` samples skipped, ``num_bad_labels`` cached with label −1."""

    source: str
    num_samples: int
    num_errors: int
    sha256: str
    nbytes: int
    map_shape: tuple[int, ...] | None
    complete: bool = True
    num_bad_labels: int = 0
    source_bytes: int | None = None
    source_sha256: str | None = None

    @classmethod
    def from_json(cls, name: str, d: Any) -> ShardRecord:
        _require(is_valid_shard_name(name), f"unsafe shard name {name!r} in manifest")
        _require(isinstance(d, dict), f"shard {name!r}: record is not an object")
        _require(_is_int(d.get("num_samples"), 0), f"shard {name!r}: bad num_samples")
        _require(isinstance(d.get("sha256"), str) and bool(_SHA256.match(d["sha256"])), f"shard {name!r}: bad sha256")
        _require(isinstance(d.get("complete"), bool), f"shard {name!r}: bad complete flag")
        _require(_is_int(d.get("num_errors", 0), 0) and _is_int(d.get("bytes", 0), 0) and
                 _is_int(d.get("num_bad_labels", 0), 0), f"shard {name!r}: bad num_errors, num_bad_labels or bytes")
        _require(d.get("source_bytes") is None or _is_int(d["source_bytes"], 0), f"shard {name!r}: bad source_bytes")
        _require(isinstance(d.get("source", ""), str), f"shard {name!r}: bad source")
        return cls(source=d.get("source", ""), num_samples=d["num_samples"], num_errors=d.get("num_errors", 0),
                   sha256=d["sha256"], nbytes=d.get("bytes", 0), map_shape=_shape(d.get("map_shape"),
                                                                                  f"shard {name!r}: map_shape"),
                   complete=d["complete"], num_bad_labels=d.get("num_bad_labels", 0),
                   source_bytes=d.get("source_bytes"), source_sha256=d.get("source_sha256"))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "num_samples": self.num_samples, "num_errors": self.num_errors,
                "sha256": self.sha256, "bytes": self.nbytes, "complete": self.complete,
                "map_shape": list(self.map_shape) if self.map_shape is not None else None,
                "num_bad_labels": self.num_bad_labels, "source_bytes": self.source_bytes,
                "source_sha256": self.source_sha256}


def cache_id_of(document: Any) -> str:
    """A cache's id: sha256 of its manifest's canonical JSON (sorted keys, no whitespace, UTF-8).

    The manifest holds every shard's checksum, so the id names the exact content of a store: a copy has the
    same id, a changed shard or setting a different one.
    """
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def input_fingerprint(sources: dict[str, tuple[Any, ...]]) -> str:
    """sha256 over the sorted ``shard name → (input URL, bytes, content sha256)`` entries the cache was built from."""
    text = "\n".join(name + "\t" + "\t".join(map(str, entry)) for name, entry in sorted(sources.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a cache holds (teacher, explainer, preprocessing, views, encoding) and its shards.

    ``teacher``, ``explainer``, ``preprocessing`` and ``views`` are the JSON objects the writer recorded
    (validated for the fields e2kd reads); the typed accessors below are what code should use.
    """

    e2kd_version: str
    format: str
    teacher: dict[str, Any]
    explainer: dict[str, Any]
    preprocessing: dict[str, Any]
    views: dict[str, Any]
    encoding: Encoding
    precision: str
    map_shape: tuple[int, ...] | None = None
    inputs: dict[str, Any] = field(default_factory=lambda: {"urls": [], "fingerprint": None})
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    class_names: tuple[str, ...] | None = None  # index → name, when known (image folders, --class-names)

    def class_name(self, index: int) -> str:
        """``"3 (cat)"`` when names are known, else ``"3"``."""
        names = self.class_names
        return f"{index} ({names[index]})" if names is not None and 0 <= index < len(names) else str(index)

    # ---- typed accessors -----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.teacher["num_classes"])

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.preprocessing["input_size"]
        return int(h), int(w)

    @property
    def num_views(self) -> int:
        return int(self.views["k"])

    @property
    def replays_views(self) -> bool:
        """True for a K-view cache (views are replayed exactly); False for ``full`` (one whole-image view)."""
        return self.views["policy"] != "full"

    @property
    def explainer_name(self) -> str:
        return str(self.explainer["name"])

    @property
    def explainer_family(self) -> str:
        return str(self.explainer["family"])

    @property
    def complete_shards(self) -> list[str]:
        return sorted(n for n, r in self.shards.items() if r.complete)

    @property
    def num_samples(self) -> int:
        """Samples in complete shards."""
        return sum(self.shards[n].num_samples for n in self.complete_shards)

    # ---- JSON ----------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, m: Any) -> Manifest:
        """Validate structure, schema version and every shard record.

        Raises:
            ManifestError: naming the first bad field.
        """
        from e2kd.storage.formats import list_formats

        _require(isinstance(m, dict), "manifest is not a JSON object")
        _require(m.get("schema") == SCHEMA, f"not an e2kd teacher cache (schema {m.get('schema')!r}, "
                                            f"expected {SCHEMA!r})")
        version = m.get("schema_version")
        _require(isinstance(version, int), "manifest has no integer schema_version")
        _require(version <= SCHEMA_VERSION, f"manifest schema_version {version} is newer than this e2kd understands "
                                            f"({SCHEMA_VERSION}); upgrade e2kd")
        _require(version == SCHEMA_VERSION, f"unknown manifest schema_version {version} (supported: {SCHEMA_VERSION})")
        _require(m.get("format") in list_formats(), f"unknown store format {m.get('format')!r}")
        for name in ("teacher", "explainer", "preprocessing", "views", "encoding", "inputs", "shards"):
            _require(isinstance(m.get(name), dict), f"manifest field {name!r} is missing or not an object")
        _check_sections(m)
        try:
            encoding = Encoding.from_dict(m["encoding"])
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest encoding: {exc}") from None
        _require(encoding.num_classes == m["teacher"]["num_classes"],
                 f"manifest encoding.num_classes {encoding.num_classes} differs from teacher.num_classes "
                 f"{m['teacher']['num_classes']}")
        shards = {name: ShardRecord.from_json(name, rec) for name, rec in m["shards"].items()}
        names = m.get("class_names")
        _require(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names) and
                                   len(names) == m["teacher"]["num_classes"]),
                 f"manifest class_names is not a list of {m['teacher']['num_classes']} strings")
        return cls(e2kd_version=str(m.get("e2kd_version", "")), format=m["format"], teacher=m["teacher"],
                   explainer=m["explainer"], preprocessing=m["preprocessing"], views=m["views"], encoding=encoding,
                   precision=str(m.get("precision", "fp32")), map_shape=_shape(m.get("map_shape"),
                                                                               "manifest map_shape"),
                   inputs=m["inputs"], shards=shards, schema_version=version,
                   class_names=tuple(names) if names is not None else None)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": self.schema_version, "e2kd_version": self.e2kd_version,
                "format": self.format, "teacher": self.teacher, "explainer": self.explainer,
                "preprocessing": self.preprocessing, "views": self.views, "encoding": self.encoding.to_dict(),
                "precision": self.precision, "map_shape": list(self.map_shape) if self.map_shape else None,
                "inputs": self.inputs, "shards": {n: r.to_json() for n, r in sorted(self.shards.items())},
                "class_names": list(self.class_names) if self.class_names is not None else None}

    # ---- changes (new values) ------------------------------------------------------------------
    def with_shard(self, name: str, record: ShardRecord) -> Manifest:
        """This manifest with ``record`` for shard ``name`` (map shape and input fingerprint updated)."""
        shape = self.map_shape
        if record.map_shape is not None:
            if shape not in (None, record.map_shape):
                raise ManifestError(f"shard {name} has map shape {list(record.map_shape)}, others {list(shape)}")
            shape = record.map_shape
        shards = {**self.shards, name: record}
        sources = {n: (r.source, r.source_bytes, r.source_sha256) for n, r in shards.items()}
        inputs = {"urls": sorted({r.source for r in shards.values()}), "fingerprint": input_fingerprint(sources)}
        return replace(self, shards=shards, map_shape=shape, inputs=inputs)

    # ---- compatibility -------------------------------------------------------------------------
    def check_same_run(self, wanted: Manifest) -> None:
        """Refuse to mix runs in one store: raise naming the first identity field whose value differs."""
        mine, theirs = json.loads(json.dumps(self.to_json())), json.loads(json.dumps(wanted.to_json()))
        for name in IDENTITY_FIELDS:
            if mine.get(name) != theirs.get(name):
                raise ManifestError(f"the store was written with a different {name}: "
                                    f"{_diff(mine.get(name), theirs.get(name))}; use --overwrite to start over "
                                    f"or another --out")

    def check_student(self, *, num_classes: int | None = None, explainer: str | None = None,
                      explainer_family: str | None = None, input_size: int | None = None,
                      temperature: float | None = None, what: str = "cache") -> None:
        """Can a student with these values train or be evaluated on this cache? ``CompatibilityError`` if not.

        ``explainer_family`` is the family of the student's ``explainer`` (the caller resolves names); an
        ``input_size`` other than the cache's is refused only for a K-view cache (view replay needs it); a KD
        ``temperature`` is refused where the logits codec says KD at it would be biased (sampled logits).
        """
        if num_classes is not None and num_classes != self.num_classes:
            raise CompatibilityError(f"num_classes: the student has {num_classes} classes, the {what}'s teacher "
                                     f"{self.num_classes}")
        if explainer_family is not None and explainer_family != self.explainer_family:
            raise CompatibilityError(f"explainer: the {what} holds {self.explainer_family} maps, which cannot "
                                     f"supervise a {explainer or explainer_family} student explanation")
        size = self.input_size[0]
        if input_size is not None and input_size != size and self.replays_views:
            raise CompatibilityError(f"input_size: the {what}'s views were rendered at {size} px, the student asks "
                                     f"for {input_size} (view replay needs the same size)")
        check_temperature = getattr(self.encoding.logits_codec, "check_temperature", None)
        problem = check_temperature(temperature) if temperature is not None and check_temperature else None
        if problem:
            raise CompatibilityError(f"temperature: {problem}")
        incomplete = sorted(n for n, r in self.shards.items() if not r.complete)
        if incomplete or self.map_shape is None:
            raise CompatibilityError(f"{what}: incomplete store (shards {incomplete[:3]}); finish it with the same "
                                     f"cache-teacher command")


def _check_sections(m: dict[str, Any]) -> None:
    """The fields of the nested sections e2kd reads."""
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
    _require(m.get("precision", "fp32") in PRECISIONS, f"manifest precision {m.get('precision')!r} is not one of "
                                                       f"{PRECISIONS}")


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{key}={a.get(key)!r} in the store, {b.get(key)!r} now"
    return f"{a!r} in the store, {b!r} now"
