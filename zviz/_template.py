"""The host's side of the code-context processes: control channels, the
per-sandbox template interpreter, and the forked children (contexts and
`run_python` calls).

The template is one long-lived command of the sandbox (`python3 -c <driver>`)
whose stdin is a unix socket to us; it imports the preload list once and
forks a child per request. Each child gets its own control socket (sent by
SCM_RIGHTS) and a session of its own. Its host pid comes from the kernel, not
from the child: the first frame it sends carries SCM_PIDFD (SO_PASSPIDFD,
Linux >= 6.5: a pidfd of the sender, race-free) or else SCM_CREDENTIALS
(a pid the kernel translates and that the sender cannot forge), then
pidfd_open. Nothing else from inside is believed: see _contextproto.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import platform
import select
import signal
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from . import _contextproto as proto
from ._errors import CodeContextError
from ._kernel import OwnedFd, notify_closing

if TYPE_CHECKING:
    from ._process import Process

SO_PASSPIDFD = 76  # asm-generic (x86_64, aarch64, riscv64)
SCM_PIDFD = 4
_PASSPIDFD_ARCHES = ("x86_64", "aarch64", "riscv64")
_CRED = struct.Struct("=iII")
READ_CHUNK = 256 * 1024


class ChannelBroken(Exception):
    """The other side broke the protocol or hung up (message: which)."""


class Channel:
    """Our end of a control socket: non-blocking, frames decoded by the
    sans-I/O decoder. Only the first frame is read with recvmsg (for the
    sender's pidfd or credentials); later reads discard any ancillary data."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = proto.Decoder()
        self.closed = False

    @classmethod
    def pair(cls) -> tuple[Channel, OwnedFd]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ours.setblocking(False)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if platform.machine() in _PASSPIDFD_ARCHES:
                with contextlib.suppress(OSError):  # ENOPROTOOPT before Linux 6.5
                    ours.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return cls(ours), OwnedFd(theirs.detach(), "context-ctrl")

    def fileno(self) -> int:
        return self.sock.fileno()

    async def send(self, data: bytes, fds: Sequence[int] = (), timeout: float = 10.0) -> None:
        """Send a request (the fds ride on its first byte)."""
        view = memoryview(data)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with anyio.move_on_after(timeout):
            while view:
                try:
                    n = self.sock.sendmsg([view], rights) if rights else self.sock.send(view)
                except BlockingIOError:
                    await anyio.wait_writable(self.sock)
                    continue
                except OSError as e:
                    name = errno.errorcode.get(e.errno or 0, str(e))
                    raise ChannelBroken(f"the control channel is closed ({name})") from None
                rights = []
                view = view[n:]
            return
        raise ChannelBroken(f"the driver did not read a request for {timeout:g} s")

    def read_hello(self) -> tuple[list[proto.Frame], OwnedFd | None, int]:
        """The first read: frames, and the sender's pidfd (SCM_PIDFD) or pid
        (SCM_CREDENTIALS, -1 if none). BlockingIOError when nothing is there."""
        space = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(_CRED.size) + socket.CMSG_SPACE(4 * 8)
        data, anc, _flags, _addr = self.sock.recvmsg(READ_CHUNK, space)
        pidfd: OwnedFd | None = None
        pid = -1
        for level, kind, blob in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == SCM_PIDFD and len(blob) >= 4 and pidfd is None:
                pidfd = OwnedFd(int.from_bytes(blob[:4], "little", signed=True), "context-pidfd")
            elif kind == socket.SCM_CREDENTIALS and len(blob) >= _CRED.size:
                pid = _CRED.unpack_from(blob)[0]
            elif kind == socket.SCM_RIGHTS:  # not ours to keep: fds from inside are closed unread
                for fd in array.array("i", blob[: len(blob) - len(blob) % 4]):
                    os.close(fd)
        with contextlib.suppress(OSError):  # later frames carry nothing we want
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 0)
        try:
            return self._frames(data), pidfd, pid
        except BaseException:
            if pidfd is not None:
                pidfd.close()
            raise

    def read(self, budget: int = 4 * READ_CHUNK) -> list[proto.Frame]:
        """Whatever whole frames are there now (reads at most `budget` bytes
        per call, so that a flood cannot hold the event loop)."""
        frames: list[proto.Frame] = []
        got = 0
        while got < budget:
            try:
                data = self.sock.recv(READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as e:
                raise ChannelBroken(f"the control channel failed ({e})") from None
            if not data and frames:
                self.closed = True  # its last frames first; the next read says it hung up
                break
            frames += self._frames(data)
            got += len(data)
        return frames

    def _frames(self, data: bytes) -> list[proto.Frame]:
        if not data:
            self.closed = True
            raise ChannelBroken("the driver closed its control channel")
        self.decoder.feed(data)
        out = []
        try:
            while (f := self.decoder.next()) is not None:
                out.append(f)
        except proto.ProtocolError as e:
            raise ChannelBroken(f"the driver sent a bad frame: {e}") from None
        return out

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            notify_closing(self.sock.fileno())
        self.sock.close()


class Child:
    """A forked context or run_python process: its channel, its pidfd and
    host pid (its process group's id: the driver calls setsid)."""

    def __init__(self, chan: Channel, pidfd: OwnedFd, pid: int, python: str,
                 errors: dict[str, str] | None = None) -> None:
        self.errors = errors or {}  # a template's preload failures (module -> error), from its hello
        self.chan = chan
        self.pidfd = pidfd
        self.pid = pid
        self.python = python

    def alive(self) -> bool:
        if self.pidfd.closed:
            return False
        return not select.select([self.pidfd.fd], [], [], 0)[0]

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd.fd, sig)

    def kill(self) -> None:
        """SIGKILL its process group, then it. The group id is its pid; while
        its pidfd says it is alive the pid is not reused, so the group is its
        own (a process that left the group lives on until the template ends)."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd.fd, signal.SIGKILL)

    def close(self) -> None:
        self.kill()
        self.chan.close()
        if not self.pidfd.closed:
            notify_closing(self.pidfd.fd)
        self.pidfd.close()


async def await_hello(chan: Channel, timeout: float, python_hint: str) -> Child:
    """The new child's first frame, with the kernel's word on who sent it."""
    with anyio.move_on_after(timeout):
        while True:
            try:
                frames, pidfd, pid = chan.read_hello()
                break
            except BlockingIOError:
                await anyio.wait_readable(chan.sock)
        try:
            while not frames:
                await anyio.wait_readable(chan.sock)
                frames = chan.read()
            hello = frames[0]
            if hello.kind != "hello" or len(frames) > 1:
                raise ChannelBroken(f"the driver's first frame is {hello.kind!r}, not a lone hello")
            if pidfd is None:
                if pid <= 0:
                    raise ChannelBroken("the kernel gave no sender for the driver's hello")
                try:
                    pidfd = OwnedFd(os.pidfd_open(pid), "context-pidfd")
                except ProcessLookupError:
                    raise ChannelBroken("the context died before it said hello") from None
                from ._zygote import pidfd_pid

                pid = pidfd_pid(pidfd)
            else:
                from ._zygote import pidfd_pid

                pid = pidfd_pid(pidfd)
            if pid <= 0:
                pidfd.close()
                raise ChannelBroken("the context died before it said hello")
        except BaseException:
            if pidfd is not None:
                pidfd.close()
            raise
        return Child(chan, pidfd, pid, str(hello.fields["python"]), dict(hello.fields["errors"]))
    raise ChannelBroken(f"no hello from the driver in {timeout:g} s")


async def wait_frame(chan: Channel, seq: int, kinds: tuple[str, ...], timeout: float) -> proto.Frame:
    """The reply to request `seq` (frames of other requests are dropped, at
    most 1000 of them)."""
    dropped = 0
    with anyio.move_on_after(timeout):
        while True:
            for f in chan.read():
                if f.kind in kinds and f.fields.get("seq") == seq:
                    return f
                dropped += 1
                if dropped > 1000:
                    raise ChannelBroken("the driver sent over 1000 unexpected frames")
            await anyio.wait_readable(chan.sock)
    raise ChannelBroken(f"no reply from the driver in {timeout:g} s")


def raise_broken(reason: str) -> None:
    raise CodeContextError(reason)


class Template:
    """The sandbox's template interpreter for one (python, preload, env):
    a command of the sandbox (`proc`, its Process) and our channel to it."""

    def __init__(self, proc: Process, chan: Channel, python: str) -> None:
        self.proc = proc
        self.chan = chan
        self.python = python
        self._lock = anyio.Lock()
        self._seq = 0

    async def spawn(self, *, once: bool, timeout: float) -> Child:
        """Fork a context (or a one-shot run) off the template. ChannelBroken
        means the template is gone (replace it); CodeContextError that the
        fork failed (the template lives on)."""
        chan, theirs = Channel.pair()
        try:
            async with self._lock:
                self._seq += 1
                seq = self._seq
                try:
                    await self.chan.send(proto.encode({"t": "spawn", "seq": seq, "once": once}), [theirs.fd],
                                         timeout=timeout)
                finally:
                    theirs.close()
                ack = await wait_frame(self.chan, seq, ("ack",), timeout)
            if ack.fields["error"] is not None:
                raise CodeContextError(f"the template could not fork: {str(ack.fields['error'])[:200]}")
            try:
                return await await_hello(chan, timeout, self.python)
            except ChannelBroken as e:  # the child's failure, not the template's: keep ChannelBroken for that
                raise CodeContextError(f"the forked process did not start: {e}") from None
        except BaseException:
            chan.close()
            raise

    def close(self) -> None:
        self.chan.close()
