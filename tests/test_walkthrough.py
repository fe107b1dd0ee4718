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


def _my_photos(root: Path, classes: int = 3, per_class: int = 16) -> None:
    """"Your own images": an image folder ``root/<class>/<image>.png`` of real digits (64 px, RGB)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        (root / f"digit-{c}").mkdir(parents=True)
        images = digits.images[digits.target == c][:per_class]
        for i, image in enumerate(images):
            grey = Image.fromarray(np.uint8(image * 255 / 16)).resize((64, 64), Image.BILINEAR)
            grey.convert("RGB").save(root / f"digit-{c}" / f"{i:03d}.png")


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _my_photos(tmp_path / "my-photos")
    commands = _readme_commands()
    steps = [w[1] for w in commands if not w[1].startswith("-")]
    assert steps[:3] == ["make-dataset", "train-teacher", "cache-teacher"] and "train-student" in steps[3:]
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
                 "cache-ood/manifest.json", "runs/e2kd/student.safetensors", "show.png", "curves.png",
                 "my-teacher/teacher.safetensors", "my-cache/manifest.json", "my-student/student.safetensors"):
        assert (tmp_path / path).exists(), path
