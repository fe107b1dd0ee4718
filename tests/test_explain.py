"""Explainers against independent references: pytorch-grad-cam, captum, hand-computed gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2kd.explain import build_explainer, list_explainers
from e2kd.models import create_model, input_transform


def _minmax_upsampled(maps: torch.Tensor, size: int) -> np.ndarray:
    up = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin(dim=(1, 2), keepdim=True)
    return (up / (up.amax(dim=(1, 2), keepdim=True) + 1e-7)).numpy()


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _feature_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return {"resnet18": lambda m: m.layer4, "convnext_atto": lambda m: m.stages[-1]}[name](model)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_gradcam_matches_pytorch_grad_cam_and_captum(name: str) -> None:
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM as RefGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    size = 128
    model = create_model(name, 7).eval()
    x = input_transform(model)(torch.rand(4, 3, size, size))
    explainer = build_explainer("gradcam", model)
    ours, logits = explainer(x)  # explains each image's top-1 class
    targets = logits.argmax(1)
    assert ours.shape[1] == 1 and ours.shape[-1] == size // 32
    assert (ours.flatten(1).amax(1) > 0).all(), "degenerate test: an all-zero map"
    ours_up = _minmax_upsampled(ours, size)

    layer = _feature_layer(model, name)
    with RefGradCAM(model=model, target_layers=[layer]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert (_cosine_rows(ours_up, ref) >= 0.999).all()

    captum_maps = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True).detach()
    assert (_cosine_rows(ours_up, _minmax_upsampled(captum_maps, size)) >= 0.999).all()


def test_gradcam_vit_matches_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import GradCAM as RefGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 5, img_size=64, depth=2).eval()
    x = input_transform(model)(torch.rand(3, 3, 64, 64))
    targets = torch.tensor([1, 2, 4])
    ours, _ = build_explainer("gradcam", model)(x, targets)
    assert ours.shape == (3, 1, 4, 4)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, model.num_prefix_tokens:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    with RefGradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert (_cosine_rows(_minmax_upsampled(ours, 64), ref) >= 0.999).all()


def test_explainer_logits_come_from_the_same_forward_and_default_target_is_top1() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 6, channels=(8, 16, 32, 64), stem_width=8, output_stride=16).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))  # only counts full forwards through __call__
    feats_calls = []
    orig = model.forward_features
    model.forward_features = lambda x: (feats_calls.append(1), orig(x))[1]
    explainer = build_explainer("gradcam", model)
    x = torch.rand(3, 3, 64, 64)
    maps, logits = explainer(x)
    assert len(feats_calls) == 1 and not calls
    with torch.no_grad():
        expected = model.forward_head(orig(x))
    torch.testing.assert_close(logits, expected)
    explicit, _ = explainer(x, expected.argmax(1))
    torch.testing.assert_close(maps, explicit)
    assert not maps.requires_grad and not logits.requires_grad


def test_bcos_map_is_input_gradient_in_explanation_mode() -> None:
    torch.manual_seed(0)
    model = create_model("bcos:resnet18", 4, inplanes=16).eval()
    x = input_transform(model)(torch.rand(2, 3, 32, 32))
    assert x.shape[1] == 6
    targets = torch.tensor([1, 3])
    maps, _ = build_explainer("bcos", model)(x, targets)

    ref = []
    for i in range(2):  # independent: one sample at a time, .backward() on a fresh leaf
        xi = x[i:i + 1].clone().requires_grad_(True)
        with model.explanation_mode():
            model(xi)[0, targets[i]].backward()
        ref.append(xi.grad)
    torch.testing.assert_close(maps, torch.cat(ref), rtol=1e-4, atol=1e-6)

    xi = x.clone().requires_grad_(True)
    model(xi).gather(1, targets.view(-1, 1)).sum().backward()  # outside explanation mode
    rel = (xi.grad - maps).norm() / maps.norm()
    assert rel > 1e-2, "the dynamic-weight map must differ from the plain input gradient"


def test_input_x_gradient_matches_captum() -> None:
    from captum.attr import InputXGradient as RefIxG

    torch.manual_seed(0)
    model = create_model("resnet18", 5, channels=(8, 16, 32, 64), stem_width=8).eval()
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([0, 4])
    ours, _ = build_explainer("input_x_gradient", model)(x, targets)
    ref = RefIxG(model).attribute(x, target=targets).detach()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_unknown_and_unsuitable_explainers_are_clear_errors() -> None:
    assert {"gradcam", "bcos", "input_x_gradient"} <= set(list_explainers())
    model = create_model("resnet18", 3, channels=(8, 16, 32, 64), stem_width=8)
    with pytest.raises(ValueError, match="available: bcos, gradcam"):
        build_explainer("nope", model)
    with pytest.raises(ValueError, match="B-cos model"):
        build_explainer("bcos", model)


def test_whether_an_explainer_suits_a_teacher_is_the_explainers_answer() -> None:
    from e2kd.explain import register_explainer
    from e2kd.explain._registry import _REGISTRY, Explainer, check_supports
    from e2kd.models import create_model

    for name, model in (("gradcam", "resnet18"), ("bcos", "bcos:resnet18"), ("input_x_gradient", "bcos:resnet18"),
                        ("input_x_gradient", "resnet18")):
        check_supports(name, model)
    with pytest.raises(ValueError, match="does not fit teacher 'bcos:resnet18': a B-cos model explains itself"):
        check_supports("gradcam", "bcos:resnet18")
    with pytest.raises(ValueError, match="the bcos explainer needs a B-cos model"):
        check_supports("bcos", create_model("resnet18", 3))

    @register_explainer
    class OnlyViTs(Explainer):  # a plug-in explainer answers for itself
        name, family = "only_vits_test", "gradcam"

        @classmethod
        def supports(cls, model):  # noqa: ANN001, ANN206
            return None if "vit" in str(model) else "ViTs only"

        def explain(self, inputs, targets, create_graph):  # noqa: ANN001, ANN201
            raise NotImplementedError

    try:
        with pytest.raises(ValueError, match="ViTs only"):
            check_supports("only_vits_test", "resnet18")
        check_supports("only_vits_test", "vit_tiny_patch16_224")
    finally:
        del _REGISTRY["only_vits_test"]


def test_several_explainers_share_one_teacher_forward_and_give_their_own_maps() -> None:
    from e2kd.explain import build_explainer
    from e2kd.explain._registry import explain_together
    from e2kd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", 5, channels=(8, 16, 32, 64), stem_width=8).eval().requires_grad_(False)
    x = torch.rand(3, 3, 64, 64)
    explainers = [build_explainer(n, model) for n in ("gradcam", "input_x_gradient")]
    forwards = []
    handle = model.conv1.register_forward_hook(lambda *_: forwards.append(1))
    try:
        maps, logits = explain_together(explainers, x)
        assert len(forwards) == 1  # one teacher forward for both explanations
        alone = [e(x) for e in explainers]
    finally:
        handle.remove()
    for shared, (own, own_logits) in zip(maps, alone, strict=True):
        assert torch.equal(shared, own)  # bit-identical to each explainer's own pass
        assert torch.equal(logits, own_logits)


def test_gradcam_of_a_bcos_resnet_equals_a_hook_computation_and_its_forward() -> None:
    """GradCAM as a further field of a B-cos teacher: its last feature map (before fc, pooling and logit layer),
    checked against activations and gradients taken with a hook on ``layer4`` of the unmodified forward."""
    from e2kd.explain import build_explainer
    from e2kd.explain._gradcam import gradcam_from
    from e2kd.explain._registry import check_supports
    from e2kd.models import create_model, input_transform

    torch.manual_seed(0)
    model = create_model("bcos:resnet18", 4, inplanes=8).eval().requires_grad_(False)
    x = input_transform(model)(torch.rand(2, 3, 64, 64))
    maps, logits = build_explainer("gradcam", model)(x)
    captured = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            reference = model(x.requires_grad_(True))
            (grad,) = torch.autograd.grad(reference.gather(1, reference.argmax(1, keepdim=True)).sum(), captured[0])
    finally:
        handle.remove()
    torch.testing.assert_close(logits, reference.detach())
    torch.testing.assert_close(maps, gradcam_from(captured[0].detach(), grad))
    check_supports("gradcam", "bcos:resnet18", default=False)
    with pytest.raises(ValueError, match="--explainers bcos,gradcam"):
        check_supports("gradcam", "bcos:resnet18")
