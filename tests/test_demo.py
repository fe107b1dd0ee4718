"""The demo end to end (--quick: the pipeline and its files, not the accuracies), show and evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS

from e2kd.cli import main
from e2kd.explain import build_explainer
from e2kd.losses import explanation_similarity
from e2kd.models import create_model, input_transform
from e2kd.pipeline._sources import iter_shard, list_shards
from e2kd.pipeline._views import render_view
from e2kd.stages._demo import METHODS
from e2kd.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
_FROM_WHEEL = """
import sys
import e2kd
assert e2kd.__file__.startswith(sys.argv[1]), e2kd.__file__  # the installed wheel, not the repository
from e2kd.cli import main
main(sys.argv[2:], prog_name="e2kd")
"""


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``e2kd demo --quick`` run from a wheel installed outside the repository, in another directory."""
    build = tmp_path_factory.mktemp("build")
    src = build / "src"
    shutil.copytree(ROOT / "e2kd", src / "e2kd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(build / "dist"), str(src)],
                   check=True, capture_output=True)
    site = build / "site"
    wheel = next((build / "dist").glob("e2kd-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    out, elsewhere = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("elsewhere")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", _FROM_WHEEL, str(site), "demo", "--quick", "--out", str(out)],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert not list(elsewhere.iterdir())  # everything went to --out
    (out / "console.txt").write_text(result.stdout)
    return out


def test_the_demo_echoes_pasteable_commands_the_cli_accepts(demo_dir: Path) -> None:
    import shlex

    lines = [ln[2:] for ln in (demo_dir / "console.txt").read_text().splitlines() if ln.startswith("$ e2kd ")]
    commands = [shlex.split(ln) for ln in lines]
    assert {c[1] for c in commands} == {"make-dataset", "train-teacher", "cache-teacher", "train-student"}
    for words in commands:
        command = main.commands[words[1]]
        with command.make_context(words[1], words[2:]) as ctx:  # every echoed flag parses as the CLI's own
            assert ctx.params


def test_quick_demo_writes_results_for_every_method(demo_dir: Path) -> None:
    rows = json.loads((demo_dir / "results.json").read_text())
    assert [r["method"] for r in rows] == ["teacher", *METHODS]
    for r in rows:
        assert set(r) >= {"method", "seed", "id_acc", "ood_acc", "agreement", "expl_sim", "sec_per_epoch"}
        assert 0.0 <= r["id_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0 and -1.0 <= r["expl_sim"] <= 1.0001
    teacher = rows[0]
    assert teacher["agreement"] == 1.0 and teacher["expl_sim"] > 0.999  # the teacher against its own cache
    table = (demo_dir / "results.md").read_text()
    assert all(f"| {m} |" in table for m in ("teacher", *METHODS))
    assert (demo_dir / "explanations.png").stat().st_size > 10_000
    assert open_store(str(demo_dir / "cache-views")).manifest.num_views == 2


def test_evaluate_agrees_with_an_independent_computation(demo_dir: Path) -> None:
    weights = demo_dir / "runs" / "e2kd-frozen-seed0" / "student.safetensors"
    kwargs = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16}
    ood = ",".join(str(p) for p in sorted((demo_dir / "data").glob("test-ood-*.tar")))
    args = ["evaluate", "--data", ood, "--cache", str(demo_dir / "cache-ood"), "--student", "resnet18",
            "--student-kwargs", json.dumps(kwargs), "--weights", str(weights), "--json"]
    result = CliRunner().invoke(main, [*args, "--expl-resolution", "native"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    default = CliRunner().invoke(main, args)  # the paper's convention: cosine at the input size
    assert default.exit_code == 0, default.output
    at_input = json.loads(default.output)
    store = open_store(str(demo_dir / "cache-ood"))
    model = create_model("resnet18", 10, checkpoint=weights, **kwargs).eval()
    explainer = build_explainer("gradcam", model)
    correct = agree = n = 0
    sims, sims_input = [], []
    for shard in list_shards(ood):
        for s in iter_shard(shard):
            rec = store.read(s.key)
            x = render_view(s.image, rec["views"][0].tolist(), (64, 64))[None]
            maps, logits = explainer(input_transform(model)(x), rec["target"])
            pred = int(logits.argmax())
            correct += pred == s.label
            agree += pred == int(rec["target"][0])
            sims.append(float(explanation_similarity(maps, rec["maps"])))
            up = [torch.nn.functional.interpolate(m.double(), size=(64, 64), mode="bilinear", align_corners=False)
                  for m in (maps, torch.as_tensor(rec["maps"]).float())]
            sims_input.append(float(torch.nn.functional.cosine_similarity(up[0].flatten(), up[1].flatten(), dim=0)))
            n += 1
    assert metrics["top1"] == pytest.approx(correct / n)
    assert metrics["agreement"] == pytest.approx(agree / n)
    assert metrics["expl_sim"] == pytest.approx(sum(sims) / n, abs=1e-4)
    assert at_input["expl_sim"] == pytest.approx(sum(sims_input) / n, abs=1e-4)
    assert at_input["top1"] == metrics["top1"]


def test_show_draws_views_and_maps(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(demo_dir / "cache-views"))
    key = sorted(store.keys())[3]
    out = tmp_path / "show.png"
    result = CliRunner().invoke(main, ["show", str(demo_dir / "cache-views"), "--key", key, "--out", str(out),
                                       "--student", "resnet18", "--student-kwargs",
                                       json.dumps({"channels": [16, 32, 64, 128], "stem_width": 16,
                                                   "output_stride": 16}),
                                       "--weights", str(demo_dir / "runs" / "e2kd-views-seed0" /
                                                        "student.safetensors")])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 5_000
    import e2kd.stages._figures as figures

    panels: list[tuple[str, object]] = []
    real = figures._map_panel
    monkeypatch.setattr(figures, "_map_panel", lambda fig, ax, maps, size, title, scale=None: (
        panels.append((title, scale)), real(fig, ax, maps, size, title, scale))[1])
    svg = tmp_path / "show.svg"
    result = CliRunner().invoke(main, ["show", str(demo_dir / "cache-views"), "--key", key, "--out", str(svg),
                                       "--run", str(demo_dir / "runs" / "e2kd-views-seed0"), "--shared-scale"])
    assert result.exit_code == 0, result.output
    text = svg.read_text()
    assert "predicts" in text and "explains class" in text and f"{key}" in text  # titles as text, never clipped
    teacher, student = panels[0::2], panels[1::2]
    assert len(teacher) == len(student) == 2 and all(t[1] is not None and t[1] == s[1]
                                                     for t, s in zip(teacher, student, strict=True))
    result = CliRunner().invoke(main, ["show", str(demo_dir / "cache-views"), "--key", "nope", "--out", str(out)])
    assert result.exit_code == 1


def test_train_teacher_learns_the_digits(digits: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train-teacher", "--data", f"{digits}/teacher-train-{{000000..000021}}.tar",
                                       "--model", "resnet18", "--model-kwargs", json.dumps(TEACHER_KWARGS),
                                       "--num-classes", "10", "--input-size", "64", "--epochs", "9", "--out",
                                       str(tmp_path / "t"), "--val-data", f"{digits}/val-000000.tar", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["top1"] > 0.3  # chance is 0.1
    state = __import__("safetensors.torch").torch.load_file(str(tmp_path / "t" / "teacher.safetensors"))
    create_model("resnet18", 10, **TEACHER_KWARGS).load_state_dict(state, strict=True)
    assert torch.is_tensor(next(iter(state.values())))


def test_run_directories_carry_their_model_and_refuse_other_flags(demo_dir: Path, tmp_path: Path) -> None:
    teacher = demo_dir / "teacher"
    with pytest.raises(ValueError, match="its run recorded kwargs="):  # forgotten --teacher-kwargs: not silent
        create_model("resnet18", 10, checkpoint=teacher / "teacher.safetensors")
    run = demo_dir / "runs" / "e2kd-frozen-seed0"
    ood = ",".join(str(p) for p in sorted((demo_dir / "data").glob("test-ood-*.tar")))
    by_run = CliRunner().invoke(main, ["evaluate", "--data", ood, "--cache", str(demo_dir / "cache-ood"), "--run",
                                       str(run), "--json"])
    assert by_run.exit_code == 0, by_run.output
    by_flags = CliRunner().invoke(main, ["evaluate", "--data", ood, "--cache", str(demo_dir / "cache-ood"),
                                         "--student", "resnet18", "--student-kwargs",
                                         json.dumps({"channels": [16, 32, 64, 128], "stem_width": 16,
                                                     "output_stride": 16}),
                                         "--weights", str(run / "student.safetensors"), "--json"])
    assert json.loads(by_run.output) == json.loads(by_flags.output)
    assert json.loads(by_flags.output)["eval_samples"] == len(open_store(str(demo_dir / "cache-ood")))
    train = ",".join(str(p) for p in sorted((demo_dir / "data").glob("train-*.tar")))
    k_view = CliRunner().invoke(main, ["evaluate", "--data", train, "--cache", str(demo_dir / "cache-views"),
                                       "--run", str(run)])
    assert k_view.exit_code == 0 and "holds 2 views per sample; agreement and expl_sim compare on the first" in \
        k_view.output
    conflict = CliRunner().invoke(main, ["cache-teacher", "--teacher-run", str(teacher), "--teacher-kwargs", "{}",
                                         "--data", ood, "--out", str(tmp_path / "c")])
    assert conflict.exit_code == 1 and "holds kwargs=" in conflict.output and not (tmp_path / "c").exists()
    init = CliRunner().invoke(main, ["train-student", "--data", ood, "--cache", str(demo_dir / "cache-ood"),
                                     "--student-init", str(run), "--student", "resnet34", "--out", str(tmp_path / "s")])
    assert init.exit_code == 1 and "holds name=" in init.output and not (tmp_path / "s").exists()
    png = tmp_path / "show.png"
    key = sorted(open_store(str(demo_dir / "cache-ood")).keys())[0]
    shown = CliRunner().invoke(main, ["show", str(demo_dir / "cache-ood"), "--key", key, "--out", str(png), "--run",
                                      str(run)])
    assert shown.exit_code == 0, shown.output
    assert png.stat().st_size > 5_000 and "student-teacher map cosine per view: 0: " in shown.output
