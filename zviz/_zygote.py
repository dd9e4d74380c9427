"""The per-sandbox zygote: the supervisor's side of zviz-init --zygote.

A sandbox's first command spawns, through the C stage, one zviz-init that
stays: pid 1 of the sandbox's pid namespace, inside its user and mount
namespaces, its new root, its Landlock domain and its seccomp filter. Every
command after that is one request on a unix socket: the zygote forks a
run-init, which forks and execs the program, and the reply carries the
run-init's pidfd. A command then costs two forks of a 14 kB static process
and the program's exec, not a new set of namespaces, a new root, a new
seccomp filter and its JIT (measured in docs/performance.md).

What the runs of one sandbox share, and what they do not: see
docs/architecture.md ("One zygote per sandbox").
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
from collections.abc import Sequence

import anyio

from . import _stage
from ._errors import SandboxSetupError
from ._kernel import OwnedFd

# struct zreq (zviz/_abi.h): magic, argc, envc, nrl, len, pad, then MAX_RLIMITS x struct zreq_rl {res, pad, cur, max}
MAX_RLIMITS: int = _stage.MAX_RLIMITS
ZREQ_RL = struct.Struct("=IIQQ")
_HEADER = struct.Struct("=6I" + "IIQQ" * MAX_RLIMITS)
_MAGIC: int = _stage.ZREQ_MAGIC
MAX_REQUEST: int = _stage.ZREQ_MAX_BYTES  # argv + environment, NUL-terminated
_REPLY = struct.Struct("=i")
REPLY_TIMEOUT = 10.0  # a zygote that has not answered by then is wedged, and replaced
SPIN_MS = 1  # how long the reply is awaited without yielding to the event loop


_Cmsg = tuple[int, int, "array.array[int]"]  # (level, type, data) of an SCM_RIGHTS message


class ZygoteGone(Exception):
    """The zygote hung up (it was killed, or the sandbox is closing)."""


_BARRIER = _HEADER.pack(_MAGIC, 0, 0, 0, 0, 0, *([0] * 4 * MAX_RLIMITS))


def encode_request(exe: bytes, argv: Sequence[bytes], envp: Sequence[bytes],
                   rlimits: Sequence[tuple[int, int, int]]) -> bytes:
    """The request's bytes (pure; checked against the zygote's limits)."""
    if len(rlimits) > MAX_RLIMITS:
        raise ValueError(f"at most {MAX_RLIMITS} rlimits")
    strings = b"".join(s + b"\0" for s in (exe, *argv, *envp))
    if len(strings) > MAX_REQUEST:
        raise SandboxSetupError("spawn", errno.E2BIG, None,
                                f"argv and environment take {len(strings)} bytes; a sandbox takes at most "
                                f"{MAX_REQUEST}")
    rl: list[int] = []
    for res, soft, hard in rlimits:
        rl += [res, 0, soft, hard]
    rl += [0, 0, 0, 0] * (MAX_RLIMITS - len(rlimits))
    return _HEADER.pack(_MAGIC, len(argv), len(envp), len(rlimits), len(strings), 0, *rl) + strings


class Zygote:
    """Owns the zygote's control socket and pidfd (the process is our child)."""

    def __init__(self, pid: int, pidfd: OwnedFd, ctrl: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self._ctrl = ctrl
        self._lock = anyio.Lock()  # one request at a time: replies come in order
        self.runs = 0
        self._last_pid = 0

    async def barrier(self) -> None:
        """Return once the zygote has reaped every run-init that is dead by
        now, and killed their orphans. After kill(), a command's run-init is
        dead when its pidfd says so, but what it left is the zygote's to kill:
        the supervisor waits for this before it calls the command over."""
        reply = await self._exchange(_BARRIER, [], expect_fd=False)
        assert reply is None

    async def request(self, payload: bytes, fds: Sequence[int]) -> tuple[OwnedFd, int]:
        """The run-init's pidfd, and its pid in the sandbox's pid namespace."""
        pidfd = await self._exchange(payload, fds, expect_fd=True)
        assert pidfd is not None
        return pidfd, self._last_pid

    async def _exchange(self, payload: bytes, fds: Sequence[int], *, expect_fd: bool) -> OwnedFd | None:
        """One request and its reply (with the run-init's pidfd, or none).

        The zygote answers right after its fork (~50-100 us), so the fast
        path waits for the reply with a poll of at most SPIN_MS on the event
        loop's thread, with no checkpoint (a trip through the event loop, or
        even entering a cancel scope with a deadline, cost ~0.1 ms more,
        measured). But the zygote runs among the sandbox's processes, which
        can starve it; past SPIN_MS the wait becomes a checkpoint, shielded
        (a cancelled caller must not leave a reply behind for the next
        request) and bounded by REPLY_TIMEOUT (then ZygoteGone)."""
        try:  # Lock.acquire always yields (~50 us): try without first
            self._lock.acquire_nowait()
        except anyio.WouldBlock:
            await self._lock.acquire()
        try:
            if self._ctrl.fileno() < 0:  # closed (teardown) while this waited for its turn
                raise ZygoteGone("the zygote is closed")
            view = memoryview(payload)
            rights: list[_Cmsg] = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                view, rights = self._send_some(view, rights)
                if not view:
                    poller = select.poll()
                    poller.register(self._ctrl, select.POLLIN)
                    if poller.poll(SPIN_MS):
                        return self._reply(*self._recv(), expect_fd)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError) as e:
                raise ZygoteGone(str(e) or type(e).__name__) from None
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(REPLY_TIMEOUT):
                    try:
                        while view:
                            await anyio.wait_writable(self._ctrl)
                            view, rights = self._send_some(view, rights)
                        while True:
                            try:
                                return self._reply(*self._recv(), expect_fd)
                            except BlockingIOError:
                                await anyio.wait_readable(self._ctrl)
                    except (BrokenPipeError, ConnectionResetError) as e:
                        raise ZygoteGone(str(e) or type(e).__name__) from None
                    except (anyio.ClosedResourceError, OSError):
                        # The teardown closed the socket under this wait (it reaps a dead zygote and closes
                        # its fds in its own task): gone, as a hang-up. Any other error is not.
                        if self._ctrl.fileno() >= 0:
                            raise
                        raise ZygoteGone("the zygote was closed") from None
                raise ZygoteGone(f"no reply in {REPLY_TIMEOUT:g} s")
            raise AssertionError("unreachable: a shielded scope that is never cancelled swallows nothing")
        finally:
            self._lock.release()

    def _send_some(self, view: memoryview, rights: list[_Cmsg]) -> tuple[memoryview, list[_Cmsg]]:
        """Send what the socket takes now (the fds ride on the first byte)."""
        while view:
            try:
                n = self._ctrl.sendmsg([view], rights) if rights else self._ctrl.send(view)
            except BlockingIOError:
                break
            rights = []
            view = view[n:]
        return view, rights

    def _recv(self) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        data, anc, flags, _addr = self._ctrl.recvmsg(_REPLY.size, socket.CMSG_SPACE(4))
        if flags & socket.MSG_CTRUNC:
            # The kernel could not give us the run-init's pidfd: this process
            # is out of fds (the run goes on unwatched until the zygote reaps it).
            from ._kernel import host_fd_shortage

            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for fd in array.array("i", blob[: len(blob) - len(blob) % 4]):
                        os.close(fd)
            raise host_fd_shortage("zygote-fork", OSError(errno.EMFILE, "MSG_CTRUNC"))
        return data, anc

    def _reply(self, data: bytes, anc: list[tuple[int, int, bytes]], expect_fd: bool) -> OwnedFd | None:
        got = []
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got += array.array("i", blob[: len(blob) - len(blob) % 4]).tolist()
        owned = [OwnedFd(fd, "run-init-pidfd") for fd in got]
        if len(data) != _REPLY.size:
            for o in owned:
                o.close()
            raise ZygoteGone("the zygote hung up")
        (err,) = _REPLY.unpack(data)
        if not expect_fd and err == 0 and not owned:
            return None
        if err < 0 or len(owned) != 1:
            for o in owned:
                o.close()
            code = -err if err < 0 else errno.EIO
            raise SandboxSetupError("zygote-fork", code, None,
                                    "the sandbox could not fork (its process limit reached?)")
        self.runs += 1
        self._last_pid = err  # > 0: the run-init's pid inside (its session's id)
        return owned[0]

    def kill(self) -> None:
        """SIGKILL the zygote: as pid 1 its death takes every process of the
        sandbox with it."""
        from ._kernel import pidfd_kill

        pidfd_kill(self.pidfd)

    def close(self) -> None:
        if self._ctrl.fileno() >= 0:
            anyio.notify_closing(self._ctrl)
        self._ctrl.close()
        self.pidfd.close()


def pidfd_pid(pidfd: OwnedFd) -> int:
    """The pid (in our pid namespace) behind a pidfd, from its fdinfo; -1 once
    the process is gone."""
    try:  # (os-level: Python's io stack around one small read cost ~5 us more, on every command)
        fd = os.open(f"/proc/self/fdinfo/{pidfd.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 4096)
        finally:
            os.close(fd)
        for line in text.splitlines():
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def control_pair() -> tuple[socket.socket, OwnedFd]:
    """(our end, the zygote's end as an fd for the stage to place on fd 3)."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:
        from ._kernel import host_fd_shortage

        raise host_fd_shortage("zygote-control", e) from None
    ours.set_inheritable(False)
    ours.setblocking(False)
    theirs_fd = OwnedFd(theirs.detach(), "zygote-ctrl")
    return ours, theirs_fd


def ns_session(pid: int) -> int:
    """The session id of `pid` in its innermost pid namespace (the sandbox's),
    from /proc/PID/status's NSsid line; -1 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSsid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return -1
