"""The command line entry point and the README example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from e2kd import __version__
from e2kd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_version() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "explainers" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_readme_example_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                         text=True, check=True, timeout=300)
    assert "'kd'" in out.stdout and "(8, 1, 8, 8) (8, 1, 4, 4)" in out.stdout  # maps fine enough to see


def test_packaged_presets_are_listed_and_shown() -> None:
    assert "demo-digits" in CliRunner().invoke(main, ["config", "list"]).output.split()
    shown = CliRunner().invoke(main, ["config", "show", "demo-digits"])
    assert shown.exit_code == 0 and "teacher: resnet18" in shown.output
    missing = CliRunner().invoke(main, ["config", "show", "nope"])
    assert missing.exit_code == 1 and "not a preset (demo-digits" in missing.output


def test_yaml_keys_are_the_flag_names_and_train_teacher_takes_a_config(tmp_path: Path) -> None:
    from e2kd._config import build_options
    from e2kd.stages._train_student import TrainOptions
    from e2kd.stages._train_teacher import TeacherOptions

    config = tmp_path / "run.yaml"
    config.write_text("lambda: 2.5\nquiet: true\nstudent: resnet18\n")
    opts = build_options(TrainOptions, config, {"data": "d", "out": "o", "cache": "c"})
    assert opts.lam == 2.5 and opts.progress is False and opts.student == "resnet18"
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text("model: resnet18\nnum_classes: 10\nopt: sgd\nweight_decay: 0.0\nwarmup_epochs: 0\n")
    t = build_options(TeacherOptions, teacher, {"data": "d", "out": "o", "lr": 0.1})
    assert (t.opt, t.weight_decay, t.warmup_epochs, t.lr, t.teacher) == ("sgd", 0.0, 0, 0.1, "resnet18")
    bad = CliRunner().invoke(main, ["train-teacher", "--config", str(teacher), "--data", "d", "--out", "o",
                                    "--label-smoothing", "1.5"])
    assert bad.exit_code == 1 and "--label-smoothing must be in [0, 1]" in bad.output
    teacher.write_text("model: resnet18\nnum_classes: 10\nlabel_smoothing: 1.5\n")  # the same range, from YAML
    bad = CliRunner().invoke(main, ["train-teacher", "--config", str(teacher), "--data", "d", "--out", "o"])
    assert bad.exit_code == 1 and "--label-smoothing must be in [0, 1]" in bad.output


def test_help_defaults_of_the_training_commands_are_the_options_defaults() -> None:
    import dataclasses

    from e2kd.stages._train_student import TrainOptions
    from e2kd.stages._train_teacher import TeacherOptions

    for stage, cls in (("train_student", TrainOptions), ("train_teacher", TeacherOptions)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        command = main.commands[stage.replace("_", "-")]
        help_text = {p.name: p.help for p in command.params}
        assert f"[default: {defaults['lr']}]" in help_text["lr"]


def _documentation() -> str:
    """The README and every page of the documentation site."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return "\n".join(page.read_text() for page in pages)


def test_every_command_in_the_readme_and_the_docs_uses_only_options_the_cli_has() -> None:
    """The shell blocks of the README and the docs are checked against the CLI itself, so they cannot drift."""
    import re
    import shlex

    import click

    text = _documentation()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    checked = 0
    for line in lines:
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
            words = words[1:]
        if len(words) < 2 or words[0] != "e2kd":
            continue
        command = main if words[1].startswith("-") else main.commands[words[1]]
        if isinstance(command, click.Group) and command is not main:
            command = command.commands[words[2]]
        names = {name for p in command.params for name in (*p.opts, *p.secondary_opts)} | {"--help"}
        unknown = [w for w in words if w.startswith("--") and w.split("=")[0] not in names]
        assert not unknown, f"docs: {line.strip()!r} uses {unknown}, not options of e2kd {words[1]}"
        checked += 1
    assert checked >= 25


def test_former_flag_names_still_work_hidden_and_conflicts_are_refused(tmp_path: Path) -> None:
    from e2kd._config import build_options
    from e2kd.stages._cache_teacher import CacheTeacherOptions

    help_text = CliRunner().invoke(main, ["cache-teacher", "--help"]).output
    assert "--teacher-checkpoint" in help_text and "--actors" in help_text
    assert "--checkpoint " not in help_text and "--workers" not in help_text and "per-worker" not in help_text
    old = tmp_path / "old.yaml"  # a config written with the former names
    old.write_text("teacher: resnet18\nnum_classes: 3\ncheckpoint: t.safetensors\nworkers: 2\nthreads_per_worker: 2\n")
    opts = build_options(CacheTeacherOptions, old, {"data": "d", "out": "o"})
    assert (opts.teacher_checkpoint, opts.actors, opts.threads_per_actor) == ("t.safetensors", 2, 2)
    both = CliRunner().invoke(main, ["cache-teacher", "--data", "d", "--out", "o", "--teacher", "resnet18",
                                     "--num-classes", "3", "--actors", "1", "--workers", "2"])
    assert both.exit_code == 2 and "--actors is given twice" in both.output


def test_the_cli_reference_page_is_the_help_of_every_command() -> None:
    from e2kd.cli import reference_markdown

    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split("<!-- cli-reference -->\n", 1)[1].split("<!-- /cli-reference -->", 1)[0]
    assert section == reference_markdown(), "docs/cli.md is stale: e2kd cli-reference prints the new reference"


def test_the_readme_is_short_and_its_links_resolve() -> None:
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10 and all((ROOT / link).exists() for link in local), \
        [link for link in local if not (ROOT / link).exists()]
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in {link[len("docs/"):] for link in local if link.startswith("docs/") and link.endswith(".md")}:
        assert page in nav, f"{page} is linked from the README but not in the site's navigation"
