"""Fields: what a cache holds, as data — each a name, a kind, what produced it and its codec (schema 2).

A cache has one ``logits`` field (the teacher's logits) and one or more ``explanation`` fields, each named after the
explainer that produced it (``gradcam``, ``bcos``, ``input_x_gradient``). A field's columns are its codec's, under a
prefix: none for the logits field and the first explanation field (the column names of schema 1, so every older
reader and tool finds them), ``<field>__`` for every further explanation field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from e2kd.storage._codecs import KINDS, Codec, ColumnSpecs, get_codec

if TYPE_CHECKING:
    import torch

__all__ = ["Field", "check_field_name", "FIELD_NAME"]

#: A field name: lower-case letters, digits and single underscores (it prefixes column names).
FIELD_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def check_field_name(name: Any) -> str:
    """``name`` if it is a valid field name (≤ 64 characters), else ``ValueError`` naming it."""
    if not isinstance(name, str) or len(name) > 64 or not FIELD_NAME.match(name):
        raise ValueError(f"field name {name!r} must be lower-case letters, digits and single underscores "
                         f"(at most 64 characters)")
    return name


@dataclass(frozen=True)
class Field:
    """One thing a cache holds per view: its ``name``, ``kind`` (``logits`` | ``explanation``), ``producer`` (the
    explainer's config, or ``{"name": "teacher"}``), ``codec`` and the ``prefix`` of its columns."""

    name: str
    kind: str
    codec: Codec
    producer: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""

    def __post_init__(self) -> None:
        check_field_name(self.name)
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.codec.kind != self.kind:
            raise ValueError(f"field {self.name!r} of kind {self.kind} cannot use codec {self.codec.name!r} "
                             f"(a {self.codec.kind} codec)")

    # ---- columns -------------------------------------------------------------------------------
    def columns(self, num_views: int, shape: tuple[int, ...] | None) -> ColumnSpecs:
        """This field's columns (prefixed) and their row specs."""
        return {self.prefix + c: spec for c, spec in self.codec.columns(num_views, shape).items()}

    def column_names(self) -> list[str]:
        return list(self.columns(1, None))

    def own(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This field's columns out of a shard's, under the codec's own names."""
        return {c: cols[self.prefix + c] for c in self.codec.columns(1, None)}

    def present(self, cols: dict[str, np.ndarray]) -> bool:
        return all(c in cols for c in self.column_names())

    def value_shape(self, cols: dict[str, np.ndarray]) -> tuple[int, ...]:
        """Per-view shape of the values (the first column's shape after ``[N, V]``)."""
        return tuple(int(v) for v in cols[self.column_names()[0]].shape[2:])

    # ---- values --------------------------------------------------------------------------------
    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {self.prefix + c: v for c, v in self.codec.encode(values).items()}

    def decode(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        return self.codec.decode(self.own(cols))

    def check(self, cols: dict[str, np.ndarray], num_classes: int) -> str | None:
        return self.codec.check(self.own(cols), num_classes)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "producer": self.producer, "codec": self.codec.to_dict()}

    @classmethod
    def from_json(cls, d: Any, prefix: str = "") -> Field:
        """Rebuild a recorded field; ``ValueError`` naming what is wrong."""
        if not isinstance(d, dict) or not isinstance(d.get("producer", {}), dict):
            raise ValueError(f"a field is an object with name, kind, producer and codec, got {d!r}")
        return cls(name=check_field_name(d.get("name")), kind=str(d.get("kind")), codec=get_codec(d.get("codec") or {}),
                   producer=dict(d.get("producer") or {}), prefix=prefix)


def explanation_prefix(index: int, name: str) -> str:
    """The column prefix of the ``index``-th explanation field: none for the first, ``<name>__`` after it."""
    return "" if index == 0 else f"{name}__"
