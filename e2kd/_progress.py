"""Progress that suits where it is written: a live tqdm bar on a terminal, occasional plain lines in a log file.

A cluster job's stderr is a file: tqdm's carriage-return frames would pile up there as one endless line. When
stderr is not a terminal, :func:`progress` gives a :class:`LogProgress` instead — the same tqdm interface, a whole
line at most every ``E2KD_PROGRESS_INTERVAL_S`` seconds (default 30) and, for a bar that stays (``leave``), one when
it closes. ``E2KD_PROGRESS=lines`` or ``bar`` forces either.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

__all__ = ["progress", "LogProgress", "log_interval"]

#: Seconds between two progress lines in a log, unless ``E2KD_PROGRESS_INTERVAL_S`` says otherwise.
DEFAULT_INTERVAL_S = 30.0


def log_interval() -> float:
    """Seconds between progress lines in a log (``E2KD_PROGRESS_INTERVAL_S``, default 30)."""
    value = os.environ.get("E2KD_PROGRESS_INTERVAL_S", "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"E2KD_PROGRESS_INTERVAL_S={value!r} is not a number of seconds") from None


class LogProgress(tqdm):
    """tqdm for log files: a plain line (no carriage return, no bar redrawn in place) at most every ``interval``
    seconds once there is progress, and a last one when a bar with ``leave`` closes."""

    def __init__(self, *args: Any, interval: float | None = None, **kwargs: Any) -> None:
        every = log_interval() if interval is None else interval
        kwargs.pop("dynamic_ncols", None)
        kwargs.update(mininterval=every, maxinterval=max(every, 0.1), miniters=1, ncols=100)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or (msg is None and self.n == 0):  # a clear request, or nothing done yet: no line
            return False
        self.fp.write((self.__str__() if msg is None else msg).strip() + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        kept: bool | None = getattr(self, "leave", None)
        leave = (abs(self.pos) == 0) if kept is None else kept
        last = self.__str__() if leave and self.n else None
        self.leave = False  # tqdm's own close then only clears, which a log has no use for
        super().close()
        if last is not None:
            self.fp.write(last.strip() + "\n")
            self.fp.flush()


def progress(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm progress bar (same arguments) on a terminal; a :class:`LogProgress` where stderr (or ``file``) is a
    file or a pipe."""
    mode = os.environ.get("E2KD_PROGRESS", "").lower()
    if mode not in ("", "bar", "lines"):
        raise ValueError(f"E2KD_PROGRESS={mode!r}: use 'bar' or 'lines'")
    stream = kwargs.get("file") or sys.stderr
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    if mode == "bar" or (not mode and terminal):
        return tqdm(*args, **kwargs)
    return LogProgress(*args, **kwargs)
