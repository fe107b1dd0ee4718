"""Top-k logit caches: encode (the writer's numpy path) and rebuild full log-probabilities (the reader's).

A top-k cache keeps, per view, the k largest logits, their class indices and the log-sum-exp of **all**
logits. :func:`logits_from_topk` turns that back into a full vector of log-probabilities: exact for the k
known classes, the remaining mass spread evenly over the other ``C − k`` (FKD's marginal smoothing).
Both live here, outside storage and losses, so the store and the losses share one implementation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["encode_topk", "topk_logits", "logits_from_topk"]


def encode_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``logits [..., C]`` → (top-k values float32 ``[..., k]``, indices int64 ``[..., k]``, log-sum-exp ``[...]``).

    Ties are broken by the lower class index (stable sort), so a cache is byte-identical across runs.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= {logits.shape[-1]} classes, got k={k}")
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(logits, order, -1)
    top = logits.max(-1, keepdims=True)
    lse = (top[..., 0] + np.log(np.exp(logits - top).sum(-1))).astype(np.float32)
    return values, order.astype(np.int64), lse


def topk_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`encode_topk` for a tensor (values, indices, log-sum-exp as tensors on the input's device)."""
    import torch

    values, indices, lse = encode_topk(logits.detach().float().cpu().numpy(), k)
    return tuple(torch.from_numpy(a).to(logits.device) for a in (values, indices, lse))  # type: ignore[return-value]


def logits_from_topk(values: Tensor, indices: Tensor, logsumexp: Tensor, num_classes: int) -> Tensor:
    """Rebuild full log-probabilities ``[..., C]`` from a top-k cache (FKD marginal smoothing).

    Args:
        values: top-k logits ``[..., k]``.
        indices: their class indices ``[..., k]`` (int).
        logsumexp: log-sum-exp of **all** logits ``[...]``.
        num_classes: ``C``.

    Returns:
        Log-probabilities: ``z_i − lse`` for the k known classes, ``log((1 − Σ p_known) / (C − k))`` for the rest.
    """
    import torch

    values = values.float()
    log_p_known = values - logsumexp.float().unsqueeze(-1)
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"top-k cache has k={k} > num_classes={num_classes}")
    if k == num_classes:
        fill = torch.zeros_like(logsumexp, dtype=torch.float32)  # no other classes to fill
    else:
        known_mass = log_p_known.exp().sum(-1)
        rest = (1.0 - known_mass).clamp_min(1e-12)  # float16 caches can round the known mass above 1
        fill = torch.log(rest) - math.log(num_classes - k)
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return out.scatter(-1, indices.long(), log_p_known)
