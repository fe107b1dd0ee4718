"""The one place that decides whether a cache fits a student: :func:`open_student_cache`.

train-student, evaluate and show open their caches through it, so a cache is accepted or refused the same way
everywhere: its id (``--expect-cache-id``), class count, explainer family, view replay (input size), rendering and
the KD temperature its logits codec allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2kd.explain import explainer_family
from e2kd.pipeline.loader import cache_resample_dtype
from e2kd.storage import CacheStore, CompatibilityError, ManifestError, open_store

__all__ = ["StudentCache", "open_student_cache"]


@dataclass(frozen=True)
class StudentCache:
    """An opened cache and the values a student takes from it (explainer, class count, input size)."""

    store: CacheStore
    explainer: str
    num_classes: int
    input_size: int
    expl_field: str | None = None  # the explanation field the student matches (None: the cache's only one)


def open_student_cache(uri: str, *, expect_id: str | None = None, num_classes: int | None = None,
                       explainer: str | None = None, input_size: int | None = None,
                       temperature: float | None = None, expl_field: str | None = None,
                       what: str = "cache") -> StudentCache:
    """Open the cache at ``uri`` for a student; values not given default to the cache's, given ones must fit.

    ``expl_field`` names the explanation field to match (needed where the cache holds several); the student's
    explainer defaults to the one that produced it.

    Raises:
        CompatibilityError: one line naming what does not fit (or why the cache cannot be opened).
    """
    try:
        store = open_store(uri)
    except (ManifestError, FileNotFoundError) as exc:
        raise CompatibilityError(f"{what}: {exc}") from None
    if expect_id is not None and store.cache_id != expect_id.strip().lower():
        raise CompatibilityError(f"{what} {uri} has id {store.cache_id}, not the expected {expect_id} "
                                 f"(--expect-cache-id): a different or changed cache")
    m = store.manifest
    fields = m.encoding.explanation_fields
    if expl_field is None and len(fields) > 1:
        raise CompatibilityError(f"{what} {uri} holds {len(fields)} explanation fields "
                                 f"({', '.join(f.name for f in fields)}): choose one with --expl-field")
    try:
        chosen = m.encoding.explanation_field(expl_field)
    except ValueError as exc:
        raise CompatibilityError(f"--expl-field: {exc}") from None
    explainer = explainer or str(chosen.producer.get("name") or m.explainer_name)
    m.check_student(num_classes=num_classes, explainer=explainer, explainer_family=explainer_family(explainer),
                    input_size=input_size, temperature=temperature, expl_field=expl_field, what=what)
    cache_resample_dtype(m)  # its views can be rendered as its teacher saw them
    return StudentCache(store, explainer, m.num_classes, input_size or m.input_size[0], expl_field)
