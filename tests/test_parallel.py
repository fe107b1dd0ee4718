"""The ordered parallel map that decodes ahead of the teacher: order, bounds, errors."""

from __future__ import annotations

import threading
import time

import pytest

from e2kd.pipeline._parallel import ordered_map


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_come_back_in_input_order_whatever_the_threads(workers: int) -> None:
    def slow_for_even(i: int) -> int:  # later items finish first
        time.sleep(0.01 if i % 2 == 0 else 0)
        return i * i

    assert list(ordered_map(slow_for_even, range(40), workers)) == [i * i for i in range(40)]


def test_at_most_ahead_items_are_in_flight_and_threads_overlap() -> None:
    started: list[int] = []
    running, peak = 0, 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            started.append(i)
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return i

    it = ordered_map(work, range(100), workers=4, ahead=6)
    assert next(it) == 0
    assert len(started) <= 6  # bounded read-ahead: the input is not drained
    assert list(it) == list(range(1, 100)) and peak >= 2


def test_an_error_is_raised_where_its_result_would_be() -> None:
    def fail_at_five(i: int) -> int:
        if i == 5:
            raise ValueError("bad item 5")
        return i

    out = []
    with pytest.raises(ValueError, match="bad item 5"):
        for value in ordered_map(fail_at_five, range(10), workers=2):
            out.append(value)
    assert out == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=">= 0"):
        list(ordered_map(fail_at_five, range(3), workers=-1))
