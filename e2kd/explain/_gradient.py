"""Gradient-based explainers: B-cos dynamic weights and input × gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from e2kd.explain._dynamic import install_backward_fixing
from e2kd.explain._registry import Explainer, SharedPass, is_bcos, register_explainer

__all__ = ["BcosExplainer", "InputXGradient"]


def _input_gradient(model: nn.Module, inputs: Tensor, targets: Tensor | None,
                    create_graph: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass; returns (logits, ∂y_t/∂x, x) with ``x`` the leaf the gradient is taken at."""
    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(Explainer.target_scores(logits, targets), x, create_graph=create_graph)
    return logits, grad, x


@register_explainer
class BcosExplainer(Explainer):
    """B-cos dynamic linear weights ``W(x) = ∂y_t/∂x`` with the dynamic weights held fixed.

    The map has the input's 6 channels ``[r, g, b, 1−r, 1−g, 1−b]`` at full resolution and is not
    multiplied by the input (as in the e²KD paper's code). Without ``create_graph`` (teacher, evaluation)
    the map is taken inside the package's ``explanation_mode()``. With ``create_graph`` (a student) the
    forward runs normally and the weights are fixed only while ``W(x)`` is taken
    (:mod:`e2kd.explain._dynamic`): the logits keep their full gradient, and the explanation loss's
    second-order gradient flows through the dynamic scales, as in the paper's released code.
    Works for any model built from ``bcos`` package modules.
    """

    name = "bcos"
    family = "bcos"

    @classmethod
    def supports(cls, model: nn.Module | str, default: bool = True) -> str | None:
        if not is_bcos(model) or (not isinstance(model, str) and not hasattr(model, "explanation_mode")):
            return "the bcos explainer needs a B-cos model (bcos:<name>) with explanation_mode()"
        return None

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        reason = self.supports(model)
        if reason:
            raise ValueError(f"{reason}; got {type(model).__name__}")

    def prepare_double_backward(self) -> None:
        super().prepare_double_backward()
        install_backward_fixing(self.model)

    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        if not create_graph:
            with getattr(self.model, "explanation_mode")():  # noqa: B009 - a B-cos model's (checked)
                logits, grad, _ = _input_gradient(self.model, inputs, targets, False)
            return logits, grad
        dynamic = install_backward_fixing(self.model)
        x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
        logits = self.model(x)
        with dynamic.fixed():
            (grad,) = torch.autograd.grad(self.target_scores(logits, targets), x, create_graph=True)
        return logits, grad


@register_explainer
class InputXGradient(Explainer):
    """``x · ∂y_t/∂x`` per input channel: a generic explainer for any differentiable model."""

    name = "input_x_gradient"
    family = "input_x_gradient"

    def shared_needs(self) -> frozenset[str] | None:
        """On a timm model (``model(x)`` is ``forward_head(forward_features(x))``) the input gradient can come from
        a pass shared with other explainers."""
        timm_like = hasattr(self.model, "forward_features") and hasattr(self.model, "forward_head")
        return frozenset({"input"}) if timm_like and not is_bcos(self.model) else None

    def maps_from(self, shared: SharedPass) -> Tensor:
        return shared.inputs * shared.grads["input"]

    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        logits, grad, x = _input_gradient(self.model, inputs, targets, create_graph)
        return logits, x * grad
