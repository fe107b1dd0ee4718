"""Sampled logits (Anshumann et al., ACL 2025): the KD gradient from cached draws is unbiased — averaged over many
caches it converges to the full-logit gradient — while top-k's stays biased; caches of them train students at their
temperature only, and other temperatures are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, cache_options

from e2kd.cli import main
from e2kd.losses import kd_loss
from e2kd.storage import Encoding, get_codec, open_store
from e2kd.storage._codecs import SampledLogits, TopkLogits
from e2kd.storage._encoding import parse_logits

CLASSES = 1000


def _kd_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    s = student.clone().requires_grad_(True)
    kd_loss(s, teacher, temperature).backward()
    return s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_sampled_kd_gradient_is_unbiased_and_top_k_is_not(temperature: float) -> None:
    rng = np.random.default_rng(7)
    z = (rng.normal(size=(1, 1, CLASSES)) * 3).astype(np.float32)  # top-10 mass ≈ 0.7, as an ImageNet teacher's
    student = torch.from_numpy(rng.normal(size=(1, CLASSES)).astype(np.float32))
    full = _kd_grad(student, torch.from_numpy(z[:, 0]), temperature)
    draws = torch.stack([_kd_grad(student, c.decode(c.encode(z))[:, 0], temperature)
                         for c in (SampledLogits(samples=12, num_classes=CLASSES, temperature=temperature, seed=i)
                                   for i in range(1024))])

    def error(g: torch.Tensor) -> float:
        return float((g - full).norm() / full.norm())

    mean_256 = draws[:256].mean(0)
    if temperature == 1.0:  # (at T = 2 the teacher is flatter: more variance per draw, the same convergence)
        assert float(torch.nn.functional.cosine_similarity(mean_256.flatten(), full.flatten(), 0)) >= 0.99
    assert error(draws.mean(0)) < 0.6 * error(draws[:64].mean(0))  # converges (≈ 1/√draws): no bias floor
    topk = TopkLogits(k=10, num_classes=CLASSES)
    biased = error(_kd_grad(student, topk.decode(topk.encode(z))[:, 0], temperature))
    assert biased > 2 * error(draws.mean(0)) and biased > 0.05  # top-k's error does not average away


def test_draws_are_deterministic_per_row_and_differ_between_rows() -> None:
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(3, 2, 50)) * 2).astype(np.float32)
    codec = SampledLogits(samples=16, num_classes=50)
    a, b = codec.encode(z), codec.encode(z[1:])  # a row's draws do not depend on its batch
    np.testing.assert_array_equal(a["sampled_ids"][1:], b["sampled_ids"])
    assert not np.array_equal(a["sampled_ids"][0, 0], a["sampled_ids"][1, 0])
    assert (np.diff(a["sampled_ids"], axis=-1) >= 0).all()  # stored sorted (compresses)
    np.testing.assert_array_equal(a["sampled_logits"], np.take_along_axis(z, a["sampled_ids"], -1).astype(np.float16))


def test_logits_specs_parse_and_refuse_conflicts() -> None:
    assert parse_logits("full") == {"topk": None, "sampled": None, "sample_temperature": None}
    assert parse_logits("topk:10")["topk"] == 10 and parse_logits("full", topk=5)["topk"] == 5
    assert parse_logits("sampled:12@2") == {"topk": None, "sampled": 12, "sample_temperature": 2.0}
    for bad in ("sampled", "topk:x", "gzip", "sampled:4@hot"):
        with pytest.raises(ValueError, match="--logits must be full, topk:K or sampled:S"):
            parse_logits(bad)
    with pytest.raises(ValueError, match="disagrees with --logits"):
        parse_logits("sampled:4", topk=3)
    assert Encoding(num_classes=10, sampled=4).logits_codec == get_codec(
        {"name": "logits-sampled", "samples": 4, "num_classes": 10, "temperature": 1.0, "seed": 0})
    assert "sampled" not in Encoding(num_classes=10).to_dict()  # other caches' manifests are unchanged


def test_a_sampled_cache_trains_a_student_at_its_temperature_only(digits: Path, teacher_ckpt: Path,
                                                                    tmp_path: Path) -> None:
    from e2kd.stages._cache_teacher import run_cache_teacher

    data = f"{digits}/train-{{000000..000001}}.tar"
    store = tmp_path / "sampled"
    run_cache_teacher(cache_options(data, store, teacher_ckpt, workers=1, logits="sampled:8@2"))
    info = CliRunner().invoke(main, ["inspect", str(store)])
    assert "logits: logits-sampled samples=8 temperature=2.0" in info.output, info.output
    assert open_store(str(store)).verify() == []
    args = ["train-student", "--data", data, "--cache", str(store), "--student", "resnet18", "--student-kwargs",
            json.dumps(TEACHER_KWARGS), "--epochs", "1", "--batch-size", "16", "--quiet"]
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "t1"), "--temperature", "1"])
    line = [ln for ln in refused.output.splitlines() if ln.strip()][-1]
    assert refused.exit_code == 1 and "sampled at temperature 2: train with --temperature 2" in line, refused.output
    assert not (tmp_path / "t1").exists()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "t2"), "--temperature", "2"])
    assert result.exit_code == 0 and "trained 6 steps" in result.output, result.output
    metrics = json.loads((tmp_path / "t2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(metrics["kd"]) and metrics["kd"] > 0
