"""Explainer base class and the registry by name (``build_explainer``, ``list_explainers``)."""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Explainer", "register_explainer", "build_explainer", "list_explainers", "explainer_family",
           "check_supports", "is_bcos", "explain_together", "SharedPass"]

_REGISTRY: dict[str, type[Explainer]] = {}


class Explainer(ABC):
    """Explains a model's logits for given target classes, returning maps and logits of one forward pass.

    Call as ``maps, logits = explainer(inputs, targets=None, create_graph=False)``: ``inputs`` are model-ready
    tensors (after :func:`e2kd.models.input_transform`), ``targets`` are class indices ``[B]`` (``None``
    explains the model's own top-1 class). Returns float32 maps ``[B, C_e, h, w]`` (float64 for a float64
    model) and the logits ``[B, C]`` of the same forward pass. With ``create_graph=True``
    the maps are differentiable w.r.t. the model's parameters (double backward); with ``False`` no graph is kept.
    """

    name: str = ""
    #: maps of explainers of one family can supervise each other (a B-cos map cannot supervise GradCAM).
    family: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._prepared_for_double_backward = False

    def shared_needs(self) -> frozenset[str] | None:
        """What this explainer needs from a forward pass shared with other explainers (:func:`explain_together`):
        gradients of the explained scores w.r.t. ``"input"`` and/or ``"features"`` (timm's ``forward_features``
        output); None where it needs a pass of its own (the default)."""
        return None

    def maps_from(self, shared: SharedPass) -> Tensor:
        """The maps from a shared pass (only called when :meth:`shared_needs` is not None)."""
        raise TypeError(f"{self.name} takes no shared pass")

    @classmethod
    def supports(cls, model: nn.Module | str, default: bool = True) -> str | None:
        """Why this explainer should not explain teacher ``model`` for a cache (a built model, or a model name such
        as ``bcos:resnet18``, asked before anything is built), or None where it can; ``default``: as the cache's
        default (first) explanation field, else as a further one (``--explainers``). cache-teacher asks it; every
        model is supported unless a subclass says otherwise."""
        return None

    def __call__(self, inputs: Tensor, targets: Tensor | None = None,
                 create_graph: bool = False) -> tuple[Tensor, Tensor]:
        if create_graph and not self._prepared_for_double_backward:
            self.prepare_double_backward()
            self._prepared_for_double_backward = True
        with torch.enable_grad():
            logits, maps = self.explain(inputs, targets, create_graph)
        if not create_graph:
            logits, maps = logits.detach(), maps.detach()
        return (maps if maps.dtype == torch.float64 else maps.float()), logits

    def prepare_double_backward(self) -> None:
        """Make the model twice differentiable (called once, before the first ``create_graph=True`` call).

        Fused attention (``F.scaled_dot_product_attention``) has no double backward: timm attention modules of
        this (student) model switch to their non-fused path (``fused_attn = False``), which computes the same.
        """
        for module in self.model.modules():
            if getattr(module, "fused_attn", False):
                setattr(module, "fused_attn", False)  # noqa: B010 - a timm Attention flag nn.Module lacks

    @abstractmethod
    def explain(self, inputs: Tensor, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Return ``(logits, maps)`` from one forward pass."""

    def config(self) -> dict[str, Any]:
        """Name, family and constructor parameters: written into cache manifests, enough to rebuild it
        (``build_explainer(**{k: v for k, v in config.items() if k != "family"}, model=...)``)."""
        return {"name": self.name, "family": self.family, **self.params}

    @property
    def params(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON values); none for the built-in explainers."""
        return {}

    @staticmethod
    def target_scores(logits: Tensor, targets: Tensor | None) -> Tensor:
        """Sum over the batch of each sample's target logit (its top-1 when ``targets`` is None)."""
        if targets is None:
            targets = logits.detach().argmax(dim=1)
        targets = targets.to(device=logits.device, dtype=torch.long).view(-1, 1)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"got {targets.shape[0]} targets for a batch of {logits.shape[0]}")
        return logits.gather(1, targets).sum()


@dataclass(frozen=True)
class SharedPass:
    """One forward pass shared by several explainers of one model: its inputs, features and logits, and the
    gradients of the explained scores that the explainers asked for, from one backward pass."""

    inputs: Tensor
    features: Tensor
    logits: Tensor
    grads: dict[str, Tensor]


def explain_together(explainers: list[Explainer], inputs: Tensor,
                     targets: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """Maps of several explainers of one model and the logits, from **one** forward and one backward pass where
    every explainer can share them (GradCAM on a CNN, input × gradient on a timm model); otherwise each explainer
    runs its own pass. The maps equal each explainer's own (the same operations on the same values)."""
    model = explainers[0].model
    needs = [e.shared_needs() for e in explainers]
    if len(explainers) == 1 or any(n is None for n in needs) or any(e.model is not model for e in explainers):
        outputs = [e(inputs, targets) for e in explainers]
        return [maps for maps, _ in outputs], outputs[0][1]
    wanted = sorted(frozenset().union(*needs))  # type: ignore[arg-type]
    with torch.enable_grad():
        x = inputs.detach().requires_grad_("input" in wanted)
        net: Any = model  # a timm model (shared passes are asked only of those)
        features = net.forward_features(x)
        if not features.requires_grad:
            features = features.detach().requires_grad_(True)
        logits = net.forward_head(features)
        tensors = {"input": x, "features": features}
        grads = torch.autograd.grad(Explainer.target_scores(logits, targets), [tensors[n] for n in wanted])
    shared = SharedPass(x.detach(), features.detach(), logits.detach(), dict(zip(wanted, grads, strict=True)))
    maps = [e.maps_from(shared).detach() for e in explainers]
    return [m if m.dtype == torch.float64 else m.float() for m in maps], shared.logits


def register_explainer(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: register an :class:`Explainer` subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_explainers(filter: str = "*") -> list[str]:
    """Registered explainer names matching a wildcard ``filter``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, filter))


def _lookup(name: str) -> type[Explainer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown explainer {name!r}; available: {', '.join(list_explainers())}") from None


def explainer_family(name: str) -> str:
    """The family of a registered explainer (maps of one family are comparable)."""
    return _lookup(name).family


def is_bcos(model: nn.Module | str) -> bool:
    """A B-cos model (built from ``bcos`` package modules), or the name of one (``bcos:<name>``)."""
    if isinstance(model, str):
        from e2kd.models import is_bcos_name

        return is_bcos_name(model)
    from e2kd.explain._dynamic import is_bcos_model

    return is_bcos_model(model)


def check_supports(name: str, model: nn.Module | str, default: bool = True) -> None:
    """Raise ``ValueError`` (the explainer's reason) unless explainer ``name`` can explain ``model`` (as the
    default explanation field, or as a further one)."""
    import inspect

    supports = _lookup(name).supports
    takes_default = len(inspect.signature(supports).parameters) >= 2  # a plug-in's supports(model) is enough
    reason = supports(model, default) if takes_default else supports(model)
    if reason:
        what = model if isinstance(model, str) else type(model).__name__
        raise ValueError(f"explainer {name!r} does not fit teacher {what!r}: {reason}")


def build_explainer(name: str, model: nn.Module, **kwargs: Any) -> Explainer:
    """Build a registered explainer for ``model``.

    Example:
        >>> from e2kd.models import create_model
        >>> explainer = build_explainer("gradcam", create_model("resnet18", 10))
        >>> maps, logits = explainer(torch.rand(2, 3, 64, 64))
        >>> maps.shape, logits.shape
        (torch.Size([2, 1, 2, 2]), torch.Size([2, 10]))
    """
    return _lookup(name)(model, **kwargs)

