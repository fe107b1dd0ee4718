"""Options declared once: one dataclass field gives a stage its flag (type, help with the default, range, former
names) and its YAML key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from e2kd._config import build_options
from e2kd._options import check_options, click_options, option


@dataclass
class _Toy:
    data: str = option(help="Input shards.")
    steps: int = option(10, help="Steps to run", lo=1, former=("--iterations",))
    rate: float = option(0.5, help="A rate", lo=0, hi=1)
    mode: str = option("fast", help="How", choices=("fast", "exact"))
    scale: tuple[float, float] = option((0.1, 1.0), help="A range")
    keep: bool = option(False, help="Keep it.")
    progress: bool = option(True, cli=False)

    def __post_init__(self) -> None:
        check_options(self)


@click.command()
@click_options(_Toy)
@click.option("--config")
def _toy_cmd(config: str | None, **flags: object) -> None:
    from e2kd._options import former_names, take_former

    click.echo(repr(build_options(_Toy, config, take_former(dict(flags)))))
    assert former_names(_Toy) == {"iterations": "steps"}


def test_one_field_is_one_flag_with_its_default_range_and_former_name(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(_toy_cmd, ["--help"]).output
    for shown in ("--steps INTEGER", "Steps to run  [default: 10]  [x>=1]", "--rate FLOAT",
                  "[0<=x<=1]", "--mode [fast|exact]", "[default: fast]", "--scale FLOAT...", "[default: 0.1 1.0]",
                  "--keep / --no-keep"):
        assert shown in help_text, shown
    assert "--iterations" not in help_text and "--progress" not in help_text  # former name hidden, no flag
    out = runner.invoke(_toy_cmd, ["--data", "d", "--iterations", "3", "--scale", "0.2", "0.9", "--keep"])
    assert out.exit_code == 0, out.output
    assert "_Toy(data='d', steps=3, rate=0.5, mode='fast', scale=(0.2, 0.9), keep=True, progress=True)" in out.output
    bad = runner.invoke(_toy_cmd, ["--data", "d", "--steps", "0"])  # a flag meets its range as YAML does
    assert isinstance(bad.exception, ValueError) and "--steps must be in [1, inf], got 0" in str(bad.exception)
    config = tmp_path / "toy.yaml"
    config.write_text("iterations: 4\nmode: exact\n")  # YAML keys: the field names, former names too
    out = runner.invoke(_toy_cmd, ["--data", "d", "--config", str(config)])
    assert "steps=4" in out.output and "mode='exact'" in out.output
    config.write_text("rate: 1.5\n")
    with pytest.raises(ValueError, match=r"--rate must be in \[0, 1\], got 1.5"):
        build_options(_Toy, config, {"data": "d"})  # YAML values meet the same declared range
    config.write_text("mode: slow\n")
    with pytest.raises(ValueError, match="--mode must be one of fast, exact"):
        build_options(_Toy, config, {"data": "d"})


def test_train_teacher_is_declared_by_its_options_class() -> None:
    from e2kd.cli import main
    from e2kd.stages._options import TeacherOptions

    command = main.commands["train-teacher"]
    flags = {p.name for p in command.params if not p.hidden}
    fields = {f.name for f in dataclasses.fields(TeacherOptions) if f.name != "progress"}
    assert flags == fields | {"config", "quiet"}
    hidden = {opt for p in command.params if p.hidden for opt in p.opts}
    assert hidden == {"--model", "--model-kwargs"}  # the former names, still accepted
    help_text = {p.name: p.help or "" for p in command.params}
    for f in dataclasses.fields(TeacherOptions):
        if f.name in help_text and f.default not in (None, dataclasses.MISSING, False):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert f"[default: {shown}" in help_text[f.name] or f.name == "flip_p", (f.name, help_text[f.name])


def test_train_student_is_declared_by_its_options_class_and_keeps_secrets_out_of_its_repr() -> None:
    from e2kd.cli import main
    from e2kd.losses import EXPL_RESOLUTIONS
    from e2kd.stages._options import EXPL_RESOLUTIONS as DECLARED
    from e2kd.stages._options import TrainOptions

    command = main.commands["train-student"]
    flags = {p.name for p in command.params if not p.hidden}
    assert flags == {f.name for f in dataclasses.fields(TrainOptions) if f.name != "progress"} | {"config", "quiet"}
    assert {"--lambda", "--cache", "--expect-cache-id"} <= {o for p in command.params for o in p.opts}
    assert DECLARED == EXPL_RESOLUTIONS
    opts = TrainOptions(data="d", student="s", out="o", cache="c", storage_options={"secret": "hunter2"})
    assert "hunter2" not in repr(opts)
    with pytest.raises(ValueError, match=r"--temperature must be in \(0, inf\], got 0"):
        TrainOptions(data="d", student="s", out="o", cache="c", temperature=0)


def test_cache_teacher_is_declared_by_its_options_class_with_its_former_names(tmp_path: Path) -> None:
    from e2kd.cli import main
    from e2kd.stages._options import CacheTeacherOptions

    command = main.commands["cache-teacher"]
    shown = {p.name for p in command.params if not p.hidden}
    fields = {f.name for f in dataclasses.fields(CacheTeacherOptions) if f.name not in ("progress", "topk")}
    assert shown == (fields - {"format"}) | {"fmt", "config", "quiet", "teacher_run"}  # --format's parameter: fmt
    hidden = {opt for p in command.params if p.hidden for opt in p.opts}
    assert hidden == {"--checkpoint", "--workers", "--gpus-per-worker", "--threads-per-worker", "--topk"}
    old = tmp_path / "old.yaml"  # former names as YAML keys
    old.write_text("teacher: resnet18\nnum_classes: 3\ncheckpoint: t.safetensors\nworkers: 2\n")
    opts = build_options(CacheTeacherOptions, old, {"data": "d", "out": "o"})
    assert (opts.teacher_checkpoint, opts.actors) == ("t.safetensors", 2)
    with pytest.raises(ValueError, match="--format must be one of"):
        build_options(CacheTeacherOptions, old, {"data": "d", "out": "o", "format": "parquet"})


def test_cache_teacher_flags_reach_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """--format (parameter fmt) and a former name (--workers) arrive in CacheTeacherOptions through the command."""
    import e2kd.stages._cache_teacher as stage
    from e2kd.cli import main

    seen = []

    def fake(opts):  # noqa: ANN001, ANN202
        seen.append(opts)
        raise ValueError("stopped here")

    monkeypatch.setattr(stage, "run_cache_teacher", fake)
    result = CliRunner().invoke(main, ["cache-teacher", "--data", "d", "--out", "o", "--teacher", "resnet18",
                                       "--num-classes", "3", "--random-teacher", "--format", "wds", "--workers", "2"])
    assert result.exit_code == 1 and "stopped here" in result.output
    assert (seen[0].format, seen[0].actors, seen[0].random_teacher) == ("wds", 2, True)
