"""One body per client operation, two ways to wait: blocking, or awaiting on an event loop.

The Memory client does its I/O on its own threads; an operation only has to *wait* for them. So
each operation is written once, as a generator that yields what it waits for (a
:class:`~concurrent.futures.Future` of the reader thread, or a :class:`Blocking` call such as
"wait until the writer delivered these rows") and is sent back the result. :func:`run_blocking`
drives it on the caller's thread (the synchronous API); :func:`run_async` drives it on an event
loop without blocking it (the async API). Both paths therefore run the same code in the same
order: a seeded client draws the same seeds whichever API the learner uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True)
class Blocking:
    """A call that blocks until something happens elsewhere: made directly by the blocking
    driver, in a worker thread (``asyncio.to_thread``) by the async one."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


Wait = Future[Any] | Blocking
# An operation: yields what it waits for, is sent the result, returns its answer.
Steps = Generator[Wait, Any, _T]


def _block(wait: Wait) -> Any:
    return wait.fn(*wait.args) if isinstance(wait, Blocking) else wait.result()


async def _await(wait: Wait) -> Any:
    if isinstance(wait, Blocking):
        return await asyncio.to_thread(wait.fn, *wait.args)
    return await asyncio.wrap_future(wait)


def run_blocking(steps: Steps[_T]) -> _T:
    """Run an operation on this thread, blocking while it waits."""
    try:
        wait = next(steps)
        while True:
            try:
                result = _block(wait)
            except BaseException as exc:  # delivered where the operation waited
                wait = steps.throw(exc)
            else:
                wait = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(steps: Steps[_T]) -> _T:
    """Run an operation on the running event loop, which keeps running while it waits."""
    try:
        wait = next(steps)
        while True:
            try:
                result = await _await(wait)
            except BaseException as exc:  # delivered where the operation waited
                wait = steps.throw(exc)
            else:
                wait = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
