"""The I/O proxy: pipe fds as async streams (trio natively, asyncio via anyio).

The sandbox's stdin/stdout/stderr are pipes; the supervisor holds the other
ends, non-blocking, and waits on them with `anyio.wait_readable/writable`. A
capped collector keeps at most `limit` bytes and counts the rest, so a program
that floods its output never blocks on a full pipe and never grows our memory.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import anyio

from ._kernel import OwnedFd

CHUNK = 65536


class FdReceiveStream:
    """Read end of a pipe. `receive_some()` returns b"" at EOF."""

    def __init__(self, fd: OwnedFd) -> None:
        os.set_blocking(fd.fd, False)
        self._fd = fd

    async def receive_some(self, max_bytes: int = CHUNK) -> bytes:
        while True:
            if self._fd.closed:
                raise anyio.ClosedResourceError("stream is closed")
            try:
                return os.read(self._fd.fd, max_bytes)
            except BlockingIOError:
                pass
            await anyio.wait_readable(self._fd.fd)

    def __aiter__(self) -> FdReceiveStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive_some()
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self._fd.closed:
            anyio.notify_closing(self._fd.fd)
            self._fd.close()


class FdSendStream:
    """Write end of a pipe. `send_all()` raises BrokenResourceError once the
    sandboxed reader is gone."""

    def __init__(self, fd: OwnedFd) -> None:
        os.set_blocking(fd.fd, False)
        self._fd = fd
        self.bytes_sent = 0

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._fd.closed:
                raise anyio.ClosedResourceError("stream is closed")
            try:
                n = os.write(self._fd.fd, view[:CHUNK])
            except BlockingIOError:
                await anyio.wait_writable(self._fd.fd)
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    raise anyio.BrokenResourceError("the sandboxed process closed its stdin") from None
                raise
            self.bytes_sent += n
            view = view[n:]
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self._fd.closed:
            anyio.notify_closing(self._fd.fd)
            self._fd.close()


class Collector:
    """Keeps the first `limit` bytes of a stream, counts everything, and calls
    `on_overflow` once when the limit is passed."""

    def __init__(self, limit: int | None, on_overflow: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self._on_overflow = on_overflow
        self.chunks: list[bytes] = []
        self.kept = 0
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.limit is None:
            self.chunks.append(data)
            self.kept += len(data)
            return
        room = self.limit - self.kept
        if room > 0:
            part = data[:room]
            self.chunks.append(part)
            self.kept += len(part)
        if self.total > self.limit and self._on_overflow is not None:
            cb, self._on_overflow = self._on_overflow, None
            cb()

    @property
    def truncated(self) -> bool:
        return self.total > self.kept

    def value(self) -> bytes:
        return b"".join(self.chunks)
