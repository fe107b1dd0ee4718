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
    assert "'kd'" in out.stdout and "(8, 1, 2, 2) (8, 1, 4, 4)" in out.stdout
