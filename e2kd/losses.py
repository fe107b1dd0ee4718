"""The e²KD loss: τ²·KL(p_T‖p_S) + λ·(1 − cos(E_T, E_S)) (+ optional cross-entropy).

Explanations are for the **teacher's top-1 class**; the caller computes both maps for that class.

Map resolution: when teacher and student maps differ in spatial size, the coarser one is upsampled
bilinearly (``align_corners=False``) to the element-wise larger size ``(max(h), max(w))`` before the
cosine; channel counts must match. Upsampling never discards information from either map.

Top-k caches: :func:`logits_from_topk` rebuilds a full logit vector from the top-k logits and the
log-sum-exp of all logits. The result is a vector of log-probabilities: exact for the k known classes,
with the remaining probability mass spread evenly over the other ``C − k`` classes (FKD's marginal
smoothing). With ``k = C`` it equals the full logits up to a per-sample constant, so every softmax-based
loss is unchanged. With temperature ``τ ≠ 1``, the ratios among the k known classes stay exact (they
are ``exp((z_i − z_j)/τ)``), but the tail is tempered as if it were uniform: for ``τ > 1`` this
over-states the tempered tail mass (a uniform split maximises ``Σ p_j^{1/τ}``), for ``τ < 1`` it
under-states it. Keep ``k`` large enough that the tail mass is small when training with ``τ > 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["E2KDLoss", "kd_loss", "explanation_loss", "explanation_similarity", "match_map_sizes",
           "logits_from_topk", "topk_logits"]


def _upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32; float32/float64 keep their precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """τ²·KL(p_T ‖ p_S), summed over classes and averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    log_p_t = F.log_softmax(_upcast(teacher_logits) / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * t * t


def match_map_sizes(student_maps: Tensor, teacher_maps: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two map batches ``[B, C, h, w]`` to one spatial size (the larger of each dimension)."""
    if student_maps.shape[1] != teacher_maps.shape[1]:
        raise ValueError(f"explanation channels differ: student {student_maps.shape[1]}, "
                         f"teacher {teacher_maps.shape[1]}")
    size = (max(student_maps.shape[-2], teacher_maps.shape[-2]),
            max(student_maps.shape[-1], teacher_maps.shape[-1]))
    return _resize(student_maps, size), _resize(teacher_maps, size)


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def explanation_similarity(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Per-sample cosine similarity between flattened maps (after :func:`match_map_sizes`), shape ``[B]``."""
    s, t = match_map_sizes(_upcast(student_maps), _upcast(teacher_maps))
    return F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=1e-12)


def explanation_loss(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Batch mean of ``1 − cos(E_S, E_T)`` over each sample's whole flattened map."""
    return (1.0 - explanation_similarity(student_maps, teacher_maps)).mean()


def topk_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Compress logits ``[..., C]`` to (top-k values, top-k indices, log-sum-exp of all logits)."""
    values, indices = logits.float().topk(k, dim=-1)
    return values, indices, torch.logsumexp(logits.float(), dim=-1)


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


class E2KDLoss(nn.Module):
    """KD + λ·explanation loss (+ ce_weight·CE on labels, ignoring label −1).

    Args:
        temperature: KD temperature τ (the KD term is multiplied by τ²).
        lam: weight λ of the explanation term; 0 gives plain KD.
        ce_weight: weight of cross-entropy on ground-truth labels; samples labelled −1 are ignored.

    Example:
        >>> loss_fn = E2KDLoss(temperature=4.0, lam=1.0)
        >>> s, t = torch.randn(2, 10), torch.randn(2, 10)
        >>> total, parts = loss_fn(s, t, torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))
        >>> sorted(parts)
        ['ce', 'expl', 'kd']
    """

    def __init__(self, temperature: float = 1.0, lam: float = 1.0, ce_weight: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if lam < 0 or ce_weight < 0:
            raise ValueError(f"lam and ce_weight must be >= 0, got lam={lam}, ce_weight={ce_weight}")
        self.temperature, self.lam, self.ce_weight = float(temperature), float(lam), float(ce_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor | None = None,
                teacher_maps: Tensor | None = None, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        zero = kd.new_zeros(())
        expl = zero
        if self.lam > 0:
            if student_maps is None or teacher_maps is None:
                raise ValueError("lam > 0 needs student_maps and teacher_maps")
            expl = explanation_loss(student_maps, teacher_maps)
        ce = zero
        if self.ce_weight > 0 and labels is not None and bool((labels >= 0).any()):
            ce = F.cross_entropy(_upcast(student_logits), labels.long(), ignore_index=-1)
        total = kd + self.lam * expl + self.ce_weight * ce
        return total, {"kd": kd.detach(), "expl": expl.detach(), "ce": ce.detach()}
