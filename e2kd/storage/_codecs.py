"""Codecs: how one teacher output (logits, an explanation map) becomes a shard's columns and back — registered values.

A codec is a small frozen value built from its recorded parameters (``{"name": "logits-topk", "k": 10}``), as
zarr's codecs are: :func:`get_codec` builds one from such a dict, :func:`register_codec` adds a class under its
``name``, :func:`list_codecs` names them. Each codec knows its columns (name → dtype and per-view shape), encodes
float32 values ``[N, V, *shape]`` into them, decodes them back (``[..., V, *shape]`` float32 tensors), and checks
decoded columns for values no writer produces. Nothing outside a codec names its columns.

Built-ins: ``logits-float16`` (full logits), ``logits-topk`` (top-k logits + indices + the log-sum-exp of all),
``logits-sampled`` (class ids drawn from the teacher's distribution: an unbiased KD gradient), ``map-float16`` and
``map-uint8-affine`` (a per-map scale and offset, so signed maps survive).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from e2kd._topk import encode_topk, logits_from_topk

if TYPE_CHECKING:
    import torch

__all__ = ["Codec", "ColumnSpecs", "register_codec", "get_codec", "list_codecs", "codec_class", "Float16Logits",
           "TopkLogits", "SampledLogits", "Float16Maps", "AffineUint8Maps", "KINDS"]

#: ``column → (dtype, shape of one row)``; a ``None`` shape: any ``(V, *value shape)`` (maps before the first shard).
ColumnSpecs = dict[str, tuple[str, "tuple | None"]]
#: What a codec can encode: class logits ``[V, C]`` or explanation maps ``[V, C_e, h, w]``.
KINDS = ("logits", "explanation")


@runtime_checkable
class Codec(Protocol):
    """One teacher output's encoding; a frozen value whose fields are its recorded parameters."""

    name: ClassVar[str]  #: registry name, recorded with the parameters
    kind: ClassVar[str]  #: one of :data:`KINDS`

    def to_dict(self) -> dict[str, Any]:
        """``{"name": …, **parameters}`` (what the manifest records; :func:`get_codec` rebuilds the codec)."""
        ...

    def columns(self, num_views: int, shape: tuple[int, ...] | None) -> ColumnSpecs:
        """The shard columns and their row specs for ``num_views`` views of values of ``shape`` (None: unknown)."""
        ...

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """float32 ``[N, V, *shape]`` → columns (one row per sample)."""
        ...

    def decode(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        """Columns (any leading dims) → float32 values ``[..., V, *shape]``."""
        ...

    def check(self, cols: dict[str, np.ndarray], num_classes: int) -> str | None:
        """What is wrong with decoded columns (beyond dtype and shape, checked before decoding), or None."""
        ...


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class under its ``name`` (usable as a decorator); a name is registered once.

    Raises:
        ValueError: the name is taken by another class, or the class lacks ``name``/``kind``.
    """
    name, kind = getattr(cls, "name", None), getattr(cls, "kind", None)
    if not isinstance(name, str) or not name or kind not in KINDS:
        raise ValueError(f"a codec class needs a string `name` and a `kind` in {KINDS}: {cls!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"codec name {name!r} is already registered by {_REGISTRY[name]!r}")
    _REGISTRY[name] = cls
    return cls


def list_codecs(kind: str | None = None) -> list[str]:
    """Registered codec names (of one ``kind``, if given)."""
    return sorted(n for n, c in _REGISTRY.items() if kind is None or c.kind == kind)


def codec_class(name: str) -> type[Codec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (registered: {', '.join(list_codecs())})") from None


def get_codec(spec: dict[str, Any]) -> Codec:
    """Build a codec from its recorded ``{"name": …, **parameters}``.

    Raises:
        ValueError: unknown name, unknown or badly typed parameters (named).
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a codec is an object with a string name, got {spec!r}")
    cls = codec_class(spec["name"])
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"codec {spec['name']!r}: {exc}") from None


def _finite(cols: dict[str, np.ndarray]) -> str | None:
    for name, col in cols.items():
        if col.dtype.kind == "f" and not np.isfinite(col).all():
            return f"non-finite values in column {name!r}"
    return None


def _is_int(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


class _Base:
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload, attr-defined]


# ---- logits ----------------------------------------------------------------------------------------------------
class _Float16Column(_Base):
    """Values stored as float16 in one column named ``column`` (``[N, V, *shape]``), decoded as float32."""

    column: ClassVar[str] = ""

    def columns(self, num_views: int, shape: tuple[int, ...] | None) -> ColumnSpecs:
        return {self.column: ("float16", (num_views, *shape) if shape is not None else None)}

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {self.column: values.astype(np.float16)}

    def decode(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.asarray(cols[self.column], dtype=np.float32))

    def check(self, cols: dict[str, np.ndarray], num_classes: int) -> str | None:
        return _finite(cols)


@register_codec
@dataclass(frozen=True)
class Float16Logits(_Float16Column):
    """Every logit, float16: ``logits [N, V, C]``."""

    name: ClassVar[str] = "logits-float16"
    kind: ClassVar[str] = "logits"
    column: ClassVar[str] = "logits"

    def top1_consistent(self, cols: dict[str, np.ndarray], target: np.ndarray) -> np.ndarray:
        """Per view: the cached logit of ``target`` is the largest (float16 rounding keeps the order, ties allowed)."""
        logits = cols["logits"]
        return np.take_along_axis(logits, target[..., None], -1)[..., 0] >= logits.max(-1)


@register_codec
@dataclass(frozen=True)
class TopkLogits(_Base):
    """The ``k`` largest logits (float16) and their classes, plus the log-sum-exp of all logits; decoded as full
    log-probabilities with the remaining mass spread evenly (FKD's marginal smoothing, :mod:`e2kd._topk`)."""

    name: ClassVar[str] = "logits-topk"
    kind: ClassVar[str] = "logits"
    k: int = 1
    num_classes: int = 1

    def __post_init__(self) -> None:
        if not (_is_int(self.k, 1) and _is_int(self.num_classes, 1) and self.k <= self.num_classes):
            raise ValueError(f"topk must be in [1, num_classes={self.num_classes}], got {self.k}")

    def columns(self, num_views: int, shape: tuple[int, ...] | None) -> ColumnSpecs:
        v, k = num_views, self.k
        return {"topk_values": ("float16", (v, k)), "topk_indices": ("int32", (v, k)), "logsumexp": ("float32", (v,))}

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        top, indices, lse = encode_topk(values, self.k)
        return {"topk_values": top.astype(np.float16), "topk_indices": indices.astype(np.int32), "logsumexp": lse}

    def decode(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        import torch

        return logits_from_topk(torch.from_numpy(np.asarray(cols["topk_values"], dtype=np.float32)),
                                torch.from_numpy(np.asarray(cols["topk_indices"], dtype=np.int64)),
                                torch.from_numpy(np.asarray(cols["logsumexp"], dtype=np.float32)), self.num_classes)

    def check(self, cols: dict[str, np.ndarray], num_classes: int) -> str | None:
        indices = cols["topk_indices"]
        if indices.size and not (0 <= indices.min() and indices.max() < num_classes):
            return f"column 'topk_indices' holds classes outside [0, {num_classes})"
        return _finite(cols)

    def top1_consistent(self, cols: dict[str, np.ndarray], target: np.ndarray) -> np.ndarray:
        """Per view: where ``target`` is among the cached classes, its logit is the largest cached one."""
        values, indices = cols["topk_values"], cols["topk_indices"]
        at = indices == target[..., None]
        return ~at.any(-1) | (np.where(at, values, -np.inf).max(-1) >= values.max(-1))


@register_codec
@dataclass(frozen=True)
class SampledLogits(_Base):
    """``samples`` class ids drawn per view from the teacher's distribution at ``temperature`` (with replacement,
    stored sorted), the teacher's logit at each draw (float16) and the log-sum-exp of all logits at that
    temperature (Anshumann et al., ACL 2025, "Sparse Logit Sampling").

    Decoded as ``temperature · log q`` where ``q`` is the draws' empirical distribution (classes never drawn get a
    log-probability of −10⁴, i.e. zero mass): the KD term at the same temperature then has the gradient of the
    full-logit KD term in expectation — unbiased, unlike top-k. At another temperature it would be biased, so a
    student must train at the recorded ``temperature`` (checked before training). Draws are seeded by ``seed``
    and each row's values: the same teacher outputs give the same cache (resume, any actor count).
    """

    name: ClassVar[str] = "logits-sampled"
    kind: ClassVar[str] = "logits"
    samples: int = 1
    num_classes: int = 1
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (_is_int(self.samples, 1) and self.samples <= 65535 and _is_int(self.num_classes, 1)):
            raise ValueError(f"sampled logits need 1 <= samples <= 65535 draws, got {self.samples}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not 0 < float(self.temperature) < float("inf"):
            raise ValueError(f"the sampling temperature must be a positive number, got {self.temperature!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"the sampling seed must be an integer, got {self.seed!r}")

    def columns(self, num_views: int, shape: tuple[int, ...] | None) -> ColumnSpecs:
        v, s = num_views, self.samples
        return {"sampled_ids": ("int32", (v, s)), "sampled_logits": ("float16", (v, s)),
                "sampled_logsumexp": ("float32", (v,))}

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        import zlib

        values = np.asarray(values, dtype=np.float32)
        scaled = values.astype(np.float64) / float(self.temperature)
        top = scaled.max(-1, keepdims=True)
        lse = top[..., 0] + np.log(np.exp(scaled - top).sum(-1))
        cdf = np.cumsum(np.exp(scaled - lse[..., None]), -1)
        ids = np.empty((*values.shape[:-1], self.samples), np.int32)
        for n in range(values.shape[0]):  # a generator per row: the draws do not depend on batching
            rng = np.random.default_rng([self.seed, zlib.crc32(values[n].tobytes())])
            u = rng.random((values.shape[1], self.samples)) * cdf[n, :, -1:]
            for v in range(values.shape[1]):
                ids[n, v] = np.minimum(np.searchsorted(cdf[n, v], np.sort(u[v]), side="right"), values.shape[-1] - 1)
        return {"sampled_ids": ids, "sampled_logits": np.take_along_axis(values, ids, -1).astype(np.float16),
                "sampled_logsumexp": lse.astype(np.float32)}

    def decode(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        import torch

        ids = torch.from_numpy(np.asarray(cols["sampled_ids"], dtype=np.int64))
        counts = torch.zeros(*ids.shape[:-1], self.num_classes, dtype=torch.float32)
        counts.scatter_add_(-1, ids, torch.ones(ids.shape, dtype=torch.float32))
        log_q = torch.log(counts / self.samples).clamp_min(_NEVER_DRAWN)
        return log_q * float(self.temperature)

    def check(self, cols: dict[str, np.ndarray], num_classes: int) -> str | None:
        ids = cols["sampled_ids"]
        if ids.size and not (0 <= ids.min() and ids.max() < num_classes):
            return f"column 'sampled_ids' holds classes outside [0, {num_classes})"
        return _finite(cols)

    def check_temperature(self, temperature: float) -> str | None:
        """Why KD at ``temperature`` would be biased from this cache, or None."""
        if abs(float(temperature) - float(self.temperature)) > 1e-9:
            return (f"the cache's logits were sampled at temperature {self.temperature:g}: train with --temperature "
                    f"{self.temperature:g} (at another temperature the sampled KD term is biased)")
        return None


#: The log-probability of a class never drawn (zero mass without −inf, so KL stays finite: 0 · log 0 = 0).
_NEVER_DRAWN = -1e4


# ---- explanation maps ------------------------------------------------------------------------------------------
@register_codec
@dataclass(frozen=True)
class Float16Maps(_Float16Column):
    """Maps as float16: ``maps [N, V, C_e, h, w]``."""

    name: ClassVar[str] = "map-float16"
    kind: ClassVar[str] = "explanation"
    column: ClassVar[str] = "maps"


@register_codec
@dataclass(frozen=True)
class AffineUint8Maps(_Base):
    """Maps quantised to uint8 with a per-map float32 ``map_scale`` and ``map_offset`` (signed maps survive)."""

    name: ClassVar[str] = "map-uint8-affine"
    kind: ClassVar[str] = "explanation"

    def columns(self, num_views: int, shape: tuple[int, ...] | None) -> ColumnSpecs:
        return {"maps": ("uint8", (num_views, *shape) if shape is not None else None),
                "map_scale": ("float32", (num_views,)), "map_offset": ("float32", (num_views,))}

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        flat = values.reshape(*values.shape[:2], -1)
        lo, hi = flat.min(-1), flat.max(-1)
        scale = ((hi - lo) / 255.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)
        q = np.rint((flat - lo[..., None]) / safe[..., None])
        return {"maps": np.clip(q, 0, 255).astype(np.uint8).reshape(values.shape), "map_scale": scale,
                "map_offset": lo.astype(np.float32)}

    def decode(self, cols: dict[str, np.ndarray]) -> torch.Tensor:
        import torch

        maps = np.asarray(cols["maps"], dtype=np.float32)
        scale = np.asarray(cols["map_scale"], dtype=np.float32)[..., None, None, None]
        offset = np.asarray(cols["map_offset"], dtype=np.float32)[..., None, None, None]
        return torch.from_numpy(maps * scale + offset)

    def check(self, cols: dict[str, np.ndarray], num_classes: int) -> str | None:
        return _finite(cols)
