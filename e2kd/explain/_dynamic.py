"""B-cos dynamic weights that are fixed only at backward time (the e²KD paper's student semantics).

The ``bcos`` package computes explanations by *detaching* every dynamic quantity in the forward pass
(``explanation_mode()``): the B-cos layers' dynamic scale ``|cos|^(b−1)``, the norms' ``1/σ``, the ViT
attention's ``q``/``k``. That is right for the explanation ``W(x) = ∂y/∂x`` but wrong for a student that
trains on the same forward: the KD term and the explanation term's second-order path would lose the
gradient through those quantities.

:func:`install_backward_fixing` makes every detach of such a module a :class:`_FixedAtBackward` node
instead: an identity in the forward pass whose backward passes the gradient unless the model's
:class:`DynamicWeights` state is *fixed at the time the backward runs*. So one forward serves both:

>>> state = install_backward_fixing(model)               # doctest: +SKIP
>>> logits = model(x)                                     # doctest: +SKIP
>>> with state.fixed():                                   # W(x): dynamic weights held fixed
...     (w,) = torch.autograd.grad(score, x, create_graph=True)   # doctest: +SKIP
>>> (kd(logits) + lam * expl(w)).backward()               # full gradient, through the dynamic scales too

Works on any model whose B-cos modules derive from ``bcos.modules.common.DetachableModule`` (every
``bcos`` package model, built through :func:`e2kd.models.create_model` or directly). Running statistics
(BatchNorm buffers) are updated exactly as the package does; they never join the graph. With gradients
disabled, or inside the package's own ``explanation_mode()``, modules run unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["DynamicWeights", "install_backward_fixing", "is_bcos_model"]

_STATE_ATTR = "_e2kd_dynamic_weights"


class DynamicWeights:
    """Whether the dynamic weights of one model are held fixed; read by every gate at backward time."""

    def __init__(self) -> None:
        self.is_fixed = False

    @contextlib.contextmanager
    def fixed(self) -> Iterator[None]:
        """Hold the dynamic weights fixed for every backward run inside this block."""
        previous, self.is_fixed = self.is_fixed, True
        try:
            yield
        finally:
            self.is_fixed = previous


class _FixedAtBackward(torch.autograd.Function):
    """Identity; its backward is zero while ``state.is_fixed`` (decided when the backward runs)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, state: DynamicWeights) -> Tensor:
        ctx.state = state
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        return (None if ctx.state.is_fixed else grad), None


class _DetachToGate(TorchFunctionMode):
    """Inside one B-cos module's forward: ``t.detach()`` → gate; in-place writes to its buffers stay off the graph."""

    def __init__(self, state: DynamicWeights, buffers: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.state, self.buffer_ids = state, {id(b) for b in buffers}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (Tensor.detach, torch.detach) and args and args[0].requires_grad:
            return _FixedAtBackward.apply(args[0], self.state)
        if args and isinstance(args[0], Tensor) and id(args[0]) in self.buffer_ids:
            with torch.no_grad():  # running statistics: updated as the package does, never differentiated
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _detachable_type() -> type | None:
    try:
        from bcos.modules.common import DetachableModule
    except ImportError:  # the bcos package is a dependency, but models from elsewhere need no B-cos support
        return None
    return DetachableModule


def is_bcos_model(model: nn.Module) -> bool:
    """True when ``model`` contains ``bcos`` package modules with dynamic weights."""
    detachable = _detachable_type()
    return detachable is not None and any(isinstance(m, detachable) for m in model.modules())


def install_backward_fixing(model: nn.Module) -> DynamicWeights:
    """Route the dynamic weights of every B-cos module of ``model`` through backward-time gates (idempotent).

    Returns the model's :class:`DynamicWeights` state. Raises ``ValueError`` for a model without B-cos modules.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        return state
    detachable = _detachable_type()
    modules = [m for m in model.modules() if detachable is not None and isinstance(m, detachable)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no B-cos modules (bcos.modules.common.DetachableModule)")
    state = DynamicWeights()
    for module in modules:
        module.forward = _gated_forward(module, module.forward, state)
    setattr(model, _STATE_ATTR, state)
    return state


def _gated_forward(module: nn.Module, forward: Any, state: DynamicWeights) -> Any:
    @functools.wraps(forward)
    def gated(*args: Any, **kwargs: Any) -> Any:
        if module.detach or not torch.is_grad_enabled():  # package explanation mode, or inference: unchanged
            return forward(*args, **kwargs)
        setattr(module, "detach", True)  # noqa: B010 - take the package's detaching code path; the mode turns each detach into a gate
        try:
            with _DetachToGate(state, tuple(module.buffers(recurse=False))):
                return forward(*args, **kwargs)
        finally:
            setattr(module, "detach", False)  # noqa: B010 - a bcos layer's plain flag

    return gated
