"""The I/O proxy: pipe fds as async streams (trio natively, asyncio via anyio).

The sandbox's stdin/stdout/stderr are pipes; the supervisor holds the other
ends, non-blocking, and waits on them with `anyio.wait_readable/writable`. A
capped collector keeps at most `limit` bytes and counts the rest, so a program
that floods its output never blocks on a full pipe and never grows our memory.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections import Counter
from collections.abc import Callable

import anyio
import anyio.abc

from ._errors import SandboxClosedError
from ._kernel import OwnedFd

CHUNK = 65536


def _closed_error(by_sandbox: bool) -> Exception:
    """A stream used after its close (or closed while a task waited on it)."""
    if by_sandbox:
        return SandboxClosedError("the sandbox was closed (aclose()): its processes were killed and their "
                                  "streams closed")
    return anyio.ClosedResourceError("stream is closed")


class FdReceiveStream(anyio.abc.ByteReceiveStream):
    """Read end of a pipe: anyio's `ByteReceiveStream` (`receive()` raises
    `anyio.EndOfStream` at EOF) and trio's `ReceiveStream` (`receive_some()`
    returns b"" at EOF). With a `cap` (the policy's `limits.output`), bytes
    past it are not delivered: `on_overflow` is called once (the sandbox kills
    the process) and the stream ends there."""

    def __init__(self, fd: OwnedFd, cap: int | None = None, counts: Counter[str] | None = None,
                 key: str = "") -> None:
        os.set_blocking(fd.fd, False)
        self._fd = fd
        self._cap = cap
        self._counts = counts  # the sandbox's byte counts, kept as bytes are delivered
        self._key = key
        self.bytes_received = 0
        self.truncated = False
        self.on_overflow: Callable[[], None] | None = None
        self.sandbox_closed = False  # closed by its sandbox's teardown (then SandboxClosedError)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """trio's ReceiveStream: at most `max_bytes` (default 64 KiB); b"" at EOF."""
        if max_bytes is None:
            max_bytes = CHUNK
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, not {max_bytes!r}")
        while True:
            if self._fd.closed:
                raise _closed_error(self.sandbox_closed)
            if self.truncated:
                await anyio.lowlevel.checkpoint()
                return b""
            try:
                data = os.read(self._fd.fd, max_bytes)
            except BlockingIOError:
                try:
                    await anyio.wait_readable(self._fd.fd)
                except anyio.ClosedResourceError:
                    raise _closed_error(self.sandbox_closed) from None
                continue
            if self._cap is not None and self.bytes_received + len(data) > self._cap:
                data = data[: self._cap - self.bytes_received]
                self.truncated = True
                cb, self.on_overflow = self.on_overflow, None
                if cb is not None:
                    cb()
            self.bytes_received += len(data)
            if self._counts is not None:
                self._counts[self._key] += len(data)
            await anyio.lowlevel.checkpoint()
            if not data and not self.truncated:
                return b""
            if data:
                return data

    async def receive(self, max_bytes: int = CHUNK) -> bytes:
        """anyio's ByteReceiveStream: at most `max_bytes`; `anyio.EndOfStream` at EOF."""
        data = await self.receive_some(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

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


class FdSendStream(anyio.abc.ByteSendStream):
    """Write end of a pipe: anyio's `ByteSendStream` (`send()`) and trio's
    `SendStream` (`send_all()`). Raises BrokenResourceError once the sandboxed
    reader is gone (SandboxClosedError when `closing()` says its sandbox is
    being closed: then the close killed the reader, not the program's doing)."""

    def __init__(self, fd: OwnedFd, counts: Counter[str] | None = None, key: str = "",
                 closing: Callable[[], bool] | None = None) -> None:
        os.set_blocking(fd.fd, False)
        self._closing = closing
        self._fd = fd
        self._counts = counts  # the sandbox's byte counts (run() writes the pipe itself and counts there)
        self._key = key
        self.bytes_sent = 0
        self.sandbox_closed = False  # closed by its sandbox's teardown (then SandboxClosedError)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """trio's SendStream: write all of `data`."""
        view = memoryview(data).cast("B")
        while view:
            if self._fd.closed:
                raise _closed_error(self.sandbox_closed)
            try:
                n = os.write(self._fd.fd, view[:CHUNK])
            except BlockingIOError:
                try:
                    await anyio.wait_writable(self._fd.fd)
                except anyio.ClosedResourceError:
                    raise _closed_error(self.sandbox_closed) from None
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    if self._closing is not None and self._closing():  # (the close's SIGKILL came first)
                        raise _closed_error(True) from None
                    raise anyio.BrokenResourceError("the sandboxed process closed its stdin") from None
                raise
            self.bytes_sent += n
            if self._counts is not None:
                self._counts[self._key] += n
            view = view[n:]
        await anyio.lowlevel.checkpoint()

    async def send(self, item: bytes) -> None:
        """anyio's ByteSendStream: write all of `item`."""
        await self.send_all(item)

    async def wait_send_all_might_not_block(self) -> None:
        """trio's SendStream: return when the pipe has room."""
        if self._fd.closed:
            raise _closed_error(self.sandbox_closed)
        try:
            await anyio.wait_writable(self._fd.fd)
        except anyio.ClosedResourceError:
            raise _closed_error(self.sandbox_closed) from None

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self._fd.closed:
            anyio.notify_closing(self._fd.fd)
            self._fd.close()


def register_with_trio() -> None:
    """Make the streams trio's stream ABCs too, by registration (their
    metaclass is ABCMeta like anyio's; inheriting from both would mix two
    AsyncResource bases). Called when trio is the running loop (_lifecycle),
    or here when trio is loaded already: importing zviz never imports trio
    (~60 ms, half the CLI's start-up), so an asyncio caller never pays for it."""
    import trio

    trio.abc.ReceiveStream.register(FdReceiveStream)
    trio.abc.SendStream.register(FdSendStream)


if "trio" in sys.modules:
    register_with_trio()


class Pacer:
    """For a loop that handles events as long as some are ready: `pace()` lets
    the event loop run once `EVERY_S` has passed since it last did. Output
    that never pauses (a command that keeps its pipe from running dry, faster
    than its reader) always has an event ready: without it such a loop held
    the whole event loop (every other sandbox, a close from another task, its
    own timeout) until the output ended (`run()`'s loop, a code context's cell)."""

    EVERY_S = 0.005

    def __init__(self) -> None:
        self._last = time.monotonic()

    async def pace(self) -> None:
        if time.monotonic() - self._last > self.EVERY_S:
            await anyio.lowlevel.checkpoint()
            self._last = time.monotonic()


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
