"""``e2kd evaluate``: load a trained student and evaluate it (see :func:`e2kd.training.evaluate_model`)."""

from __future__ import annotations

from typing import Any

from e2kd.models import create_model
from e2kd.pipeline._student_cache import open_student_cache
from e2kd.training._evaluation import evaluate_model

__all__ = ["evaluate_weights", "evaluate_against_caches"]


def evaluate_weights(data: str, student: str, weights: str, student_kwargs: dict[str, Any] | None = None,
                     cache: str | None = None, num_classes: int | None = None, explainer: str | None = None,
                     input_size: int | None = None, batch_size: int = 64, workers: int = 0,
                     expl_resolution: str = "input", progress: bool = False,
                     expect_cache_id: str | None = None, expl_field: str | None = None) -> dict[str, float]:
    """Load ``student.safetensors`` and evaluate it (class count, explainer, size default to the cache's).

    Raises:
        CompatibilityError: the cache does not fit the student (the same checks as train-student), or is not
            the one ``expect_cache_id`` names.
    """
    if cache:
        opened = open_student_cache(cache, expect_id=expect_cache_id, num_classes=num_classes, explainer=explainer,
                                    input_size=input_size, expl_field=expl_field)
        explainer, num_classes, input_size = opened.explainer, opened.num_classes, opened.input_size
    if num_classes is None or input_size is None:
        raise ValueError("without --cache or --run, give --num-classes and --input-size")
    model = create_model(student, num_classes, checkpoint=weights, **(student_kwargs or {}))
    return evaluate_model(model, data, cache, explainer, input_size, batch_size, workers, expl_resolution, progress,
                          expl_field=expl_field)


def evaluate_against_caches(data: str, student: str, weights: str, student_kwargs: dict[str, Any] | None,
                            caches: list[str], expect_ids: list[str] | None = None,
                            **kwargs: Any) -> dict[str, float]:
    """:func:`evaluate_weights` against several teachers' caches (as train-student's several ``--cache``): the
    first cache's metrics under their names, each further teacher's agreement and ``expl_sim`` suffixed with its
    position (``agreement_2``, …).

    Raises:
        CompatibilityError: a cache does not fit the student, or the caches do not join.
    """
    from e2kd.pipeline._student_cache import open_student_caches

    open_student_caches(caches, expect_ids=expect_ids, num_classes=kwargs.get("num_classes"),
                        explainer=kwargs.get("explainer"), input_size=kwargs.get("input_size"),
                        expl_field=kwargs.get("expl_field"))
    metrics = evaluate_weights(data, student, weights, student_kwargs, caches[0], **kwargs)
    for i, cache in enumerate(caches[1:], start=2):
        more = evaluate_weights(data, student, weights, student_kwargs, cache, **kwargs)
        metrics.update({f"{k}_{i}": v for k, v in more.items() if k in ("agreement", "expl_sim")})
    return metrics
