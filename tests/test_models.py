"""Model factory: rebuild from spec, checkpoints (safetensors / weights_only torch), clear mismatch errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from e2kd.models import create_model, input_transform, model_spec

NARROW = dict(channels=(8, 16, 32, 64), stem_width=8, output_stride=16)


def test_spec_rebuilds_the_same_architecture_and_checkpoints_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 5, **NARROW).eval()
    spec = model_spec(model)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in NARROW.items()}
    assert spec == {"name": "resnet18", "num_classes": 5, "kwargs": kwargs}
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    x = torch.rand(2, 3, 64, 64)
    for file in ("m.safetensors", "m.pt"):
        again = create_model(spec["name"], spec["num_classes"], checkpoint=tmp_path / file, **spec["kwargs"])
        again.eval()
        torch.testing.assert_close(again(x), model(x))


def test_checkpoint_mismatches_name_both_sides(tmp_path) -> None:
    save_file(create_model("resnet18", 5, **NARROW).state_dict(), tmp_path / "five.safetensors")
    with pytest.raises(ValueError, match=r"class count: checkpoint 5, model 7"):
        create_model("resnet18", 7, checkpoint=tmp_path / "five.safetensors", **NARROW)
    with pytest.raises(ValueError, match="missing in checkpoint|unexpected in checkpoint"):
        create_model("convnext_atto", 5, checkpoint=tmp_path / "five.safetensors")


class Evil:
    """Any non-tensor object: unpickling it would run arbitrary code paths."""


def test_pickled_objects_are_refused(tmp_path) -> None:
    torch.save({"weights": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        create_model("resnet18", 5, checkpoint=tmp_path / "evil.pt", **NARROW)


def test_input_transforms() -> None:
    x = torch.rand(1, 3, 8, 8)
    bcos_in = input_transform(create_model("bcos:resnet18", 3, inplanes=8))(x)
    torch.testing.assert_close(bcos_in, torch.cat([x, 1 - x], 1))
    timm_in = input_transform(create_model("resnet18", 3, **NARROW))(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(timm_in, (x - mean) / std)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="not a timm model"):
        create_model("no_such_net", 3)
    with pytest.raises(ValueError, match="unknown B-cos model"):
        create_model("bcos:no_such_net", 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_load_from_bytes_as_from_the_file(suffix: str, tmp_path: Path) -> None:
    """cache-teacher's actors load the teacher from the checkpoint's bytes (no temporary file): the same tensors
    as loading the file, for safetensors and for a torch training checkpoint ({"model": state}, module. prefixes)."""
    from safetensors.torch import save_file

    from e2kd.models import create_model, load_state_bytes
    from e2kd.stages._cache_teacher.teacher import TeacherSpec

    kwargs = {"channels": [8, 8, 16, 32], "stem_width": 8}
    torch.manual_seed(3)
    source = create_model("resnet18", 4, **kwargs)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    else:
        save_file(source.state_dict(), path)
    from_file = create_model("resnet18", 4, checkpoint=path, **kwargs)
    from_bytes = TeacherSpec("resnet18", 4, kwargs, suffix).build(path.read_bytes(), checkpoint=path)
    for (k, a), b in zip(from_file.state_dict().items(), from_bytes.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="garbage is not a readable checkpoint"):
        load_state_bytes(create_model("resnet18", 4, **kwargs), b"not weights", suffix, name="garbage")
