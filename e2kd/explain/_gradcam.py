"""GradCAM for any timm CNN (last feature map) and timm ViT (tokens entering the last block's attention)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd.explain._registry import Explainer, SharedPass, is_bcos, register_explainer

__all__ = ["GradCAM", "gradcam_from"]


def gradcam_from(activations: Tensor, grads: Tensor) -> Tensor:
    """``relu(Σ_c mean_hw(∂y/∂A_c) · A_c)`` for ``[B, C, h, w]`` activations and gradients → ``[B, 1, h, w]``."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activations).sum(dim=1, keepdim=True))


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


Head = Callable[[Tensor], Tensor]


def _bcos_head(model: object) -> Head | None:
    """A B-cos ResNet's head after ``forward_features`` (``fc`` → ``avgpool`` → ``logit_layer``), as its forward."""
    if isinstance(model, nn.Module) and all(hasattr(model, a) for a in ("forward_features", "fc", "avgpool",
                                                                         "logit_layer")):
        net: Any = model  # the attributes were just checked
        return lambda feats: net.logit_layer(net.avgpool(net.fc(feats)).flatten(1))
    return None


def _head(model: nn.Module) -> Head | None:
    """What turns ``forward_features``' output into logits: timm's ``forward_head``, or a B-cos ResNet's head."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return getattr(model, "forward_head")  # noqa: B009 - a timm method nn.Module does not declare
    return _bcos_head(model)


@register_explainer
class GradCAM(Explainer):
    """GradCAM at native feature resolution (7×7 for a 224 px ResNet); resizing is the loss's job.

    CNNs: the output of timm's ``forward_features`` (the last stage), explained through ``forward_head``.
    ViTs (models with ``blocks`` and ``num_prefix_tokens``): the tokens entering the last block's
    attention (``blocks[-1].norm1`` output, pytorch-grad-cam's convention), prefix tokens dropped,
    reshaped to the patch grid.
    """

    name = "gradcam"
    family = "gradcam"

    @classmethod
    def supports(cls, model: nn.Module | str, default: bool = True) -> str | None:
        if is_bcos(model) and default:
            return ("a B-cos model explains itself: use bcos (or input_x_gradient) for bcos:<name> teachers, and add "
                    "gradcam as a further field with --explainers bcos,gradcam")
        if is_bcos(model) and not (str(model).startswith("bcos:resnet") or _bcos_head(model) is not None):
            return "gradcam explains B-cos ResNets only (their last feature map before fc, pooling and logit layer)"
        if not isinstance(model, str) and _head(model) is None and not _is_vit(model):
            return "gradcam needs a timm model with forward_features/forward_head (or a ViT)"
        return None

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._is_vit = _is_vit(model)
        self._head = _head(model)
        if not self._is_vit and self._head is None:
            raise ValueError(f"gradcam needs a timm model with forward_features/forward_head, got "
                             f"{type(model).__name__}")

    def shared_needs(self) -> frozenset[str] | None:
        """A timm CNN's last feature map and its gradient can come from a pass shared with other explainers."""
        return None if self._is_vit or not hasattr(self.model, "forward_head") else frozenset({"features"})

    def maps_from(self, shared: SharedPass) -> Tensor:
        return gradcam_from(shared.features, shared.grads["features"])

    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        if self._is_vit:
            return self._explain_vit(inputs, targets, create_graph)
        feats = getattr(self.model, "forward_features")(inputs)  # noqa: B009 - checked by supports()
        if feats.ndim != 4:
            raise ValueError(f"gradcam expects a [B, C, h, w] feature map from forward_features, "
                             f"got shape {tuple(feats.shape)}")
        if not feats.requires_grad:  # frozen teacher: the map needs gradients w.r.t. the features only
            feats = feats.detach().requires_grad_(True)
        logits = self._head(feats)  # type: ignore[misc]  # set: not a ViT
        (grads,) = torch.autograd.grad(self.target_scores(logits, targets), feats, create_graph=create_graph)
        return logits, gradcam_from(feats, grads)

    def _explain_vit(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        net: Any = self.model  # a timm ViT (checked in __init__)
        handle = net.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            if not any(p.requires_grad for p in self.model.parameters()):
                inputs = inputs.detach().requires_grad_(True)
            logits = self.model(inputs)
        finally:
            handle.remove()
        tokens = captured[-1]
        (grads,) = torch.autograd.grad(self.target_scores(logits, targets), tokens, create_graph=create_graph)
        return logits, gradcam_from(self._to_grid(tokens), self._to_grid(grads))

    def _to_grid(self, tokens: Tensor) -> Tensor:
        patches = tokens[:, self.model.num_prefix_tokens:]
        n = patches.shape[1]
        h, w = self._grid(n)
        return patches.reshape(patches.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def _grid(self, n: int) -> tuple[int, int]:
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and grid[0] * grid[1] == n:
            return int(grid[0]), int(grid[1])
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"cannot reshape {n} patch tokens to a grid")
        return side, side
