"""Run a coroutine eagerly: most handlers finish without ever suspending
(the memory engine answers at once), so making a Task for each would cost
more than the work. ``start`` runs the first step inline; only a coroutine
that really suspends is finished inside a Task.
"""
from __future__ import annotations

import asyncio
from typing import Any
from collections.abc import Callable, Coroutine

__all__ = ["start", "begin"]

Done = Callable[[Any, BaseException | None], None]


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Drive ``coro`` on from where its first step suspended."""
    while True:
        if yielded is None:
            await asyncio.sleep(0)  # a bare yield: give the loop one turn
        else:
            # What Task.__step does with a yielded future: take over the
            # "blocking" mark, then wait for it; the coroutine sees the outcome.
            yielded._asyncio_future_blocking = False
            try:
                await yielded
            except BaseException:
                pass
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            return done.value


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], done: Done) -> bool:
    """Run ``coro``; call ``done(result, error)`` when it ends. Returns True
    when it finished inline (``done`` has been called already)."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        done(stop.value, None)
        return True
    except Exception as exc:  # handlers report their own errors; this is a bug
        done(None, exc)
        return True
    task = loop.create_task(_finish(coro, yielded))
    task.add_done_callback(lambda t: done(None, t.exception()) if t.exception() else done(t.result(), None))
    return False


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
