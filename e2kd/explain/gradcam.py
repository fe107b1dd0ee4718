"""GradCAM for any timm CNN (last feature map) and timm ViT (tokens entering the last block's attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd.explain.registry import Explainer, SharedPass, is_bcos, register_explainer

__all__ = ["GradCAM", "gradcam_from"]


def gradcam_from(activations: Tensor, grads: Tensor) -> Tensor:
    """``relu(Σ_c mean_hw(∂y/∂A_c) · A_c)`` for ``[B, C, h, w]`` activations and gradients → ``[B, 1, h, w]``."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activations).sum(dim=1, keepdim=True))


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
    def supports(cls, model: nn.Module | str) -> str | None:
        if is_bcos(model):
            return "a B-cos model explains itself: use bcos (or input_x_gradient) for bcos:<name> teachers"
        if not isinstance(model, str) and not (hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")) \
                and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            return "gradcam needs a timm model with forward_features/forward_head (or a ViT)"
        return None

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._is_vit = hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")
        if not self._is_vit and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ValueError(f"gradcam needs a timm model with forward_features/forward_head, got "
                             f"{type(model).__name__}")

    def shared_needs(self) -> frozenset[str] | None:
        """A CNN's last feature map and its gradient can come from a pass shared with other explainers."""
        return None if self._is_vit else frozenset({"features"})

    def maps_from(self, shared: SharedPass) -> Tensor:
        return gradcam_from(shared.features, shared.grads["features"])

    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        if self._is_vit:
            return self._explain_vit(inputs, targets, create_graph)
        feats = self.model.forward_features(inputs)
        if feats.ndim != 4:
            raise ValueError(f"gradcam expects a [B, C, h, w] feature map from forward_features, "
                             f"got shape {tuple(feats.shape)}")
        if not feats.requires_grad:  # frozen teacher: the map needs gradients w.r.t. the features only
            feats = feats.detach().requires_grad_(True)
        logits = self.model.forward_head(feats)
        (grads,) = torch.autograd.grad(self.target_scores(logits, targets), feats, create_graph=create_graph)
        return logits, gradcam_from(feats, grads)

    def _explain_vit(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        handle = self.model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
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
