"""broker.eager: inline when a coroutine does not suspend, stepped on from future callbacks when it does."""
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


def test_finished_later_when_it_suspends():
    inline, (result, error) = run(lambda: suspends("late"))
    assert inline is False and result == "late" and error is None


@pytest.mark.parametrize("factory", [fails_later])
def test_errors_reach_done(factory):
    inline, (result, error) = run(factory)
    assert inline is False and isinstance(error, ValueError)


async def fails_at_once():
    raise ValueError("at once")


async def catches_a_failed_future():
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.call_later(0.01, future.set_exception, KeyError("k"))
    try:
        await future
    except KeyError:
        return "caught"


def test_an_error_before_any_suspension_is_reported_inline():
    inline, (result, error) = run(fails_at_once)
    assert inline is True and result is None and isinstance(error, ValueError)


def test_a_failed_future_is_seen_by_the_coroutine_that_awaited_it():
    inline, (result, error) = run(catches_a_failed_future)
    assert inline is False and result == "caught" and error is None


async def waits_on(future):
    return await future


def test_a_suspended_coroutine_makes_no_task_and_sees_a_cancelled_future():
    async def main():
        loop = asyncio.get_running_loop()
        future, done = loop.create_future(), loop.create_future()
        tasks_before = len(asyncio.all_tasks())
        inline = eager.start(loop, waits_on(future), lambda r, e: done.set_result((r, e)))
        assert inline is False and len(asyncio.all_tasks()) == tasks_before
        future.cancel()
        return await done

    result, error = asyncio.run(main())
    assert result is None and isinstance(error, asyncio.CancelledError)
