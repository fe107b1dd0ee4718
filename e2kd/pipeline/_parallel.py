"""An ordered, bounded parallel map: decode and render ahead in threads while the caller runs the model.

Pillow's decoders and torch's resize release the GIL, so threads decode in parallel without pickling images
between processes (measured in ``bench/bench_imagenet.py``). Results come back in input order, so the output of
a stage is the same whatever the number of threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` with ``workers`` threads, at most ``ahead`` items in flight (default ``4 × workers``).

    ``workers == 0`` maps inline (no thread). The items are read in the calling thread (I/O stays in order); an
    exception in ``fn`` is raised where its result would have been yielded.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        yield from map(fn, items)
        return
    limit = max(1, ahead if ahead is not None else 4 * workers)
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="e2kd-decode") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= limit:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
