"""The supervisor: answers seccomp user notifications, on trio (or asyncio).

One `Supervisor` per sandbox, started with `task_group.start()`: `open_sandbox`
returns only once it is live. Each spawned command brings its own listener fd
(one filter per spawn); the supervisor serves each in a child task until the
kernel hangs the listener up (POLLHUP: no task of that filter is left).

It answers only rare calls (nothing on the hot path is notified):
- denials, decided by `_decide.decide`: recorded with decoded arguments, then
  answered EPERM or ENOSYS;
- `connect` under a host:port allowlist: the supervisor performs the connect
  on a duplicate of the child's socket and returns the result (never CONTINUE).
Kernel rules honoured: the notification buffer is zeroed before every RECV;
NOTIF_ID_VALID is checked after reading the child's memory and before acting;
ENOENT from SEND (the child was interrupted or died) is expected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable

import anyio
import attrs

from . import _decide, _kernel
from ._kernel import OwnedFd


@attrs.frozen(kw_only=True)
class DenialEvent:
    """A syscall the sandbox was refused, decoded."""

    time: float  # time.time()
    pid: int  # host pid of the calling task
    command: str  # argv[0] of the run it belongs to
    syscall: str
    nr: int
    args: tuple[int, ...]
    detail: str
    errno: int
    source: str = "seccomp"  # or "ebpf" when seen by the monitor

    def __str__(self) -> str:
        return f"denied {self.syscall}({self.detail}) -> {errno.errorcode.get(self.errno, self.errno)} [pid {self.pid}, {self.command}]"


@attrs.define(eq=False)  # identity: kept in sets while its run is live
class RunAccount:
    """What the supervisor saw for one spawned command."""

    command: str
    denials: Counter = attrs.field(factory=Counter)
    notifications: int = 0
    connects: int = 0


@attrs.define
class _Watched:
    listener: OwnedFd
    pidfd: OwnedFd
    account: RunAccount
    done: anyio.Event
    # a zygote's listener serves every run of its sandbox: the account of the
    # run a notifying task belongs to (by its host pid)
    resolve: Callable[[int], RunAccount] | None = None


class Supervisor:
    """One task per sandbox, over an epoll set of every live listener of the
    sandbox: attaching a spawn's listener is one epoll_ctl, not a new task."""

    def __init__(self, *, allowed_endpoints: frozenset[tuple[str, int]], net_allow: bool,
                 on_event: Callable[[DenialEvent], None], task_group: anyio.abc.TaskGroup,
                 learner: Callable[[_kernel.Notification], bool] | None = None,
                 on_done: Callable[[RunAccount], None] | None = None) -> None:
        self._allowed = allowed_endpoints
        self._net_allow = net_allow
        self._on_event = on_event
        self._tg = task_group
        self._learner = learner  # zviz trace: record and let run (NOT a security boundary)
        self._on_done = on_done  # a run's account is final once its listener hangs up
        self._ep = select.epoll()
        self._watched: dict[int, _Watched] = {}
        self._scope: anyio.CancelScope | None = None
        self._connects: set[anyio.CancelScope] = set()
        self._stopped = False
        self.sync_wakeup = False
        self.connect_timeout = 30.0
        self.notifications = 0
        self.listeners_served = 0

    async def run(self) -> None:
        """The supervisor's task (start it with start_soon in the sandbox's task
        group). Shielded: a cancelled caller's processes still get their
        notifications answered until teardown has killed them, or until
        stop(); without the shield a task blocked in a notified syscall could
        never be answered, and its kill and reap would wait on it."""
        with anyio.CancelScope(shield=True) as scope:
            self._scope = scope
            if self._stopped:
                scope.cancel()
            try:
                while True:
                    await anyio.wait_readable(self._ep.fileno())
                    for fd, ev in self._ep.poll(0):
                        w = self._watched.get(fd)
                        if w is None:
                            continue
                        if ev & select.EPOLLIN:
                            n = _kernel.notif_recv(w.listener)
                            if n is not None:
                                account = w.account if w.resolve is None else w.resolve(n.pid)
                                await self._handle(w.listener, w.pidfd, account, n)
                        elif ev & (select.EPOLLHUP | select.EPOLLERR):
                            self._forget(fd)  # no task of this filter is left
            finally:
                for fd in list(self._watched):
                    self._forget(fd)
                anyio.notify_closing(self._ep.fileno())
                self._ep.close()

    def _forget(self, fd: int) -> None:
        w = self._watched.pop(fd)
        self._ep.unregister(fd)
        w.listener.close()
        w.done.set()
        if self._on_done is not None:
            self._on_done(w.account)

    def stop(self) -> None:
        """End the supervisor (after teardown has killed the processes, their
        listeners have usually hung up already)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
        for scope in list(self._connects):
            scope.cancel()

    def attach(self, listener: OwnedFd, pidfd: OwnedFd, account: RunAccount,
               resolve: Callable[[int], RunAccount] | None = None) -> anyio.Event:
        """Serve `listener` (taking ownership); the event is set when it is done.
        `resolve(pid)`, if given, picks the account of each notification."""
        if self._stopped:
            listener.close()
            raise RuntimeError("supervisor is stopped")
        if _kernel.notif_set_sync_wakeup(listener):
            self.sync_wakeup = True
        done = anyio.Event()
        self._watched[listener.fd] = _Watched(listener, pidfd, account, done, resolve)
        self._ep.register(listener.fd, select.EPOLLIN)
        self.listeners_served += 1
        return done

    async def _handle(self, listener: OwnedFd, pidfd: OwnedFd, account: RunAccount,
                      n: _kernel.Notification) -> None:
        self.notifications += 1
        account.notifications += 1
        if self._learner is not None and n.arch == _decide.AUDIT_ARCH_X86_64 and self._learner(n):
            _kernel.notif_continue_learning(listener, n.id)
            return
        answer = _decide.decide(n.nr, n.arch, n.args, net_allow=self._net_allow)
        if isinstance(answer, _decide.ReadSockaddr):
            try:
                data = _kernel.read_child_memory(n.pid, answer.addr, answer.size)
            except (OSError, ValueError, OverflowError):
                data = b""
            # The read is only meaningful if the task is still the one waiting.
            if not _kernel.notif_id_valid(listener, n.id):
                return
            answer = _decide.decide_connect(n.args[0] & 0xFFFFFFFF, data, self._allowed)
            if isinstance(answer, _decide.PerformConnect):
                # may take up to connect_timeout: its own task, so that the
                # supervisor keeps answering everyone else meanwhile
                self._tg.start_soon(self._perform_connect, listener, n, answer, account)
                return
        assert isinstance(answer, _decide.Deny)
        self._record(n, answer.errno, account)
        _kernel.notif_send(listener, n.id, error=answer.errno)

    def _record(self, n: _kernel.Notification, err: int, account: RunAccount) -> None:
        strings = {}
        name = _decide.syscall_name(n.nr)
        if name in ("mount", "chroot", "umount2", "pivot_root", "swapon", "acct"):
            for i in range(3 if name == "mount" else 1):
                strings[i] = _kernel.read_child_string(n.pid, n.args[i], 256)
        d = _decide.decode(n.nr, n.args, strings)
        account.denials[_decide.counter_key(account.denials, d.name)] += 1
        self._on_event(DenialEvent(time=time.time(), pid=n.pid, command=account.command,
                                   syscall=d.name, nr=n.nr, args=d.args, detail=d.detail, errno=err))

    async def _perform_connect(self, listener: OwnedFd, n: _kernel.Notification,
                               answer: _decide.PerformConnect, account: RunAccount) -> None:
        """connect() on a duplicate of the child's socket, from here. Ended by
        stop(); a listener closed meanwhile (its process died) ends it too."""
        with anyio.CancelScope() as scope:
            self._connects.add(scope)
            try:
                await self._connect_on_behalf(listener, n, answer, account)
            except (OSError, ValueError):
                if not listener.closed:
                    raise
            finally:
                self._connects.discard(scope)

    async def _connect_on_behalf(self, listener: OwnedFd, n: _kernel.Notification,
                                 answer: _decide.PerformConnect, account: RunAccount) -> None:
        try:
            task_fd = OwnedFd(os.pidfd_open(n.pid), "pidfd-task")
        except OSError:
            _kernel.notif_send(listener, n.id, error=errno.ESRCH)
            return
        sock_fd: OwnedFd | None = None
        try:
            # The pidfd names the notifying task only if the notification is live.
            if not _kernel.notif_id_valid(listener, n.id):
                return
            try:
                sock_fd = _kernel.pidfd_getfd(task_fd, answer.fd)
            except OSError as e:
                _kernel.notif_send(listener, n.id, error=e.errno or errno.EBADF)
                return
            sock = socket.socket(fileno=sock_fd.fd)
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    self._record(n, errno.EACCES, account)
                    _kernel.notif_send(listener, n.id, error=errno.EACCES)
                    return
                target = (answer.host, answer.port)
                if sock.family == socket.AF_INET6 and ":" not in answer.host:
                    target = ("::ffff:" + answer.host, answer.port)
                # The file description, O_NONBLOCK included, is shared with the
                # child. Connect non-blocking here (cancellable, no thread); a
                # child that asked for a blocking connect gets the final result,
                # one that asked for non-blocking gets EINPROGRESS as usual.
                flags = fcntl.fcntl(sock_fd.fd, fcntl.F_GETFL)
                if flags & os.O_NONBLOCK:
                    err = sock.connect_ex(target)
                else:
                    fcntl.fcntl(sock_fd.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                    try:
                        err = sock.connect_ex(target)
                        if err == errno.EINPROGRESS:
                            with anyio.move_on_after(self.connect_timeout):
                                await anyio.wait_writable(sock_fd.fd)
                            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or 0
                            if err == 0 and not _connected(sock):
                                err = errno.ETIMEDOUT
                    finally:
                        fcntl.fcntl(sock_fd.fd, fcntl.F_SETFL, flags)
                account.connects += 1
                _kernel.notif_send(listener, n.id, error=err)
            finally:
                sock.detach()  # sock_fd owns the number
        finally:
            if sock_fd is not None:
                sock_fd.close()
            task_fd.close()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
