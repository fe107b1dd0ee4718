"""The one place that decides whether a cache fits a student: :func:`open_student_cache`.

train-student, evaluate and show open their caches through it, so a cache is accepted or refused the same way
everywhere: its id (``--expect-cache-id``), class count, explainer family, view replay (input size), rendering and
the KD temperature its logits codec allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2kd.explain import explainer_family
from e2kd.pipeline._loader import cache_resample_dtype
from e2kd.storage import CacheStore, CompatibilityError, ManifestError, open_store

__all__ = ["StudentCache", "open_student_cache", "open_student_caches", "parse_cache_weights"]


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


def open_student_caches(uris: list[str], *, expect_ids: list[str] | None = None, num_classes: int | None = None,
                        explainer: str | None = None, input_size: int | None = None,
                        temperature: float | None = None, expl_field: str | None = None) -> list[StudentCache]:
    """Open several caches of the same inputs for one student (one per teacher) and check that they join:
    each fits the student (:func:`open_student_cache`), and together they agree on input size, class count and
    class names, and — where views are replayed — on the views (policy, count, seed, scale, flip).

    Raises:
        CompatibilityError: one line naming the field that differs and the caches.
    """
    if expect_ids is not None and len(expect_ids) not in (0, len(uris)):
        raise CompatibilityError(f"--expect-cache-id is given {len(expect_ids)} time(s) for {len(uris)} caches: "
                                 f"give it once per --cache, in the same order")
    expected: list[str | None] = list(expect_ids) if expect_ids else [None] * len(uris)
    opened = [open_student_cache(uri, expect_id=expected[i], num_classes=num_classes,
                                 explainer=explainer, input_size=input_size, temperature=temperature,
                                 expl_field=expl_field, what=f"cache {i + 1}" if len(uris) > 1 else "cache")
              for i, uri in enumerate(uris)]
    first = opened[0].store.manifest
    for other, uri in zip(opened[1:], uris[1:], strict=True):
        m = other.store.manifest
        for name, mine, theirs in (("input size", first.input_size, m.input_size),
                                   ("class count", first.num_classes, m.num_classes),
                                   ("class names", first.class_names, m.class_names or first.class_names),
                                   ("explainer", opened[0].explainer, other.explainer)):
            if mine != theirs:
                raise CompatibilityError(f"caches {uris[0]} and {uri} do not join: {name} {mine} vs {theirs}")
        if first.replays_views or m.replays_views:
            for key in sorted(set(first.views) | set(m.views)):
                if first.views.get(key) != m.views.get(key):
                    raise CompatibilityError(
                        f"caches {uris[0]} and {uri} do not join: views.{key} is {first.views.get(key)!r} vs "
                        f"{m.views.get(key)!r} (K-view caches join only when their views replay identically: the "
                        f"same view policy and --seed)")
    return opened


def parse_cache_weights(text: str | None, count: int) -> list[float]:
    """``--cache-weights 0.7,0.3`` → one weight per cache, normalised to sum 1 (default: equal)."""
    if not text:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--cache-weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != count or any(not w > 0 or w == float("inf") for w in weights):
        raise ValueError(f"--cache-weights needs {count} positive weight(s), one per --cache, got {text!r}")
    total = sum(weights)
    return [w / total for w in weights]
