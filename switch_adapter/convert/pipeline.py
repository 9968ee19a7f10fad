"""Run a converter's per-tensor jobs on a few threads, with their results handed back in order.

Reading a tensor (positional reads), subtracting, and the codec's kernels release the GIL, so the threads overlap
reading one tensor with encoding another. The memory the jobs in flight may hold together is bounded: a job starts
only when its bytes fit in the caller's budget next to the running ones, or when nothing else runs.
"""

from __future__ import annotations

import collections
import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .._workers import default_workers

Job = TypeVar("Job")
Result = TypeVar("Result")


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (reference counting still frees everything).

    A conversion builds thousands of short-lived objects (peft's adapter injected into a meta model, read to plan the
    file). With the collector running, young collections promote them while they live, and the promotions trigger
    collections of the whole heap, which in a process holding torch and transformers take about 0.3 s each (every
    other conversion). Paused, they die young. The collector's previous state is restored afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_in_order(
    jobs: Iterable[Job],
    work: Callable[[Job], Result],
    cost: Callable[[Job], int],
    budget: int,
    workers: int | None = None,
) -> Iterator[tuple[Job, Result]]:
    """``(job, work(job))`` for every job, in the order of ``jobs``, computed on up to ``workers`` threads.

    A job of ``cost(job)`` bytes starts when the costs of the jobs in flight plus its own stay within ``budget``,
    or when no job is in flight. An error in ``work`` is raised when its job's turn comes; the jobs not started by
    then are cancelled and the running ones finish before it propagates. With one worker the jobs run one by one in
    this thread.
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1:
        for job in jobs:
            yield job, work(job)
        return
    pending: collections.deque[tuple[Job, int, Future]] = collections.deque()
    in_flight = 0
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="switch-convert")
    try:
        for job in jobs:
            size = max(0, int(cost(job)))
            while pending and (len(pending) >= workers + 1 or in_flight + size > budget):
                done, done_size, future = pending.popleft()
                in_flight -= done_size
                yield done, future.result()
            pending.append((job, size, executor.submit(work, job)))
            in_flight += size
        while pending:
            done, done_size, future = pending.popleft()
            in_flight -= done_size
            yield done, future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
