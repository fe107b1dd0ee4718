"""Progress in a log file: occasional whole lines, never carriage-return frames; a live bar on a terminal."""

from __future__ import annotations

import io
import time

import pytest
from tqdm import tqdm

from e2kd._progress import LogProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_few_plain_lines_and_a_last_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2KD_PROGRESS_INTERVAL_S", "0.2")
    log = io.StringIO()
    bar = progress(total=40, desc="cache-teacher", unit="sample", file=log, dynamic_ncols=True)
    assert isinstance(bar, LogProgress)
    for _ in range(40):
        bar.update(1)
        time.sleep(0.025)  # 1 s in all: about five lines at 0.2 s
    bar.set_postfix(shards="2/2")
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n") and all(line.strip() for line in lines)
    assert 3 <= len(lines) <= 8, lines  # occasional lines, not a frame per update
    assert all(line.startswith("cache-teacher:") for line in lines)
    assert "40/40" in lines[-1] and "shards=2/2" in lines[-1]  # the last line is the final state
    assert "0/40" not in lines[0]  # no line before any progress


def test_a_bar_that_does_not_stay_leaves_nothing_behind_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2KD_PROGRESS_INTERVAL_S", "30")
    log = io.StringIO()
    for _ in progress(range(50), desc="epoch 1/2", leave=False, file=log):
        pass
    assert log.getvalue() == ""  # short and not kept: the epoch's own summary line says it all


def test_a_terminal_gets_tqdms_live_bar_and_the_mode_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    bar = progress(total=3, file=_Terminal())
    assert type(bar) is tqdm
    bar.close()
    monkeypatch.setenv("E2KD_PROGRESS", "lines")
    forced = progress(total=3, file=_Terminal())
    assert isinstance(forced, LogProgress)
    forced.close()
    monkeypatch.setenv("E2KD_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="E2KD_PROGRESS"):
        progress(total=3)
