"""The README's walkthrough, run as written (in an empty directory, at tiny sizes): it cannot drift from the tool."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from e2kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: what makes the walkthrough tiny: smaller shards (the README's brace patterns then pick fewer images), one epoch
TINY = {"make-dataset": {"--shard-size": "100"}, "train-teacher": {"--epochs": "1", "--batch-size": "32"},
        "train-student": {"--epochs": "1", "--steps-per-epoch": "1", "--batch-size": "16"}}


def _readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(ln, comments=True) for ln in lines if ln.startswith("e2kd ") and "s3://" not in ln]


def _tiny(words: list[str]) -> list[str]:
    words = list(words)
    for flag, value in TINY.get(words[1], {}).items():
        if flag in words:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return words


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert [w[1] for w in commands][:3] == ["make-dataset", "train-teacher", "cache-teacher"]
    runner = CliRunner()
    for words in commands:
        words = _tiny(words)
        if any(w.startswith("$(") for w in words):  # show --key "$(e2kd inspect STORE --keys | head -1)"
            store = words[2]
            first = runner.invoke(main, ["inspect", store, "--keys"]).output.splitlines()[0]
            words = [first if w.startswith("$(") else w for w in words]
        result = runner.invoke(main, words[1:])
        assert result.exit_code == 0, f"$ {shlex.join(words)}\n{result.output[-2000:]}"
    for path in ("teacher/teacher.safetensors", "cache/manifest.json", "cache-val/manifest.json",
                 "cache-ood/manifest.json", "runs/e2kd/student.safetensors", "show.png", "curves.png"):
        assert (tmp_path / path).exists(), path
