"""How teacher outputs are encoded in a cache: a frozen, validated value written into the manifest.

Columns of one shard (``N`` samples, ``V`` views):

- ``labels`` int32 ``[N]``, ``views`` float32 ``[N, V, 5]``, ``target`` int32 ``[N, V]`` (teacher top-1);
- logits: ``logits`` float16 ``[N, V, C]``, or with ``topk`` the top-k ``topk_values`` float16 and
  ``topk_indices`` int32 ``[N, V, k]`` plus ``logsumexp`` float32 ``[N, V]`` of all logits;
- maps: ``maps`` float16 ``[N, V, C_e, h, w]``, or uint8 with a per-map ``map_scale`` and ``map_offset``
  (float32 ``[N, V]``), so signed maps survive quantisation.

The logits and maps columns are those of the registered codecs (:mod:`e2kd.storage._codecs`) that ``topk`` and
``map_dtype`` name: :attr:`Encoding.logits_codec`, :attr:`Encoding.map_codec`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from dataclasses import field as dataclass_field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from e2kd.storage._codecs import AffineUint8Maps, Codec, Float16Logits, Float16Maps, SampledLogits, TopkLogits
from e2kd.storage._fields import Field

if TYPE_CHECKING:
    import torch

__all__ = ["Encoding", "MAP_DTYPES", "CNAMES", "parse_logits"]

MAP_DTYPES = ("float16", "uint8")
CNAMES = ("zstd", "lz4", "lz4hc", "zlib", "blosclz")


@dataclass(frozen=True)
class Encoding:
    """Logit and map encoding of a cache, plus its chunking and Blosc compressor settings."""

    num_classes: int
    topk: int | None = None
    map_dtype: str = "float16"
    map_size: tuple[int, int] | None = None
    cname: str = "zstd"
    clevel: int = 5
    chunk_samples: int = 64
    sampled: int | None = None  # draws per view of the ``logits-sampled`` codec (None: full or top-k logits)
    sample_temperature: float | None = None  # the temperature those draws were taken at (default 1)
    #: the manifest's fields (schema 2), or derived from ``topk``/``map_dtype`` (schema 1); never in ``to_dict``
    fields: tuple[Field, ...] = dataclass_field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_classes", "clevel", "chunk_samples") + (("topk",) if self.topk is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.map_size is not None and not all(isinstance(v, int) and not isinstance(v, bool)
                                                 for v in self.map_size):
            raise ValueError(f"map size must be two positive integers, got {self.map_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.topk is not None and not 1 <= self.topk <= self.num_classes:
            raise ValueError(f"topk must be in [1, num_classes={self.num_classes}], got {self.topk}")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"map dtype must be one of {MAP_DTYPES}, got {self.map_dtype!r}")
        if self.map_size is not None and (len(self.map_size) != 2 or min(self.map_size) < 1):
            raise ValueError(f"map size must be two positive integers, got {self.map_size}")
        if self.cname not in CNAMES:
            raise ValueError(f"compressor must be one of {CNAMES}, got {self.cname!r}")
        if not 0 <= self.clevel <= 9:
            raise ValueError(f"Expected an integer in (0, 9) for clevel. Got {self.clevel} instead.")
        if self.chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {self.chunk_samples}")
        if self.sampled is not None and self.topk is not None:
            raise ValueError("a cache stores top-k or sampled logits, not both")
        if self.sample_temperature is not None and self.sampled is None:
            raise ValueError("sample_temperature needs sampled logits")
        self._legacy_logits_codec()  # the codec checks its own parameters (draws, temperature)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["fields"]
        d["map_size"] = list(self.map_size) if self.map_size else None
        for key in ("sampled", "sample_temperature"):  # absent unless used: other caches' manifests are unchanged
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Encoding:
        """Rebuild from :meth:`to_dict`; unknown keys or wrongly typed values raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"encoding must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f for f in cls.__dataclass_fields__ if f != "fields"})
        if unknown:
            raise ValueError(f"unknown encoding key(s) {unknown}")
        d = dict(d)
        if d.get("map_size") is not None and not isinstance(d["map_size"], (list, tuple)):
            raise ValueError(f"map size must be two positive integers, got {d['map_size']!r}")
        d["map_size"] = tuple(d["map_size"]) if d.get("map_size") else None
        if "num_classes" not in d:
            raise ValueError("encoding has no num_classes")
        return cls(**d)

    # ---- its fields (``storage.fields``): the teacher's logits and one or more explanations --------
    def with_fields(self, fields: tuple[Field, ...]) -> Encoding:
        """This encoding with the fields a manifest records (schema 2) or derives (schema 1)."""
        return replace(self, fields=tuple(fields))

    @cached_property
    def logits_field(self) -> Field:
        """The teacher's logits."""
        found = [f for f in self.fields if f.kind == "logits"]
        return found[0] if found else Field("logits", "logits", self._legacy_logits_codec(), {"name": "teacher"})

    @cached_property
    def explanation_fields(self) -> tuple[Field, ...]:
        """The explanation fields, the default (first) one with the unprefixed ``maps`` columns."""
        found = tuple(f for f in self.fields if f.kind == "explanation")
        return found or (Field("maps", "explanation", self._legacy_map_codec()),)

    def explanation_field(self, name: str | None = None) -> Field:
        """The explanation field ``name`` (None: the first).

        Raises:
            ValueError: no such field (naming the ones there are).
        """
        fields = self.explanation_fields
        if name is None:
            return fields[0]
        for f in fields:
            if f.name == name:
                return f
        raise ValueError(f"the cache has no explanation field {name!r} (it has {', '.join(f.name for f in fields)})")

    @property
    def logits_codec(self) -> Codec:
        """The codec of the teacher's logits."""
        return self.logits_field.codec

    @property
    def map_codec(self) -> Codec:
        """The codec of the default explanation field."""
        return self.explanation_fields[0].codec

    def _legacy_logits_codec(self) -> Codec:
        """``logits-topk`` with ``topk``, ``logits-sampled`` with ``sampled``, else ``logits-float16``."""
        if self.sampled is not None:
            return SampledLogits(samples=self.sampled, num_classes=self.num_classes,
                                 temperature=1.0 if self.sample_temperature is None else self.sample_temperature)
        return TopkLogits(k=self.topk, num_classes=self.num_classes) if self.topk is not None else Float16Logits()

    def _legacy_map_codec(self) -> Codec:
        """``map-uint8-affine`` or ``map-float16`` (``map_dtype``)."""
        return AffineUint8Maps() if self.map_dtype == "uint8" else Float16Maps()

    # ---- what a shard must hold (checked before any data is read) -------------------------------
    def column_specs(self, num_views: int, map_shape: tuple[int, ...] | dict[str, tuple[int, ...] | None] | None
                     ) -> dict[str, tuple[str, tuple | None]]:
        """``column → (dtype, shape of one row)`` for a shard of ``num_views`` views; ``map_shape``: the default
        field's map shape, or ``field → shape`` (None: not known from the manifest, any 3-d map)."""
        v = num_views
        shapes = map_shape if isinstance(map_shape, dict) else {self.explanation_fields[0].name: map_shape}
        specs: dict[str, tuple[str, tuple | None]] = {"labels": ("int32", ()), "views": ("float32", (v, 5)),
                                               "target": ("int32", (v,))}
        specs.update(self.logits_field.columns(v, (self.num_classes,)))
        for f in self.explanation_fields:
            specs.update(f.columns(v, shapes.get(f.name)))
        return specs

    def check_values(self, cols: dict[str, np.ndarray]) -> str | None:
        """What is wrong with decoded columns (non-finite floats, out-of-range classes, a target that is not the
        cached logits' top-1), or None."""
        for name, col in cols.items():
            if col.dtype.kind == "f" and not np.isfinite(col).all():
                return f"non-finite values in column {name!r}"
        c = self.num_classes
        if "target" in cols and cols["target"].size and not (0 <= cols["target"].min() and cols["target"].max() < c):
            return f"column 'target' holds classes outside [0, {c})"
        for f in (self.logits_field, *self.explanation_fields):
            if f.present(cols):
                problem = f.check(cols, c)
                if problem:
                    return problem
        if "labels" in cols and cols["labels"].size and not (-1 <= cols["labels"].min() and cols["labels"].max() < c):
            return f"column 'labels' holds labels outside [-1, {c})"
        if "views" in cols and cols["views"].size and not (0 <= cols["views"].min() and cols["views"].max() <= 1):
            return "column 'views' holds boxes outside [0, 1]"
        return self._check_target(cols)

    def _check_target(self, cols: dict[str, np.ndarray]) -> str | None:
        """The cached target is the teacher's top-1 wherever the logits codec can tell (see its
        ``top1_consistent``)."""
        field = self.logits_field
        consistent = getattr(field.codec, "top1_consistent", None)
        if consistent is None or "target" not in cols or not cols["target"].size or not field.present(cols):
            return None
        wrong = ~consistent(field.own(cols), cols["target"].astype(np.int64))
        if wrong.any():
            return f"column 'target' disagrees with the cached logits' top-1 in {int(wrong.sum())} view(s)"
        return None

    # ---- encode (writer side) -------------------------------------------------------------------
    def pool_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Area-pool ``[B, C_e, h, w]`` maps to ``map_size`` (no-op when unset or already that size)."""
        import torch.nn.functional as F

        if self.map_size is None or tuple(maps.shape[-2:]) == tuple(self.map_size):
            return maps
        if maps.shape[-2] < self.map_size[0] or maps.shape[-1] < self.map_size[1]:
            raise ValueError(f"--map-size {self.map_size} is larger than the explainer's map {tuple(maps.shape[-2:])}")
        return F.adaptive_avg_pool2d(maps, self.map_size)

    def encode(self, logits: np.ndarray, maps: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode float32 logits ``[N, V, C]`` and maps ``[N, V, C_e, h, w]`` (the default field's, or
        ``field → maps`` for every explanation field) into columns."""
        by_field = maps if isinstance(maps, dict) else {self.explanation_fields[0].name: maps}
        missing = [f.name for f in self.explanation_fields if f.name not in by_field]
        if missing:
            raise ValueError(f"no maps for explanation field(s) {missing}")
        cols: dict[str, np.ndarray] = {"target": logits.argmax(-1).astype(np.int32)}
        cols.update(self.logits_field.encode(logits))
        for f in self.explanation_fields:
            cols.update(f.encode(by_field[f.name]))
        return cols

    # ---- decode (reader side) -------------------------------------------------------------------
    def decode_logits(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        """Full float32 logits ``[..., V, C]`` (rebuilt from the top-k cache when ``topk`` is set)."""
        return self.logits_field.decode(cols)

    def decode_maps(self, cols: dict[str, np.ndarray], field: str | None = None) -> torch.Tensor:
        """Float32 maps ``[..., V, C_e, h, w]`` of explanation field ``field`` (None: the first)."""
        return self.explanation_field(field).decode(cols)

    def column_names(self) -> list[str]:
        return ["labels", "views", "target", *self.logits_field.column_names(),
                *(c for f in self.explanation_fields for c in f.column_names())]


def parse_logits(spec: str, topk: int | None = None) -> dict[str, Any]:
    """``--logits full | topk:K | sampled:S[@T]`` (``--topk K``: the former spelling of ``topk:K``) → the
    encoding's ``topk`` / ``sampled`` / ``sample_temperature``.

    Raises:
        ValueError: an unknown form, or ``--topk`` disagreeing with ``--logits``.
    """
    kind, _, arg = str(spec).partition(":")
    out: dict[str, Any] = {"topk": None, "sampled": None, "sample_temperature": None}
    try:
        if kind == "full" and not arg:
            pass
        elif kind == "topk":
            out["topk"] = int(arg)
        elif kind == "sampled":
            draws, _, temperature = arg.partition("@")
            out["sampled"] = int(draws)
            out["sample_temperature"] = float(temperature) if temperature else None
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--logits must be full, topk:K or sampled:S[@T] (e.g. topk:10, sampled:12@2), "
                         f"got {spec!r}") from None
    if topk is not None:
        if kind not in ("full", "topk") or (kind == "topk" and out["topk"] != topk):
            raise ValueError(f"--topk {topk} (the former spelling of --logits topk:{topk}) disagrees with --logits "
                             f"{spec}")
        out["topk"] = topk
    return out

