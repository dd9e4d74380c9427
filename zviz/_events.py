"""A sandbox's event log: numbered, bounded, with live readers that never go blind.

Every event gets a sequence number (0, 1, 2, ...). The log keeps the newest
`KEEP` of them; a reader holds the number of the next event it wants, not a
position in the buffer, so trimming the front never moves what it points at.
A reader that fell behind the oldest kept event is handed one `EventsMissed`
with the count it lost, then goes on from the oldest event still kept.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio
import attrs

KEEP = 10_000  # events kept per sandbox (the newest)

E = TypeVar("E")


@attrs.frozen
class EventsMissed:
    """Yielded by `Sandbox.events()` in place of `count` events this reader
    did not read before the sandbox dropped them (it keeps the newest 10,000)."""

    count: int

    def __str__(self) -> str:
        return f"missed {self.count} events (the reader fell behind; the sandbox keeps the newest {KEEP})"


class EventLog(Generic[E]):
    def __init__(self, keep: int = KEEP) -> None:
        self._buf: deque[E] = deque(maxlen=keep)
        self._next = 0  # sequence number of the next event added
        self._added = anyio.Event()
        self._closed = False

    @property
    def _first(self) -> int:
        return self._next - len(self._buf)

    def add(self, event: E) -> None:
        self._buf.append(event)  # a full deque drops its oldest
        self._next += 1
        self._wake()

    def close(self) -> None:
        """No more events: readers end once they have read what is kept."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        ev, self._added = self._added, anyio.Event()
        ev.set()

    def snapshot(self) -> tuple[E, ...]:
        return tuple(self._buf)

    def reader(self) -> EventReader[E]:
        """From the first event ever added (an `EventsMissed` first if it is no
        longer kept), then live."""
        return EventReader(self, 0)


class EventReader(Generic[E]):
    """An async iterator (not a generator: nothing to finalize if abandoned)."""

    def __init__(self, log: EventLog[E], seq: int) -> None:
        self._log = log
        self._seq = seq

    def __aiter__(self) -> EventReader[E]:
        return self

    async def __anext__(self) -> E | EventsMissed:
        log = self._log
        while True:
            first = log._first
            if self._seq < first:
                missed, self._seq = first - self._seq, first
                return EventsMissed(missed)
            if self._seq < log._next:
                event = log._buf[self._seq - first]
                self._seq += 1
                return event
            if log._closed:
                raise StopAsyncIteration
            await log._added.wait()
