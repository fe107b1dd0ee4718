"""Gradient-based explainers: B-cos dynamic weights and input × gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from e2kd.explain.registry import Explainer, register_explainer

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
    """B-cos dynamic linear weights ``W(x) = ∂y_t/∂x`` inside ``explanation_mode()``.

    The map has the input's 6 channels ``[r, g, b, 1−r, 1−g, 1−b]`` at full resolution and is not
    multiplied by the input (as in the e²KD paper's code).
    """

    name = "bcos"
    family = "bcos"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not hasattr(model, "explanation_mode"):
            raise ValueError(f"the bcos explainer needs a B-cos model (bcos:<name>) with explanation_mode(); "
                             f"got {type(model).__name__}")

    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        with self.model.explanation_mode():
            logits, grad, _ = _input_gradient(self.model, inputs, targets, create_graph)
        return logits, grad


@register_explainer
class InputXGradient(Explainer):
    """``x · ∂y_t/∂x`` per input channel: a generic explainer for any differentiable model."""

    name = "input_x_gradient"
    family = "input_x_gradient"

    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        logits, grad, x = _input_gradient(self.model, inputs, targets, create_graph)
        return logits, x * grad
