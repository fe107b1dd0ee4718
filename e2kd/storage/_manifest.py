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

from e2kd.storage._encoding import Encoding
from e2kd.storage._fields import FIELD_NAME, Field, explanation_prefix
from e2kd.storage._names import is_valid_shard_name

__all__ = ["SCHEMA", "SCHEMA_VERSION", "SCHEMA_VERSIONS", "derived_fields", "IDENTITY_FIELDS", "PRECISIONS",
           "Manifest", "ShardRecord", "ManifestError", "CompatibilityError", "input_fingerprint", "cache_id_of",
           "check_map_shapes"]

SCHEMA = "e2kd.teacher-cache"
SCHEMA_VERSION = 2
#: Versions this e2kd reads: 1 (one explanation, codecs named by ``encoding``), 2 (``fields``: several explanations,
#: every codec recorded by name and parameters).
SCHEMA_VERSIONS = (1, 2)
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


def _shapes(value: Any, what: str) -> dict[str, tuple[int, ...]] | None:
    """``field → map shape`` (the explanation fields after the first), or None."""
    if value is None:
        return None
    _require(isinstance(value, dict) and all(isinstance(k, str) for k in value), f"{what} is not an object")
    return {k: _shape(v, f"{what}[{k!r}]") for k, v in value.items()}  # type: ignore[misc]


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
    #: map shapes of the explanation fields after the first (schema 2, several explainers); ``map_shape`` is the first's
    extra_map_shapes: dict[str, tuple[int, ...]] | None = None

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
                   source_bytes=d.get("source_bytes"), source_sha256=d.get("source_sha256"),
                   extra_map_shapes=_shapes(d.get("map_shapes"), f"shard {name!r}: map_shapes"))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "num_samples": self.num_samples, "num_errors": self.num_errors,
                "sha256": self.sha256, "bytes": self.nbytes, "complete": self.complete,
                "map_shape": list(self.map_shape) if self.map_shape is not None else None,
                "num_bad_labels": self.num_bad_labels, "source_bytes": self.source_bytes,
                "source_sha256": self.source_sha256,
                **({"map_shapes": {k: list(v) for k, v in sorted(self.extra_map_shapes.items())}}
                   if self.extra_map_shapes else {})}


def check_map_shapes(name: str, record: ShardRecord, shape: tuple[int, ...] | None,
                     extra: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The store's map shape once shard ``name`` is in (``extra``, the later fields' shapes, updated in place).

    Raises:
        ManifestError: the shard's map shapes differ from the other shards'.
    """
    if record.map_shape is not None:
        if shape not in (None, record.map_shape):
            raise ManifestError(f"shard {name} has map shape {list(record.map_shape)}, others {list(shape)}")
        shape = record.map_shape
    for field_name, field_shape in (record.extra_map_shapes or {}).items():
        if extra.get(field_name, field_shape) != field_shape:
            raise ManifestError(f"shard {name} has {field_name} map shape {list(field_shape)}, others "
                                f"{list(extra[field_name])}")
        extra[field_name] = field_shape
    return shape


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
    #: map shapes of the explanation fields after the first (``map_shape`` is the first's)
    extra_map_shapes: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if not self.encoding.fields:  # schema 1, or built without fields: derived from encoding and explainer
            object.__setattr__(self, "encoding", self.encoding.with_fields(derived_fields(self.encoding,
                                                                                          self.explainer)))

    @property
    def fields(self) -> tuple[Field, ...]:
        """What the cache holds: the teacher's logits, then its explanation fields (the first is the default)."""
        return (self.encoding.logits_field, *self.encoding.explanation_fields)

    @property
    def map_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """``explanation field → map shape`` (None: no shard recorded yet)."""
        first = self.encoding.explanation_fields[0].name
        return {first: self.map_shape, **(self.extra_map_shapes or {})}

    def field_family(self, name: str | None = None) -> str:
        """The explainer family of explanation field ``name`` (None: the default field)."""
        f = self.encoding.explanation_field(name)
        return str(f.producer.get("family") or self.explainer_family)

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
        from e2kd.storage._formats import list_formats

        _require(isinstance(m, dict), "manifest is not a JSON object")
        _require(m.get("schema") == SCHEMA, f"not an e2kd teacher cache (schema {m.get('schema')!r}, "
                                            f"expected {SCHEMA!r})")
        version = m.get("schema_version")
        _require(isinstance(version, int), "manifest has no integer schema_version")
        _require(version <= SCHEMA_VERSION, f"manifest schema_version {version} is newer than this e2kd understands "
                                            f"({SCHEMA_VERSION}); upgrade e2kd")
        _require(version in SCHEMA_VERSIONS, f"unknown manifest schema_version {version} (supported: "
                                             f"{', '.join(map(str, SCHEMA_VERSIONS))})")
        _require(m.get("format") in list_formats(), f"unknown store format {m.get('format')!r}")
        for name in ("teacher", "explainer", "preprocessing", "views", "encoding", "inputs", "shards"):
            _require(isinstance(m.get(name), dict), f"manifest field {name!r} is missing or not an object")
        _check_sections(m)
        try:
            encoding = Encoding.from_dict(m["encoding"])
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest encoding: {exc}") from None
        if version >= 2:
            encoding = encoding.with_fields(_parse_fields(m))
        _require(encoding.num_classes == m["teacher"]["num_classes"],
                 f"manifest encoding.num_classes {encoding.num_classes} differs from teacher.num_classes "
                 f"{m['teacher']['num_classes']}")
        shards = {name: ShardRecord.from_json(name, rec) for name, rec in m["shards"].items()}
        extra = _shapes(m.get("map_shapes"), "manifest map_shapes") if version >= 2 else None
        later = {f.name for f in encoding.explanation_fields[1:]}
        _require(set(extra or {}) <= later and all(set(r.extra_map_shapes or {}) <= later for r in shards.values()),
                 f"manifest map_shapes name fields that are not later explanation fields (those are {sorted(later)})")
        names = m.get("class_names")
        _require(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names) and
                                   len(names) == m["teacher"]["num_classes"]),
                 f"manifest class_names is not a list of {m['teacher']['num_classes']} strings")
        return cls(e2kd_version=str(m.get("e2kd_version", "")), format=m["format"], teacher=m["teacher"],
                   explainer=m["explainer"], preprocessing=m["preprocessing"], views=m["views"], encoding=encoding,
                   precision=str(m.get("precision", "fp32")), map_shape=_shape(m.get("map_shape"),
                                                                               "manifest map_shape"),
                   inputs=m["inputs"], shards=shards, schema_version=version,
                   class_names=tuple(names) if names is not None else None,
                   extra_map_shapes=extra)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": self.schema_version, "e2kd_version": self.e2kd_version,
                "format": self.format, "teacher": self.teacher, "explainer": self.explainer,
                "preprocessing": self.preprocessing, "views": self.views, "encoding": self.encoding.to_dict(),
                "precision": self.precision, "map_shape": list(self.map_shape) if self.map_shape else None,
                "inputs": self.inputs, "shards": {n: r.to_json() for n, r in sorted(self.shards.items())},
                "class_names": list(self.class_names) if self.class_names is not None else None,
                **({"fields": [f.to_json() for f in self.fields]} if self.schema_version >= 2 else {}),
                **({"map_shapes": {k: list(v) for k, v in sorted(self.extra_map_shapes.items())}}
                   if self.extra_map_shapes else {})}

    # ---- changes (new values) ------------------------------------------------------------------
    def with_shard(self, name: str, record: ShardRecord) -> Manifest:
        """This manifest with ``record`` for shard ``name`` (map shapes and input fingerprint updated)."""
        return self.with_shards({name: record})

    def with_shards(self, records: dict[str, ShardRecord]) -> Manifest:
        """This manifest with ``records`` added or replaced (one pass over the shards, whatever their number).

        Raises:
            ManifestError: a record's map shape differs from the other shards'.
        """
        shape, extra = self.map_shape, dict(self.extra_map_shapes or {})
        for name, record in sorted(records.items()):
            shape = check_map_shapes(name, record, shape, extra)
        shards = {**self.shards, **records}
        sources = {n: (r.source, r.source_bytes, r.source_sha256) for n, r in shards.items()}
        inputs = {"urls": sorted({r.source for r in shards.values()}), "fingerprint": input_fingerprint(sources)}
        return replace(self, shards=shards, map_shape=shape, inputs=inputs, extra_map_shapes=extra or None)

    # ---- compatibility -------------------------------------------------------------------------
    def check_same_run(self, wanted: Manifest) -> None:
        """Refuse to mix runs in one store: raise naming the first identity field whose value differs."""
        mine, theirs = json.loads(json.dumps(self.to_json())), json.loads(json.dumps(wanted.to_json()))
        names = (*IDENTITY_FIELDS, "fields") if "fields" in mine and "fields" in theirs else IDENTITY_FIELDS
        for name in names:
            if mine.get(name) != theirs.get(name):
                raise ManifestError(f"the store was written with a different {name}: "
                                    f"{_diff(mine.get(name), theirs.get(name))}; use --overwrite to start over "
                                    f"or another --out")

    def check_student(self, *, num_classes: int | None = None, explainer: str | None = None,
                      explainer_family: str | None = None, input_size: int | None = None,
                      temperature: float | None = None, expl_field: str | None = None,
                      what: str = "cache") -> None:
        """Can a student with these values train or be evaluated on this cache? ``CompatibilityError`` if not.

        ``explainer_family`` is the family of the student's ``explainer`` (the caller resolves names); an
        ``input_size`` other than the cache's is refused only for a K-view cache (view replay needs it); a KD
        ``temperature`` is refused where the logits codec says KD at it would be biased (sampled logits).
        """
        if num_classes is not None and num_classes != self.num_classes:
            raise CompatibilityError(f"num_classes: the student has {num_classes} classes, the {what}'s teacher "
                                     f"{self.num_classes}")
        try:
            family = self.field_family(expl_field)
        except ValueError as exc:
            raise CompatibilityError(f"--expl-field: {exc}") from None
        if explainer_family is not None and explainer_family != family:
            raise CompatibilityError(f"explainer: the {what} holds {family} maps, which cannot "
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


#: Codecs a schema-1 ``encoding`` can name (``topk``, ``sampled``, ``map_dtype``).
LEGACY_CODECS = ("logits-float16", "logits-topk", "logits-sampled", "map-float16", "map-uint8-affine")


def derived_fields(encoding: Encoding, explainer: dict[str, Any]) -> tuple[Field, ...]:
    """The fields of a schema-1 cache: its logits, and one explanation named after its explainer."""
    name = str(explainer.get("name", ""))
    return (Field("logits", "logits", encoding.logits_codec, {"name": "teacher"}),
            Field(name if FIELD_NAME.match(name) else "maps", "explanation", encoding.map_codec, dict(explainer)))


def _parse_fields(m: dict[str, Any]) -> tuple[Field, ...]:
    """A schema-2 manifest's ``fields``: one logits field, then explanation fields (the first is ``explainer``);
    their codecs must be the ones ``encoding`` names for the first two (readers of either see the same cache)."""
    raw = m.get("fields")
    _require(isinstance(raw, list) and 2 <= len(raw) <= 64, "manifest fields is not a list of 2 to 64 fields")
    fields, seen = [], 0
    for d in raw or ():
        kind = d.get("kind") if isinstance(d, dict) else None
        prefix = explanation_prefix(seen, str(d.get("name"))) if kind == "explanation" else ""
        seen += kind == "explanation"
        try:
            fields.append(Field.from_json(d, prefix))
        except ValueError as exc:
            raise ManifestError(f"manifest fields: {exc}") from None
    kinds = [f.kind for f in fields]
    names = [f.name for f in fields]
    _require(kinds[0] == "logits" and kinds.count("logits") == 1, "manifest fields: the first and only logits "
                                                                  "field must come first")
    _require(len(set(names)) == len(names), f"manifest fields: duplicate field names {names}")
    legacy = Encoding.from_dict(m["encoding"])  # where encoding can name a codec (built-ins), it must agree
    for f, named in ((fields[0], legacy.logits_codec), (fields[1], legacy.map_codec)):
        _require(f.codec.name not in LEGACY_CODECS or f.codec == named,
                 f"manifest fields: field {f.name!r} has codec {f.codec.name!r}, encoding names {named.name!r}")
    _require(fields[1].producer.get("name") == m["explainer"].get("name"),
             "manifest fields: the first explanation field is not the manifest's explainer")
    return tuple(fields)


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
