"""Worker processes for data preparation: how many are worth starting, and an ordered map over
them that fails at once when one of them dies."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from jp_peft.data.errors import WorkerError


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def useful_workers(requested: int, cores: int, chunks_ahead: int, input_ended: bool) -> tuple[int, str]:
    """Workers worth starting: no more than the cores, nor than the chunks of work a short input has.
    Returns (count, why), `why` explaining a count below the request ("" otherwise)."""
    workers, why = requested, []
    if workers > cores:
        workers = cores
        why.append(f"{cores} usable cores")
    if input_ended and workers > chunks_ahead:
        workers = max(1, chunks_ahead)
        why.append(f"the input is {chunks_ahead} chunk{'s' if chunks_ahead != 1 else ''} of work")
    return workers, ", ".join(why)


def map_in_workers(fn: Callable, items: Iterable, workers: int, initializer: Callable,
                   initargs: tuple[Any, ...]) -> Iterator[Any]:
    """fn(item) for every item, in input order, in `workers` forked processes.

    concurrent.futures rather than multiprocessing.Pool: Pool replaces a worker that dies (or whose
    initializer fails) and waits forever for its result; an executor reports it (BrokenProcessPool),
    which becomes WorkerError here. At most two items per worker are in flight, so memory does not
    grow with the input. Closing the iterator early, or an error, stops the workers at once
    (SIGTERM to each: they may be in the middle of a long item, a whole shard).
    """
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=initializer,
                               initargs=initargs)
    in_flight: deque = deque()
    finished = False
    try:
        for item in items:
            in_flight.append(pool.submit(fn, item))
            if len(in_flight) >= 2 * workers:
                yield _result(in_flight.popleft())
        while in_flight:
            yield _result(in_flight.popleft())
        finished = True
    finally:
        if not finished:  # an error, SIGTERM or an early close: stop the workers now, not after their items
            for process in list((pool._processes or {}).values()):
                if process.is_alive():
                    process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool:
        raise WorkerError("a worker process died (killed, out of memory, or it could not start); nothing "
                          "was written. Rerun with --workers 1 to see its error.") from None
