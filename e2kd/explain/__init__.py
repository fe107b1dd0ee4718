"""Explanation methods by name: ``build_explainer("gradcam" | "bcos" | "input_x_gradient", model)``."""

from e2kd.explain import _gradcam as _gradcam  # noqa: F401  (registers)
from e2kd.explain import _gradient as _gradient  # noqa: F401  (registers)
from e2kd.explain._registry import (
    Explainer,
    build_explainer,
    explainer_family,
    list_explainers,
    register_explainer,
)

__all__ = ["Explainer", "build_explainer", "list_explainers", "register_explainer", "explainer_family"]
