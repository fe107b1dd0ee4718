"""The e²KD loss against float64 hand computations, top-k reconstruction and double backward."""

from __future__ import annotations

import math

import pytest
import torch

from e2kd.explain import build_explainer
from e2kd.losses import E2KDLoss, explanation_loss, kd_loss, logits_from_topk, topk_logits
from e2kd.models import create_model


def _kd_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    total = 0.0
    for srow, trow in zip(s.double().tolist(), t.double().tolist(), strict=True):
        zs = [v / tau for v in srow]
        zt = [v / tau for v in trow]
        lse_s = math.log(sum(math.exp(v) for v in zs))
        lse_t = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lse_t) * ((b - lse_t) - (a - lse_s)) for a, b in zip(zs, zt, strict=True))
    return total / len(s) * tau * tau


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_term_matches_hand_computation_and_vanishes_on_equal_logits(tau: float) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
    assert float(kd_loss(s, t, tau)) == pytest.approx(_kd_by_hand(s, t, tau), rel=1e-5)
    assert float(kd_loss(t, t, tau)) == pytest.approx(0.0, abs=1e-6)


def test_explanation_term_is_one_minus_cosine_and_resizes_the_coarser_map() -> None:
    torch.manual_seed(0)
    a, b = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    ref = 1 - (a.flatten(1) * b.flatten(1)).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    assert float(explanation_loss(a, b)) == pytest.approx(float(ref.mean()), rel=1e-6)
    assert float(explanation_loss(a, 2.5 * a)) == pytest.approx(0.0, abs=1e-6)
    coarse = torch.rand(3, 1, 2, 2)
    fine = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    assert float(explanation_loss(coarse, fine)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="channels differ"):
        explanation_loss(torch.rand(1, 6, 4, 4), torch.rand(1, 1, 4, 4))


def test_topk_with_k_equal_c_reproduces_the_full_loss() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 10), torch.randn(6, 10) * 2
    for tau in (1.0, 3.0):
        rebuilt = logits_from_topk(*topk_logits(t, 10), num_classes=10)
        assert float(kd_loss(s, rebuilt, tau)) == pytest.approx(float(kd_loss(s, t, tau)), rel=1e-6, abs=1e-7)


def test_topk_reconstruction_keeps_known_probabilities_and_spreads_the_rest() -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 10) * 3
    values, indices, lse = topk_logits(t, 3)
    rebuilt = logits_from_topk(values, indices, lse, 10)
    p_true, p_rebuilt = t.softmax(-1), rebuilt.softmax(-1)
    torch.testing.assert_close(p_rebuilt.gather(1, indices), p_true.gather(1, indices))
    torch.testing.assert_close(p_rebuilt.sum(-1), torch.ones(4))
    others = torch.ones_like(t, dtype=torch.bool).scatter(1, indices, False)
    rest = p_rebuilt[others].view(4, 7)
    torch.testing.assert_close(rest, rest[:, :1].expand_as(rest))
    torch.testing.assert_close(rest.sum(-1), 1 - p_true.gather(1, indices).sum(-1))


def test_ce_ignores_unlabelled_samples_and_parts_add_up() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    ms, mt = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    labels = torch.tensor([1, -1, 3, -1])
    total, parts = E2KDLoss(temperature=2.0, lam=0.5, ce_weight=0.3)(s, t, ms, mt, labels)
    ce_ref = torch.nn.functional.cross_entropy(s[[0, 2]], labels[[0, 2]])
    assert float(parts["ce"]) == pytest.approx(float(ce_ref), rel=1e-6)
    expected = parts["kd"] + 0.5 * parts["expl"] + 0.3 * parts["ce"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    _, parts = E2KDLoss(ce_weight=1.0)(s, t, ms, mt, torch.full((4,), -1))
    assert float(parts["ce"]) == 0.0


def _tiny_student() -> torch.nn.Module:
    """A smooth (SiLU) float64 ResNet: ReLU zeros make max-pool ties, where finite differences are meaningless."""
    torch.manual_seed(0)
    return create_model("resnet18", 3, channels=(4, 4, 8, 8), stem_width=4, layers=(1, 1, 1, 1),
                        output_stride=16, act_layer="silu", zero_init_last=False).double().eval()


def test_explanation_term_is_differentiable_and_matches_finite_differences() -> None:
    model = _tiny_student()
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    explainer = build_explainer("gradcam", model)
    start, start_logits = explainer(x)
    targets = start_logits.argmax(1)
    assert (start.flatten(1) > 0).any(1).all(), "degenerate test: an all-zero student map"
    teacher_maps = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_at() -> torch.Tensor:
        return explanation_loss(explainer(x, targets, create_graph=True)[0], teacher_maps)

    grads = torch.autograd.grad(loss_at(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    assert sum(float(g.abs().sum()) for g in grads) > 0, "explanation loss has no gradient w.r.t. parameters"

    # Directional derivatives, one parameter tensor at a time: early conv, last stage, classifier.
    by_name = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads, strict=True))
    gen = torch.Generator().manual_seed(1)
    eps = 1e-8  # float64 rounding stays ~1e-8 relative; larger steps cross GradCAM's ReLU kinks
    for name in ("conv1.weight", "layer4.0.conv2.weight", "fc.weight"):
        param = model.get_parameter(name)
        direction = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        analytic = float((by_name[name] * direction).sum())
        with torch.no_grad():
            param.add_(eps * direction)
            plus = float(loss_at())
            param.sub_(2 * eps * direction)
            minus = float(loss_at())
            param.add_(eps * direction)
        assert analytic != 0.0
        assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=1e-5), name


def test_teacher_side_keeps_no_graph() -> None:
    model = _tiny_student()
    maps, _ = build_explainer("gradcam", model)(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    assert maps.grad_fn is None and not maps.requires_grad


def test_loss_decreases_when_training_a_student_on_fixed_targets() -> None:
    torch.manual_seed(0)
    student = create_model("resnet18", 4, channels=(8, 16, 16, 32), stem_width=8, output_stride=16)
    student.eval()  # fixed BN statistics: the targets below are a fixed function of x
    x = torch.rand(16, 3, 64, 64)
    teacher_logits = torch.randn(16, 4) * 2
    teacher_maps = torch.rand(16, 1, 4, 4)
    targets = teacher_logits.argmax(1)
    explainer = build_explainer("gradcam", student)
    loss_fn = E2KDLoss(temperature=2.0, lam=1.0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for _ in range(50):
        maps, logits = explainer(x, targets, create_graph=True)
        total, parts = loss_fn(logits, teacher_logits, maps, teacher_maps)
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((float(total), float(parts["expl"])))
    last = history[-5:]
    assert sum(h[0] for h in last) / 5 < 0.8 * history[0][0]
    assert sum(h[1] for h in last) / 5 < 0.5 * history[0][1]
