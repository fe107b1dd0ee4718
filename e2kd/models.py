"""Model factory: timm names and ``bcos:<name>`` B-cos models, plus each model's input transform.

Every stage builds models through :func:`create_model` and records :func:`model_spec`, so a model can
always be rebuilt exactly from ``(name, num_classes, kwargs)``. Images travel through e2kd as ``[B, 3, H, W]``
uint8 (0–255) or float32 (in ``[0, 1]``); :func:`input_transform` turns them into what the model expects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["create_model", "input_transform", "InputTransform", "model_spec", "load_state_dict",
           "load_state_bytes", "is_bcos_name", "BCOS_PREFIX", "BCOS_NORMS", "bcos_norm_layer"]

BCOS_PREFIX = "bcos:"


def is_bcos_name(name: str) -> bool:
    """True for ``bcos:<name>`` model names."""
    return name.startswith(BCOS_PREFIX)


@dataclass(frozen=True)
class InputTransform:
    """Maps ``[0, 1]`` RGB images to model input: mean/std normalisation, or B-cos' added inverse channels."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    add_inverse: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        """``images``: float ``[B, 3, H, W]`` in ``[0, 1]``, or uint8 (0–255, scaled first, on their device)."""
        scaled = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        if self.add_inverse:
            return torch.cat([scaled, 1.0 - scaled], dim=1)
        if self.mean is None or self.std is None:
            return scaled
        mean = scaled.new_tensor(self.mean).view(1, -1, 1, 1)
        std = scaled.new_tensor(self.std).view(1, -1, 1, 1)
        if scaled is images:  # the caller's tensor: never changed in place
            return (scaled - mean).div_(std)
        return scaled.sub_(mean).div_(std)  # a fresh tensor: one allocation for the whole transform

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def input_transform(model: nn.Module) -> InputTransform:
    """The input transform of a model built by :func:`create_model` (timm mean/std, or B-cos [x, 1−x])."""
    spec = getattr(model, "e2kd_spec", None)
    if spec is not None and is_bcos_name(spec["name"]):
        return InputTransform(add_inverse=True)
    if not getattr(model, "pretrained_cfg", None):
        return InputTransform()  # not a timm model: inputs stay in [0, 1]
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return InputTransform()
    return InputTransform(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "num_classes", "kwargs"}``: everything needed to rebuild ``model`` with :func:`create_model`."""
    spec = getattr(model, "e2kd_spec", None)
    if spec is None:
        raise ValueError("model was not built by e2kd.models.create_model: its spec is unknown")
    return dict(spec)


def create_model(name: str, num_classes: int, checkpoint: str | Path | None = None, pretrained: bool = False,
                 **model_kwargs: Any) -> nn.Module:
    """Build a timm model or a ``bcos:<name>`` B-cos model, optionally loading a checkpoint.

    Args:
        name: a timm model name (``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``, …) or
            ``bcos:<name>`` for the ``bcos`` package's models (``bcos:resnet18``, ``bcos:simple_vit_ti_patch16_224``;
            6-channel input). B-cos kwargs are JSON values: ``norm`` (a name from :data:`BCOS_NORMS`, e.g. the
            paper's ``"bn_uncentered_nobias"``), ``b`` and ``max_out`` of the B-cos convolutions, ``logit_bias``,
            ``inplanes``, …; a kwarg the model would ignore is an error.
        num_classes: size of the classifier.
        checkpoint: ``.safetensors`` file or a torch state_dict (``.pt``/``.pth``, loaded with
            ``weights_only=True``); class-count or key mismatches raise ``ValueError`` naming both sides, and so
            does a model other than the one the checkpoint's run recorded (``summary.json`` beside it).
        pretrained: ask timm for its pretrained weights (downloads; never done otherwise).
        **model_kwargs: passed to the model constructor (e.g. ``channels=(16, 32, 64, 128), stem_width=16,
            output_stride=16`` for a narrow timm ResNet). ``None`` values are dropped.

    Example:
        >>> m = create_model("resnet18", 10, channels=(16, 32, 64, 128), stem_width=16, output_stride=16)
        >>> m(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    if is_bcos_name(name):
        if pretrained:
            raise ValueError("pretrained=True is only supported for timm models; pass checkpoint= for B-cos")
        model = _create_bcos(name[len(BCOS_PREFIX):], num_classes, kwargs)
    else:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown model {name!r}: not a timm model (see timm.list_models()) "
                             f"and not '{BCOS_PREFIX}<name>'")
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except TypeError as exc:  # an unknown or wrongly typed kwarg
            raise ValueError(f"{name} does not accept kwargs {kwargs}: {exc}") from None
    spec = {"name": name, "num_classes": int(num_classes), "kwargs": _jsonable(kwargs)}
    model.__dict__["e2kd_spec"] = spec  # a plain attribute: what model_spec reads
    if checkpoint is not None:
        from e2kd._runs import check_recorded_spec

        check_recorded_spec(checkpoint, name, int(num_classes), spec["kwargs"])
        load_state_dict(model, checkpoint)
    return model


def _create_bcos(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import contextlib
    import io

    from bcos.models import pretrained as entrypoints

    factory = _bcos_factories().get(arch)
    if factory is None:
        raise ValueError(f"unknown B-cos model {arch!r}; the bcos package provides: "
                         f"{', '.join(sorted(_bcos_factories()))}")
    entry = getattr(entrypoints, arch, None)
    if entry is not None and factory is entry:  # ViTs: the package's configured entry point, never downloaded
        kwargs = {"pretrained": False, **kwargs}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the bcos models print, then ignore, unknown kwargs
        model = factory(num_classes=num_classes, **_bcos_layer_kwargs(kwargs))
    if "ignored" in printed.getvalue():
        raise ValueError(f"bcos:{arch} does not accept these kwargs: {printed.getvalue().strip()}")
    return model


def _bcos_factories() -> dict[str, Any]:
    """``bcos.models`` architectures (configurable) plus the package's entry points for the rest (ViTs)."""
    import bcos.models
    from bcos.models import pretrained as entrypoints

    found = {n: getattr(entrypoints, n) for n in entrypoints.list_available()}
    for module in (bcos.models.resnet, bcos.models.densenet, bcos.models.convnext, bcos.models.vgg):
        found.update({n: getattr(module, n) for n in getattr(module, "__all__", []) if n[0].islower()})
    return found


#: ``norm`` values of ``bcos:<name>`` models (JSON-friendly); append ``_nobias`` or ``_unaffine``.
BCOS_NORMS = {
    "position": ("centered_norms", "DetachablePositionNorm2d"),
    "position_uncentered": ("uncentered_norms", "PositionNormUncentered2d"),
    "bn": ("centered_norms", "BatchNorm2d"),
    "bn_uncentered": ("uncentered_norms", "BatchNormUncentered2d"),
    "allnorm_uncentered": ("uncentered_norms", "AllNormUncentered2d"),
    "gn_layer": ("centered_norms", "DetachableGNLayerNorm2d"),
    "gn_layer_uncentered": ("uncentered_norms", "GNLayerNormUncentered2d"),
    "gn_instance": ("centered_norms", "DetachableGNInstanceNorm2d"),
    "gn_instance_uncentered": ("uncentered_norms", "GNInstanceNormUncentered2d"),
}


def bcos_norm_layer(name: str) -> Any:
    """The ``bcos`` norm layer factory for a name such as ``bn_uncentered_nobias`` (``none``: no norm)."""
    from bcos.modules import norms

    if name == "none":
        return None
    base, wrap = name, None
    for suffix, wrapper in (("_nobias", norms.NoBias), ("_unaffine", norms.Unaffine)):
        if name.endswith(suffix):
            base, wrap = name[: -len(suffix)], wrapper
    if base not in BCOS_NORMS:
        choices = ", ".join(f"{n}[_nobias|_unaffine]" for n in BCOS_NORMS)
        raise ValueError(f"unknown B-cos norm {name!r}; choose none or one of {choices}")
    module, cls = BCOS_NORMS[base]
    layer = getattr(getattr(norms, module), cls)
    return wrap(layer) if wrap else layer


def _bcos_layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON kwargs → layer factories: ``norm`` (name) → ``norm_layer``; ``b``/``max_out`` → ``conv_layer``."""
    out = dict(kwargs)
    if "norm" in out:
        out["norm_layer"] = bcos_norm_layer(str(out.pop("norm")))
    if "b" in out or "max_out" in out:
        import functools

        from bcos.modules import BcosConv2d

        out["conv_layer"] = functools.partial(BcosConv2d, b=out.pop("b", 2), max_out=out.pop("max_out", 1))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"model kwarg value {value!r} is not a finite number")
        return value
    raise ValueError(f"model kwargs must be JSON values (str, number, bool, list, dict); got {value!r}")


def load_state_dict(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a ``.safetensors`` or torch state_dict file strictly, with errors naming both sides."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _load_checked(model, lambda: _read_state(path), str(path))


def load_state_bytes(model: nn.Module, data: bytes, suffix: str = ".safetensors", name: str = "weights") -> None:
    """Load weights from bytes (a ``.safetensors`` file's, or a torch state_dict's for ``.pt``/``.pth``) strictly,
    without a temporary file — what every Ray actor of cache-teacher does with the teacher's weights."""
    _load_checked(model, lambda: _state_from_bytes(data, suffix), name)


def _load_checked(model: nn.Module, read: Any, where: str) -> None:
    try:
        state = read()
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors / torch report a bad file in many ways
        raise ValueError(f"{where} is not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    _check_compatible(model, state, where)
    model.load_state_dict(state, strict=True)


def _state_from_bytes(data: bytes, suffix: str) -> dict[str, Tensor]:
    """:func:`_read_state` of bytes: safetensors, or ``torch.load(weights_only=True)`` of a state_dict or a
    training checkpoint (``state_dict`` / ``model`` entry), ``module.`` prefixes removed (timm's cleaning)."""
    import io

    from timm.models import clean_state_dict

    if suffix == ".safetensors":
        from safetensors.torch import load

        state: Any = load(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
        state = clean_state_dict(state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"expected a state_dict of tensors, got {type(state).__name__}")
    return state


def _read_state(path: Path) -> dict[str, Tensor]:
    """timm's loader: safetensors, or ``torch.load(weights_only=True)`` of a state_dict or a training checkpoint
    (``state_dict`` / ``model`` entry, e.g. e2kd's ``checkpoint.pt``), ``module.`` prefixes removed."""
    from timm.models import load_state_dict as timm_load_state_dict

    state = timm_load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict of tensors, got {type(state).__name__}")
    return state


def _check_compatible(model: nn.Module, state: dict[str, Tensor], path: Path | str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {model_spec(model)['name']}: "
                         f"missing in checkpoint {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected in checkpoint {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    num_classes = model_spec(model)["num_classes"]
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            hint = ""
            if tensor.ndim >= 1 and own[key].shape[0] == num_classes != tensor.shape[0]:
                hint = f" (class count: checkpoint {tensor.shape[0]}, model {num_classes})"
            raise ValueError(f"{path}: shape of {key!r} is {tuple(tensor.shape)} in the checkpoint but "
                             f"{tuple(own[key].shape)} in the model{hint}")
