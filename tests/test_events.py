"""The event log: sequence numbers, a bounded buffer, readers told what they missed."""

import pytest
import trio

from zviz._events import EventLog, EventsMissed


async def _take(reader, n):
    return [await reader.__anext__() for _ in range(n)]


@pytest.mark.trio
async def test_a_live_reader_follows_past_the_bound():
    log = EventLog(keep=3)
    r = log.reader()
    got = []
    for i in range(10):
        log.add(i)
        got += await _take(r, 1)
    assert got == list(range(10))  # never blind, however far past `keep`


@pytest.mark.trio
async def test_a_reader_that_fell_behind_is_told_how_many_it_missed():
    log = EventLog(keep=3)
    r = log.reader()
    for i in range(5):
        log.add(i)
    assert await _take(r, 4) == [EventsMissed(2), 2, 3, 4]
    late = log.reader()  # a new reader starts at the first event: told what is gone
    assert await _take(late, 2) == [EventsMissed(2), 2]
    assert log.snapshot() == (2, 3, 4)


@pytest.mark.trio
async def test_readers_wait_for_new_events_and_end_at_close():
    log = EventLog(keep=3)
    got = []

    async def read():
        async for e in log.reader():
            got.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(read)
        await trio.sleep(0.01)
        log.add("a")
        await trio.sleep(0.01)
        log.add("b")
        log.close()
    assert got == ["a", "b"]
    assert str(EventsMissed(7)).startswith("missed 7 events")
