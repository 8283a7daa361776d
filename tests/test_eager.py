"""broker.eager: inline when a coroutine does not suspend, a task when it does."""
import asyncio

import pytest

from broker import eager


async def immediate(value):
    return value


async def suspends(value):
    await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.sleep(0.01, value), 1)  # a real future, via wait_for
    return value


async def fails_later():
    await asyncio.sleep(0.01)
    raise ValueError("boom")


def run(coro_factory):
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        inline = eager.start(loop, coro_factory(), lambda r, e: done.set_result((r, e)))
        return inline, await done
    return asyncio.run(main())


def test_inline_when_it_never_suspends():
    inline, (result, error) = run(lambda: immediate(7))
    assert inline is True and result == 7 and error is None


def test_finished_in_a_task_when_it_suspends():
    inline, (result, error) = run(lambda: suspends("late"))
    assert inline is False and result == "late" and error is None


@pytest.mark.parametrize("factory", [fails_later])
def test_errors_reach_done(factory):
    inline, (result, error) = run(factory)
    assert inline is False and isinstance(error, ValueError)
