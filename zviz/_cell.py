"""One cell in flight in a code context (see _context): its pipes, its
collectors and its frames, stepped by the caller (`run` or `stream`) one wait
at a time, so that a stream can yield between steps and a cell whose caller
went away can be finished later.

What a cell may cost the host is bounded by the context's Caps: bytes kept
per stream, display bytes and items, frames per cell (an endless stream of
frames breaks the context), bytes over the context's life; time by its
timeout plus the grace period after the interrupt.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import select
import signal
import time
from typing import TYPE_CHECKING, Any

import anyio

from . import _contextproto as proto, _kernel
from ._errors import CodeContextError
from ._execution import DisplayData, Execution, ExecutionError, StreamOutput
from ._kernel import OwnedFd
from ._proxy import Collector, Pacer
from ._template import ChannelBroken, Child

if TYPE_CHECKING:
    from ._context import CodeContext

SPIN_S = 0.002  # how long a cell's first reply is awaited without a trip through the event loop
Event = StreamOutput | DisplayData | Execution


class Cell:
    """One cell in flight: its pipes, collectors and frames, stepped by the
    caller (run or stream) one wait at a time."""

    def __init__(self, ctx: CodeContext, child: Child, seq: int, timeout: float, stream: bool) -> None:
        self.ctx = ctx
        self.child = child
        self.seq = seq
        self.stream = stream
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout if math.isfinite(timeout) else math.inf
        self.kill_at = math.inf
        self.interrupted = False
        self.out = Collector(ctx._caps.output)
        self.err = Collector(ctx._caps.output)
        self.decoders = {"stdout": codecs.getincrementaldecoder("utf-8")("replace"),
                         "stderr": codecs.getincrementaldecoder("utf-8")("replace")}
        self.display: list[dict[str, Any]] = []
        self.display_bytes = 0
        self.display_dropped = 0
        self.frames = 0
        self.pipes: dict[int, tuple[OwnedFd, str]] = {}
        self.ep: select.epoll | None = None
        self.first = True
        self.pacer = Pacer()  # a cell whose output never pauses still lets the event loop run
        self.execution: Execution | None = None
        self.owned = True  # its caller (run, stream) is still stepping it
        self.ended = anyio.Event()

    async def start(self, code: str) -> None:
        out_r, out_w = _kernel.pipe("cell-stdout")
        err_r, err_w = _kernel.pipe("cell-stderr")
        try:
            for r in (out_r, err_r):
                os.set_blocking(r.fd, False)
            self.pipes = {out_r.fd: (out_r, "stdout"), err_r.fd: (err_r, "stderr")}
            self.ep = select.epoll()
            for fd in (self.child.chan.fileno(), out_r.fd, err_r.fd, self.child.pidfd.fd):
                self.ep.register(fd, select.EPOLLIN)
            try:
                await self.child.chan.send(proto.encode({"t": "exec", "seq": self.seq, "code": code}),
                                           [out_w.fd, err_w.fd], timeout=self.ctx._caps.reply_s)
            except ChannelBroken as e:
                if self.child.alive():
                    self.close_fds()
                    self.ended.set()
                    raise self.ctx._break(str(e)) from None
                # it died while idle: the first step sees its pidfd and reports that
        finally:
            out_w.close()
            err_w.close()

    @property
    def finished(self) -> bool:
        return self.execution is not None

    def interrupt(self) -> None:
        if self.execution is None and not self.interrupted:
            self.interrupted = True
            self.kill_at = time.monotonic() + self.ctx._caps.grace_s
            self.child.signal(signal.SIGINT)

    def abandon(self) -> None:
        """The caller left: the cell is interrupted now, finished later."""
        self.owned = False
        if self.execution is None:
            self.interrupt()

    def close_fds(self) -> None:
        for owned, _ in self.pipes.values():
            owned.close()
        self.pipes = {}
        if self.ep is not None:
            _kernel.notify_closing(self.ep.fileno())  # a task waiting on it (the context was closed) wakes up
            self.ep.close()
            self.ep = None

    async def step(self) -> list[Event]:
        """Wait for something (output, a frame, the process's end, the
        deadline) and handle it; sets `execution` at the end."""
        if self.ep is None:
            raise CodeContextError(self._closed_why())
        events: list[Event] = []
        now = time.monotonic()
        if now >= self.deadline and not self.interrupted:
            self.interrupt()
        if now >= self.kill_at:
            await self._lost(f"did not stop within {self.ctx._caps.grace_s:g} s of the interrupt: it was killed")
            return events
        ready = self.ep.poll(0)
        if not ready and self.first:
            ready = self.ep.poll(SPIN_S)  # a fast cell answers in ~0.1 ms: no trip through the event loop
        self.first = False
        if not ready:
            until = self.kill_at if self.interrupted else self.deadline
            with anyio.move_on_after(max(0.0, until - now)):
                try:
                    await anyio.wait_readable(self.ep.fileno())
                except anyio.ClosedResourceError:
                    raise CodeContextError(self._closed_why()) from None
            return events
        await self.pacer.pace()  # (e.g. its output read by a plain consumer of stream(), slower than the cell)
        if self.ep is None:  # (closed meanwhile)
            raise CodeContextError(self._closed_why())
        fds = {fd for fd, _ in ready}
        for fd in list(self.pipes):
            if fd in fds:
                self._read_pipe(fd, events)
        if self.child.chan.fileno() in fds:
            try:
                self._frames(self.child.chan.read(), events)
            except ChannelBroken as e:
                if self.execution is None:
                    await self._channel_broken(str(e))
                return events
        if self.execution is None and self.child.pidfd.fd in fds:
            with contextlib.suppress(ChannelBroken):  # its last words ("done", then exit: run_python)
                self._frames(self.child.chan.read(), events)
            if self.finished:
                return events
            await self._lost("died (a crash, os._exit, a signal or the memory limit)")
        return events

    def _read_pipe(self, fd: int, events: list[Event], budget: int = 1 << 20) -> None:
        owned, name = self.pipes[fd]
        col = self.out if name == "stdout" else self.err
        got = 0
        while got < budget:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:  # every writer closed it
                assert self.ep is not None
                self.ep.unregister(fd)
                owned.close()
                del self.pipes[fd]
                return
            got += len(data)
            before = col.kept
            col.feed(data)
            self.ctx._kept += col.kept - before
            if self.stream and col.kept > before:
                text = self.decoders[name].decode(data[: col.kept - before])
                if text:
                    events.append(StreamOutput(name=name, text=text))

    def _frames(self, frames: list[proto.Frame], events: list[Event]) -> None:
        caps = self.ctx._caps
        for f in frames:
            self.frames += 1
            if self.frames > caps.frames:
                raise ChannelBroken(f"over {caps.frames} frames in one cell")
            if f.fields.get("seq") != self.seq:
                continue  # a leftover of an earlier request (or a forgery): not this cell's
            if f.kind == "display":
                size = sum(len(v) for v in f.blobs.values()) + len(json.dumps(f.fields["data"]))
                if len(self.display) >= caps.display_items or self.display_bytes + size > caps.display:
                    self.display_dropped += 1
                    continue
                self.display_bytes += size
                self.ctx._kept += size
                item = dict(f.fields["data"])
                item.update(f.blobs)
                self.display.append(item)
                events.append(DisplayData(data=item))
            elif f.kind == "done":
                self._finish(f)
                return
        if self.ctx._kept > caps.context:
            raise ChannelBroken(f"over {caps.context} bytes of output over the context's life")

    def _drain(self) -> None:
        for fd in list(self.pipes):
            self._read_pipe(fd, [], budget=2 * self.ctx._caps.output + 65536)

    def _finish(self, done: proto.Frame) -> None:
        self._drain()
        err = done.fields["error"]
        error = None if err is None else ExecutionError(name=err["ename"], value=err["evalue"],
                                                        traceback=tuple(err["traceback"]))
        data = done.fields["result"]
        self._end(Execution(
            stdout=self.out.value().decode("utf-8", "replace"), stderr=self.err.value().decode("utf-8", "replace"),
            result=data.get("text/plain") if data else None, result_data=data, error=error,
            display=tuple(self.display), duration_s=time.monotonic() - self.t0,
            interrupted=bool(done.fields["interrupted"]) or self.interrupted, restarted=False,
            output_dropped=(self.out.total - self.out.kept) + (self.err.total - self.err.kept),
            display_dropped=self.display_dropped))

    def _end(self, ex: Execution) -> None:
        self.close_fds()
        self.execution = ex
        self.ended.set()
        if self.ctx._active is self:
            self.ctx._active = None

    def _closed(self) -> bool:
        """The context, or its whole sandbox, is being closed: its process dies to that."""
        return self.ctx.closed or self.ctx._registry.sandbox_closing()

    def _closed_why(self) -> str:
        if self.ctx._registry.sandbox_closing():
            return "the sandbox was closed while the code context's cell ran"
        return "the code context was closed while its cell ran"

    def _closed_under_us(self) -> CodeContextError:
        self.close_fds()
        self.ended.set()
        return CodeContextError(self._closed_why())

    async def _wait_dead(self, timeout: float) -> None:
        """Up to `timeout` for the process to die (aclose() from another task
        closes the pidfd under us: that is a CodeContextError)."""
        if self._closed():
            raise self._closed_under_us()
        try:
            with anyio.move_on_after(timeout):
                await anyio.wait_readable(self.child.pidfd.fd)
        except (anyio.ClosedResourceError, ValueError):
            raise self._closed_under_us() from None

    async def _channel_broken(self, reason: str) -> None:
        # A dead process closes its channel too: that is a crash, not a hostile driver.
        await self._wait_dead(0.2)
        if not self.child.alive():
            await self._lost("died (a crash, os._exit, a signal or the memory limit)")
            return
        self.close_fds()
        self.ended.set()
        if self.ctx._active is self:
            self.ctx._active = None
        raise self.ctx._break(reason)

    async def _lost(self, why: str) -> None:
        """The process is gone (or is killed now): report, and restart from the template."""
        if self._closed():
            raise self._closed_under_us()
        self._drain()
        self.child.kill()
        await self._wait_dead(2.0)  # SIGKILL is delivered at once; dying takes a moment
        restarted = await self.ctx._replace_child()
        what = "the context was restarted from its template: every variable was lost" if restarted else (
            "nothing was kept" if self.ctx._oneshot else f"and it could not restart ({self.ctx.broken})")
        name = "ContextKilled" if self.interrupted and "interrupt" in why else "ContextDied"
        self._end(Execution(
            stdout=self.out.value().decode("utf-8", "replace"), stderr=self.err.value().decode("utf-8", "replace"),
            error=ExecutionError(name=name, value=f"the cell's process {why}; {what}"),
            display=tuple(self.display), duration_s=time.monotonic() - self.t0, interrupted=self.interrupted,
            restarted=restarted, output_dropped=(self.out.total - self.out.kept) + (self.err.total - self.err.kept),
            display_dropped=self.display_dropped))
