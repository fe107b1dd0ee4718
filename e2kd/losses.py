"""The e²KD objective: τ²·KL(p_T‖p_S) + λ·(1 − cos(E_T, E_S)) (+ optional cross-entropy).

:class:`E2KDObjective` is the student's whole objective (one forward, the student's explanation, the
terms); every stage and benchmark uses it. Conventions, all as in the paper's released code
(m-parchami/GoodTeachersExplain):

- KD: ``KL(softmax(t/τ) ‖ softmax(s/τ))`` summed over classes, batch mean, times τ².
- Explanations are for the **teacher's top-1 class**; the teacher's map is never differentiated.
- Explanation term: batch mean of ``1 − cos`` over each sample's whole flattened map, cosine eps 1e-8.
- Map resolution (``expl_resolution="input"``, the default): both maps are upsampled bilinearly
  (``align_corners=False``) to the student's input size before the cosine. ``"native"``: the coarser map is
  upsampled to the element-wise larger of the two sizes (cheaper; a different loss, kept as an option).
- B-cos students: one forward with full gradients; ``W(x)`` is taken with the dynamic weights held fixed
  (see :mod:`e2kd.explain._dynamic`), so λ > 0 does not change the KD term's gradient.

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd._topk import logits_from_topk, topk_logits

#: where the explanation cosine is taken: at the student's input size (paper) or at the maps' own size.
EXPL_RESOLUTIONS = ("input", "native")
COSINE_EPS = 1e-8

__all__ = ["E2KDObjective", "E2KDLoss", "EXPL_RESOLUTIONS", "kd_loss", "explanation_loss", "explanation_similarity",
           "match_map_sizes", "logits_from_topk", "topk_logits"]


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


def _input_size(inputs: Tensor) -> tuple[int, int]:
    return int(inputs.shape[-2]), int(inputs.shape[-1])


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def explanation_similarity(student_maps: Tensor, teacher_maps: Tensor,
                           size: tuple[int, int] | None = None) -> Tensor:
    """Per-sample cosine similarity between flattened maps, shape ``[B]``.

    ``size``: resize both maps (bilinear) to it first; ``None``: :func:`match_map_sizes`.
    """
    student_maps, teacher_maps = _upcast(student_maps), _upcast(teacher_maps)
    if size is None:
        s, t = match_map_sizes(student_maps, teacher_maps)
    else:
        s, t = match_map_sizes(_resize(student_maps, size), _resize(teacher_maps, size))
    return F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=COSINE_EPS)


def explanation_loss(student_maps: Tensor, teacher_maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Batch mean of ``1 − cos(E_S, E_T)`` over each whole flattened map (see :func:`explanation_similarity`)."""
    return (1.0 - explanation_similarity(student_maps, teacher_maps, size)).mean()


class E2KDLoss(nn.Module):
    """The terms on given logits and maps: KD + λ·explanation (+ ce_weight·CE on labels, ignoring label −1).

    Use :class:`E2KDObjective` to train a student; this class combines terms that are already computed.
    The returned parts share the graph of ``total`` (detach them for logging).

    Args:
        temperature: KD temperature τ (the KD term is multiplied by τ²).
        lam: weight λ of the explanation term; 0 gives plain KD.
        ce_weight: weight of cross-entropy on ground-truth labels; labels outside [0, C) (−1: none) are ignored.

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
                teacher_maps: Tensor | None = None, labels: Tensor | None = None,
                map_size: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        zero = kd.new_zeros(())
        expl = zero
        if self.lam > 0:
            if student_maps is None or teacher_maps is None:
                raise ValueError("lam > 0 needs student_maps and teacher_maps")
            expl = explanation_loss(student_maps, teacher_maps, map_size)
        ce = self.ce(student_logits, labels)
        total = kd + self.lam * expl + self.ce_weight * ce
        return total, {"kd": kd, "expl": expl, "ce": ce}

    def ce(self, student_logits: Tensor, labels: Tensor | None) -> Tensor:
        """Cross-entropy on the labels in ``[0, C)`` (others ignored); zero without ``ce_weight`` or labels."""
        if self.ce_weight > 0 and labels is not None:
            labels = labels.long().masked_fill((labels < 0) | (labels >= student_logits.shape[-1]), -1)
            if bool((labels >= 0).any()):
                return F.cross_entropy(_upcast(student_logits), labels, ignore_index=-1)
        return student_logits.new_zeros(()).float()


class E2KDObjective:
    """The student's e²KD objective: one student forward, its explanation for the teacher's class, the terms.

    Args:
        student: the model being trained: any ``nn.Module`` that the explainer accepts (a timm model, a model
            from :func:`e2kd.models.create_model`, a B-cos model built directly with the ``bcos`` package).
        explainer: a registered explainer name (``gradcam``, ``bcos``, ``input_x_gradient``) or an
            :class:`~e2kd.explain.Explainer` of ``student``.
        temperature, lam, ce_weight: see :class:`E2KDLoss`.
        expl_resolution: ``"input"`` (paper: both maps upsampled to the input size before the cosine) or
            ``"native"``.

    Call as ``total, parts = objective(inputs, teacher_logits, teacher_maps, labels=None)`` with ``inputs``
    the student's model inputs (after :func:`e2kd.models.input_transform`), ``teacher_maps`` of any spatial
    size (native cached maps are fine) and ``targets`` (the explained classes) defaulting to the teacher's
    top-1. ``total`` is differentiable w.r.t. the student's parameters; ``parts`` (``kd``, ``expl``, ``ce``)
    share its graph. After a call, :attr:`last_logits` holds the student's logits, :attr:`last_maps` its native
    explanation maps (detached) and :attr:`last_similarity` the per-sample explanation cosine (both ``None``
    when no map was computed).
    With ``create_graph=False`` (evaluation) no second-order graph is built.

    Example:
        >>> from e2kd.models import create_model
        >>> student = create_model("resnet18", 10, channels=(8, 16, 32, 64), stem_width=8)
        >>> objective = E2KDObjective(student, "gradcam", temperature=4.0, lam=1.0)
        >>> total, parts = objective(torch.rand(2, 3, 64, 64), torch.randn(2, 10), torch.rand(2, 1, 2, 2))
        >>> total.backward()
    """

    def __init__(self, student: nn.Module, explainer: Any = "gradcam", temperature: float = 1.0, lam: float = 1.0,
                 ce_weight: float = 0.0, expl_resolution: str = "input",
                 teacher_weights: list[float] | None = None) -> None:
        from e2kd.explain import build_explainer

        if expl_resolution not in EXPL_RESOLUTIONS:
            raise ValueError(f"expl_resolution must be one of {', '.join(EXPL_RESOLUTIONS)}, got {expl_resolution!r}")
        self.student = student
        self.explainer = build_explainer(explainer, student) if isinstance(explainer, str) else explainer
        self.loss = E2KDLoss(temperature, lam, ce_weight)
        self.expl_resolution = expl_resolution
        self.teacher_weights = teacher_weights  # several teachers: their weights (sum 1), in --cache order
        self.last_logits: Tensor | None = None
        self.last_maps: Tensor | None = None
        self.last_similarity: Tensor | None = None

    @property
    def lam(self) -> float:
        return self.loss.lam

    def __call__(self, inputs: Tensor, teacher_logits: Tensor, teacher_maps: Tensor | list[Tensor] | None = None,
                 labels: Tensor | None = None, targets: Tensor | None = None,
                 create_graph: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        if teacher_logits.ndim == 3:  # several teachers: [B, T, C], maps a list, targets [B, T]
            if teacher_maps is not None and not isinstance(teacher_maps, list):
                raise ValueError("several teachers' logits [B, T, C] take a list of maps, one per teacher")
            return self._several(inputs, teacher_logits.detach(), teacher_maps, labels, targets, create_graph)
        teacher_logits = teacher_logits.detach()
        if targets is None:
            targets = teacher_logits.argmax(dim=-1)
        s_maps = None
        if self.lam > 0 or (not create_graph and teacher_maps is not None):
            if teacher_maps is None:
                raise ValueError("lam > 0 needs teacher_maps")
            s_maps, logits = self.explainer(inputs, targets, create_graph=create_graph)
        else:
            logits = self.student(inputs)
        size = _input_size(inputs) if self.expl_resolution == "input" else None
        if isinstance(teacher_maps, list):
            raise ValueError("one teacher's logits [B, C] take one batch of maps, not a list")
        t_maps = None if teacher_maps is None else teacher_maps.detach()
        total, parts = self.loss(logits, teacher_logits, s_maps, t_maps if self.lam > 0 else None, labels, size)
        self.last_logits = logits
        self.last_maps = None if s_maps is None else s_maps.detach()
        self.last_similarity = None
        if s_maps is not None and t_maps is not None:
            with torch.no_grad():
                self.last_similarity = explanation_similarity(s_maps.detach(), t_maps, size)
        return total, parts

    def _several(self, inputs: Tensor, teacher_logits: Tensor, teacher_maps: list[Tensor] | None,
                 labels: Tensor | None, targets: Tensor | None, create_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Several teachers: KD towards the weighted mixture of their distributions at τ, and the weighted sum of
        each teacher's explanation term, the student explaining that teacher's top-1 class (one student explanation
        per distinct set of targets: teachers that agree on every sample share it)."""
        t = teacher_logits.shape[1]
        weights = torch.tensor(self.teacher_weights or [1.0 / t] * t, dtype=torch.float32, device=inputs.device)
        if len(weights) != t:
            raise ValueError(f"{t} teachers but {len(weights)} teacher weights")
        tau = self.loss.temperature
        mixture = (torch.softmax(teacher_logits.float() / tau, -1) * weights[None, :, None]).sum(1)
        mixture_logits = tau * mixture.clamp_min(1e-30).log()  # softmax(·/τ) of it is the mixture
        targets = teacher_logits.argmax(-1) if targets is None else targets.long()
        size = _input_size(inputs) if self.expl_resolution == "input" else None
        explained: dict[bytes, Tensor] = {}
        logits: Tensor | None = None
        expl: Tensor | None = None
        if self.lam > 0 or (not create_graph and teacher_maps is not None):
            if teacher_maps is None:
                raise ValueError("lam > 0 needs teacher_maps")
            expl = inputs.new_zeros(())
            for i in range(t):
                key = targets[:, i].cpu().numpy().tobytes()
                if key not in explained:
                    s_maps, s_logits = self.explainer(inputs, targets[:, i], create_graph=create_graph)
                    explained[key] = s_maps
                    logits = s_logits if logits is None else logits
                expl = expl + weights[i] * explanation_loss(explained[key], teacher_maps[i].detach(), size)
            first = explained[targets[:, 0].cpu().numpy().tobytes()]
            with torch.no_grad():
                self.last_similarity = explanation_similarity(first.detach(), teacher_maps[0].detach(), size)
            self.last_maps = first.detach()
        else:
            logits = self.student(inputs)
            self.last_maps = self.last_similarity = None
        assert logits is not None  # t ≥ 1 teachers: the first explanation gave the logits
        kd, ce = kd_loss(logits, mixture_logits, tau), self.loss.ce(logits, labels)
        expl = kd.new_zeros(()) if expl is None else expl
        total = kd + self.lam * expl + self.loss.ce_weight * ce
        parts = {"kd": kd, "expl": expl, "ce": ce,
                 "student_explanations": torch.tensor(float(len(explained)))}  # > 1 where teachers disagree
        self.last_logits = logits
        return total, parts
