"""Run a coroutine eagerly: most handlers finish without ever suspending
(the memory engine answers at once), so making a Task for each would cost
more than the work. ``start`` runs the first step inline; a coroutine that
really suspends (a request to another shard) is stepped on from the done
callbacks of the futures it waits on, still without a Task.
"""
from __future__ import annotations

import asyncio
from typing import Any
from collections.abc import Callable, Coroutine

__all__ = ["start", "begin"]

Done = Callable[[Any, BaseException | None], None]


class _Steps:
    """Drives a coroutine on from where it suspended, as ``Task.__step``
    does, but without a Task: no entry in asyncio's task set (a WeakSet
    whose removals showed in profiles), no wrapper coroutine, no extra
    loop callback to report the end. Each step runs when the future the
    coroutine waits on is done (it then sees that future's outcome)."""

    __slots__ = ("loop", "coro", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], done: Done) -> None:
        self.loop, self.coro, self.done = loop, coro, done

    def wait(self, yielded: Any) -> None:
        if yielded is None:
            self.loop.call_soon(self.step)  # a bare yield: give the loop one turn
        else:
            yielded._asyncio_future_blocking = False  # taken over, as Task.__step does
            yielded.add_done_callback(self.step)

    def step(self, _: object = None) -> bool:
        """Run the coroutine to its next suspension; True when it ended."""
        try:
            yielded = self.coro.send(None)
        except StopIteration as stop:
            self.done(stop.value, None)
        except (Exception, asyncio.CancelledError) as exc:  # an awaited future was cancelled, too
            self.done(None, exc)
        else:
            self.wait(yielded)
            return False
        return True


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], done: Done) -> bool:
    """Run ``coro``; call ``done(result, error)`` when it ends. Returns True
    when it finished inline (``done`` has been called already)."""
    return _Steps(loop, coro, done).step()


def begin(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """``coro``'s first step now, the rest as ``start`` runs it: a future of
    its outcome. Where ``asyncio.gather`` would make a Task per coroutine
    (first step on the next loop turn), work queued by those first steps
    (a request to a home shard, a Redis call) keeps the order of the calls."""
    future: asyncio.Future[Any] = loop.create_future()

    def done(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    start(loop, coro, done)
    return future
