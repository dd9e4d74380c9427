"""The supervisor: answers seccomp user notifications, on trio (or asyncio).

One `Supervisor` per sandbox, a task over an epoll set of every live listener
of the sandbox (its zygote's, or one per spawn without a zygote), until the
kernel hangs a listener up (POLLHUP: no task of that filter is left).

It answers only rare calls (nothing on the hot path is notified):
- denials, decided by `_decide.decide`: answered EPERM, EACCES or ENOSYS and
  recorded as events. The few whose strings an event shows (mount paths...)
  are read in a worker thread while the call waits, at most ANSWER_WAIT;
- `connect` under a host:port allowlist: the supervisor connects a socket of
  its own, from the host's network namespace, to the checked address and
  installs it in place of the child's fd (ADDFD with SETFD); the child's own
  sockets live in an empty network namespace. Never CONTINUE. The plain
  case (an allowed endpoint, an unconnected TCP socket) is done by a C
  thread per listener (`_pump`, ~0.05 ms), which receives the listener's
  notifications and hands everything else to this loop unchanged;
The event loop never reads the child's memory (a sandbox can hold its
mmap_lock for long): every read is a worker thread's, with a deadline, or
the pump's (which serves that sandbox alone).
Connects in flight are capped per sandbox and per host process, and a connect
whose task dies is abandoned at once.
Kernel rules honoured: the notification buffer is zeroed before every RECV;
NOTIF_ID_VALID is checked after reading the child's memory and before acting;
ENOENT from SEND (the child was interrupted or died) is expected.

Why this module is long: the notification loop and the supervised connect
(the supervisor's own socket, ADDFD, the caps, abandonment) share the
listener's state and its answers; the connect half is the part to move out
next.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import anyio
import attrs

from . import _argrules, _decide, _kernel, _pump, _sockets, _stage
from ._kernel import OwnedFd

MAX_CONNECTS = 64  # connects in flight per sandbox (past it: EAGAIN, and an event)
CONNECT_READ_DEADLINE = 1.0  # s to read a connect's sockaddr (past it: EFAULT)
ANSWER_WAIT = 0.05  # s a denial with string arguments waits for their read at most, before it is answered
DECODE_DEADLINE = 0.1  # s to read the string arguments of a denied call (past it: unread)
DECODES = 64  # denials whose strings are being read at once (past it: answered at once, strings unread)
PAIR_DEADLINE = 2.0  # s to install a socketpair in a blank-namespace sandbox (its numbers written to its memory)
READERS = 2  # worker threads reading one sandbox's memory at once
VALID_POLL_S = 0.25  # a pending connect re-checks its notification this often
# the string arguments read for an event: the first N arguments
_STRING_ARGS = {"mount": 3, "chroot": 1, "umount2": 1, "pivot_root": 1, "swapon": 1, "acct": 1}
# options a program may set before connect() that the supervisor's socket carries over
_CARRIED_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


@attrs.frozen(kw_only=True)
class DenialEvent:
    """A syscall the sandbox was refused, decoded."""

    time: float  # time.time()
    pid: int  # host pid of the calling task (0: not known, source "netns")
    command: str  # argv[0] of the run it belongs to ("" when not known)
    syscall: str
    nr: int
    args: tuple[int, ...]
    detail: str
    errno: int
    # or "ebpf" when seen by the monitor, or "netns": a direct TCP connect of a domains-mode sandbox
    # whose egress proxy listens in its network namespace, refused there by the kernel (_egresswatch)
    source: str = "seccomp"

    def __str__(self) -> str:
        err = errno.errorcode.get(self.errno, self.errno)
        who = f" [pid {self.pid}, {self.command}]" if self.pid else ""
        return f"denied {self.syscall}({self.detail}) -> {err}{who}"


@attrs.define(eq=False)  # identity: kept in sets while its run is live
class RunAccount:
    """What the supervisor saw for one spawned command."""

    command: str
    denials: Counter[str] = attrs.field(factory=Counter)
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
    # net.mode = "allow": the thread that receives the listener's notifications (then the epoll set waits on it)
    pump: _pump.Pump | None = None

    def account_of(self, pid: int) -> RunAccount:
        return self.account if self.resolve is None else self.resolve(pid)


class Supervisor:
    """One task per sandbox, over an epoll set of every live listener of the
    sandbox: attaching a spawn's listener is one epoll_ctl, not a new task."""

    def __init__(self, *, allowed_endpoints: frozenset[tuple[str, int]], net_allow: bool,
                 on_event: Callable[[DenialEvent], None], task_group: anyio.abc.TaskGroup | None,
                 learner: Callable[[_kernel.Notification], bool] | None = None,
                 on_done: Callable[[RunAccount], None] | None = None) -> None:
        self._allowed = allowed_endpoints
        self._net_allow = net_allow
        # net.mode = "domains": the egress proxy (set by the sandbox before any spawn)
        self.egress: _EgressHook | None = None
        # net.way = "direct": the sandbox's direct egress (its pumps connect out, _egressdirect)
        self.direct: Any = None
        # the blank network namespace (zviz/_netns.py): its sockets, made here (set by the sandbox)
        self.sockets: _sockets.Sockets | None = None
        self._on_event = on_event
        self._tg = task_group  # (bind() sets it when the supervisor is made before its task group)
        self._learner = learner  # zviz trace: record and let run (NOT a security boundary)
        self._on_done = on_done  # a run's account is final once its listener hangs up
        self._ep = select.epoll()
        self._watched: dict[int, _Watched] = {}
        self._scope: anyio.CancelScope | None = None
        self._connects: set[anyio.CancelScope] = set()
        self._slots: set[object] = set()  # connects in flight, each holding one slot of _HOST_CONNECTS
        self._stopped = False
        self.sync_wakeup = False
        self.connect_timeout = 30.0
        self.max_connects = min(MAX_CONNECTS, _HOST_CONNECTS.limit)
        self.notifications = 0
        self.listeners_served = 0
        self.connects_abandoned = 0
        self.host_fd_shortages = 0
        self.reads_timed_out = 0
        self.decodes_skipped = 0
        self.connects_pumped = 0  # connects the pump performed (the rest went through _connect_on_behalf)
        self.pumps = True  # (tests turn it off to exercise the Python path)
        self._readers = anyio.CapacityLimiter(READERS)
        self._decodes_pending = 0
        self._decodes_idle = anyio.Event()

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
                        if w.pump is not None:
                            self._pumped(fd, w)
                        elif ev & select.EPOLLIN:
                            n = _kernel.notif_recv(w.listener)
                            if n is not None:
                                self._handle(w.listener, w.pidfd, w.account_of(n.pid), n)
                        elif ev & (select.EPOLLHUP | select.EPOLLERR):
                            self._forget(fd)  # no task of this filter is left
            finally:
                for fd in list(self._watched):
                    self._forget(fd)
                anyio.notify_closing(self._ep.fileno())
                self._ep.close()
                if self.sockets is not None:
                    self.sockets.close()  # (its sockets live on in the sandbox's processes until they die)

    def _pumped(self, fd: int, w: _Watched) -> None:
        """What a listener's pump said: notifications for us to answer, the
        connects it performed, a connect for us to finish, its end."""
        assert w.pump is not None
        for r in w.pump.records():
            if r.kind == _pump.NOTIF and r.notif is not None:
                self._handle(w.listener, w.pidfd, w.account_of(r.notif.pid), r.notif)
            elif r.kind == _pump.CONNECTED and r.notif is not None:
                account = w.account_of(r.notif.pid)
                self.notifications += 1
                account.notifications += 1
                if r.name != _pump.INSIDE:
                    account.connects += 1
                self.connects_pumped += 1
            elif r.kind == _pump.GATED and r.notif is not None and self.direct is not None:
                account = w.account_of(r.notif.pid)
                self.notifications += 1
                account.notifications += 1
                account.connects += 1
                self.connects_pumped += 1
                self.direct.gated(r, w.pump)
            elif r.kind == _pump.GATE_FAILED and r.notif is not None and self.direct is not None:
                self.notifications += 1
                self.direct.gate_failed(r)
            elif r.kind in (_pump.CHECKED, _pump.CHECK_CUT) and self.direct is not None and r.notif is not None:
                account = w.account_of(r.notif.pid)  # (a connect out whose first flight the pump checked)
                self.notifications += 1
                account.notifications += 1
                account.connects += 1
                self.connects_pumped += 1
                self.direct.checked(r, w.pump)
            elif r.kind == _pump.DNS and self.direct is not None:
                self.direct.dns_miss(r)
            elif r.kind == _pump.INPROGRESS and r.notif is not None and len(r.fds) == 2:
                account = w.account_of(r.notif.pid)
                self.notifications += 1
                account.notifications += 1
                gated = (r, w.pump) if r.name >= 0 else None
                self._finish_pumped(w.listener, r.notif, r.fds[0], r.fds[1], r.fd, r.cloexec, account, gated)
            elif r.kind == _pump.HUP:
                self._forget(fd)  # no task of this filter is left
                return
            else:  # FAILED: the thread has ended (or said something unreadable); the listener is served here now
                self._ep.unregister(fd)
                del self._watched[fd]
                if self.direct is not None:
                    self.direct.forget(w.pump)
                w.pump.close()
                w.pump = None
                self._watched[w.listener.fd] = w
                self._ep.register(w.listener.fd, select.EPOLLIN)
                return

    def _finish_pumped(self, listener: OwnedFd, n: _kernel.Notification, sock_fd: OwnedFd, task: OwnedFd,
                       fd: int, cloexec: bool, account: RunAccount,
                       gated: tuple[_pump.Record, _pump.Pump | None] | None = None) -> None:
        """A connect the pump started that has not finished (a blocking one, or
        one out through the gate, which takes only a connected socket): wait
        for it here, within the caps."""
        sock = socket.socket(fileno=sock_fd.detach())
        slot = self._take_connect_slot()
        if slot is None or self._tg is None:
            sock.close()
            task.close()
            if slot is not None:
                self._give_connect_slot(slot)
            if gated is not None and gated[1] is not None:
                gated[1].give_back()
            self._record(n, errno.EAGAIN, account,
                         detail=f"fd={fd}: not attempted, {self.max_connects} connects of this sandbox "
                         f"(or {_HOST_CONNECTS.limit} of this host process) are in flight")
            _kernel.notif_send(listener, n.id, error=errno.EAGAIN)
            return

        async def finish() -> None:
            try:
                if self._stopped:
                    return
                with self._tracked():
                    try:
                        if gated is not None:
                            await self._finish_gated(listener, n, task, sock, fd, cloexec, account, *gated)
                        else:
                            await self._finish_connect(listener, n, task, sock, fd, nonblocking=False,
                                                       cloexec=cloexec, err=errno.EINPROGRESS, account=account)
                    except (OSError, ValueError):
                        if not listener.closed:
                            raise
            finally:
                sock.close()
                task.close()
                self._give_connect_slot(slot)

        self._tg.start_soon(finish)

    async def _finish_gated(self, listener: OwnedFd, n: _kernel.Notification, task: OwnedFd, sock: socket.socket,
                            fd: int, cloexec: bool, account: RunAccount, r: _pump.Record,
                            pump: _pump.Pump | None) -> None:
        """Direct egress, a connect out that the pump did not see finish: wait
        for it, put it in the gate, install it, answer, and have its first
        flight checked. The budget the pump took is given back if it fails."""
        outcome = await self._await_connect(listener, n, task, sock)
        if outcome is None or outcome != 0:
            if pump is not None:
                pump.give_back()
            if outcome is not None:
                _kernel.notif_send(listener, n.id, error=outcome)
            return
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            key = _stage.gate_add(self.direct.gate.map_fd, sock.fileno(), a.fileno())
        except OSError as e:
            a.close()
            b.close()
            if pump is not None:
                pump.give_back()
            self.direct.gate_failed(attrs.evolve(r, err=e.errno or errno.EIO))
            _kernel.notif_send(listener, n.id, error=errno.EAGAIN)
            return
        sock.setblocking(True)
        try:
            installed = _kernel.notif_addfd(listener, n.id, sock.fileno(), fd, cloexec=cloexec)
        except OSError as e:
            installed = False
            _kernel.notif_send(listener, n.id, error=e.errno or errno.EBADF)
        if not installed:
            with contextlib.suppress(OSError):
                _stage.gate_remove(self.direct.gate.map_fd, key)
            a.close()
            b.close()
            if pump is not None:
                pump.give_back()
            return
        _kernel.notif_send(listener, n.id, error=0)
        account.connects += 1
        fds = (OwnedFd(os.dup(sock.fileno()), "gated"), OwnedFd(a.detach(), "capture"), OwnedFd(b.detach(), "capture"))
        self.direct.gated(attrs.evolve(r, kind=_pump.GATED, key=key, fds=fds), pump)

    def _forget(self, fd: int) -> None:
        w = self._watched.pop(fd)
        self._ep.unregister(fd)
        if w.pump is not None:
            if self.direct is not None:
                self.direct.forget(w.pump)
            w.pump.close()
        w.listener.close()
        w.done.set()
        if self._on_done is not None:
            self._on_done(w.account)

    def set_allowed(self, endpoints: frozenset[tuple[str, int]]) -> None:
        """New host:port allowlist (Sandbox.set_network): the next connect follows it."""
        self._allowed = endpoints
        for w in self._watched.values():
            if w.pump is not None:
                w.pump.set_table(_pump.table(endpoints))

    def bind(self, task_group: anyio.abc.TaskGroup) -> None:
        """The task group its connect and decode tasks run in."""
        self._tg = task_group

    def close(self) -> None:
        """Close its epoll set and end its pumps if run() never did (idempotent)."""
        for w in self._watched.values():
            if w.pump is not None:
                w.pump.close()
        self._ep.close()
        if self.sockets is not None:
            self.sockets.close()

    def stop(self) -> None:
        """End the supervisor (after teardown has killed the processes, their
        listeners have usually hung up already)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
        for scope in list(self._connects):
            scope.cancel()
        for slot in list(self._slots):
            self._give_connect_slot(slot)

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
        w = _Watched(listener, pidfd, account, done, resolve)
        if self.direct is not None and self._learner is None:
            # net.way = "direct": the pump connects out (gated) and inside the sandbox's namespace
            w.pump = _pump.Pump(listener, b"", **self.direct.pump_args())
            self.direct.adopt(w.pump)
            self._watched[w.pump.fd] = w
            self._ep.register(w.pump.fd, select.EPOLLIN)
        elif self._net_allow and self.egress is None and self._learner is None and self.pumps and _pump.available():
            # net.mode = "allow": a thread receives this listener's notifications, connects included
            w.pump = _pump.Pump(listener, _pump.table(self._allowed))
            self._watched[w.pump.fd] = w
            self._ep.register(w.pump.fd, select.EPOLLIN)
        else:
            self._watched[listener.fd] = w
            self._ep.register(listener.fd, select.EPOLLIN)
        self.listeners_served += 1
        return done

    def _handle(self, listener: OwnedFd, pidfd: OwnedFd, account: RunAccount, n: _kernel.Notification) -> None:
        self.notifications += 1
        account.notifications += 1
        if self._learner is not None and n.arch == _decide.AUDIT_ARCH_X86_64 and self._learner(n):
            _kernel.notif_continue_learning(listener, n.id)
            return
        if (self.sockets is not None and n.arch == _decide.AUDIT_ARCH_X86_64
                and self.sockets.wants(_decide.syscall_name(n.nr), n.args)):
            self._make_sockets(listener, n, account)
            return
        answer = _decide.decide(n.nr, n.arch, n.args, net_allow=self._net_allow)
        if isinstance(answer, _decide.ReadSockaddr):
            # Everything after this point may wait (the child's memory, the
            # remote end): a task of its own, within the connect caps.
            slot = self._take_connect_slot()
            if slot is None:
                self._record(n, errno.EAGAIN, account,
                             detail=f"fd={_decide_fd(n)}: not attempted, {self.max_connects} connects of this sandbox "
                             f"(or {_HOST_CONNECTS.limit} of this host process) are in flight")
                _kernel.notif_send(listener, n.id, error=errno.EAGAIN)
                return
            assert self._tg is not None
            self._tg.start_soon(self._connect_task, listener, n, answer, account, slot)
            return
        assert isinstance(answer, _decide.Deny)
        name = _decide.syscall_name(n.nr)
        want = _STRING_ARGS.get(name, 0)
        if want and any(n.args[:want]) and self._decodes_pending < DECODES:
            # Strings to read for the event: in a worker thread, never on the
            # event loop (a sandbox can hold its mmap_lock for long).
            self._decodes_pending += 1
            assert self._tg is not None
            self._tg.start_soon(self._decode_and_answer, listener, n, answer.errno, account, want)
            return
        if want and any(n.args[:want]):
            self.decodes_skipped += 1  # a flood: answered at once, its strings unread
        _kernel.notif_send(listener, n.id, error=answer.errno)
        detail = None
        if self.egress is not None and name in ("socket", "socketpair", "sendto", "sendmsg", "sendmmsg"):
            # net.mode = "domains": a UDP socket (a program's own DNS lookup, say), a TCP Fast Open send
            # (a connect without connect()): the event names the way out
            detail = f"{_decide.decode(n.nr, n.args).detail}: {self.egress.hint()}"[:_decide.DETAIL_MAX]
        elif name == "ioctl" and self._net_allow and (n.args[1] & 0xFFFF) in _argrules.NET_DEVICE_IOCTLS:
            detail = f"fd={_decide_fd(n)}, cmd={n.args[1] & 0xFFFFFFFF:#x}: {_argrules.NET_DEVICE_IOCTL.why}"
        elif name == "listen" and self.direct is not None:
            detail = (f"fd={_decide_fd(n)}: that socket is a connection zviz made for the sandbox, on the "
                      "host's network: it cannot listen (the sandbox's own sockets can)")
        elif (self._allowed and name == "socket" and n.args[0] & 0xFFFFFFFF in (socket.AF_INET, socket.AF_INET6)
              and n.args[1] & 0xF == socket.SOCK_DGRAM):
            # net.mode = "allow": most often a program's own DNS lookup, which that mode cannot serve
            detail = (f"{_decide.decode(n.nr, n.args).detail}: net.mode 'allow' has no DNS (no UDP): to reach "
                      "hosts by name, use Network.domains([...]) or --allow-domain NAME (docs/network.md)")
        self._record(n, answer.errno, account, detail=detail)

    # ---- sockets of a sandbox in the blank network namespace (_sockets)

    def _make_sockets(self, listener: OwnedFd, n: _kernel.Notification, account: RunAccount) -> None:
        """Its first socket is made here, and the listener handed to a pump
        (zviz/_pump.c), which makes the next ones in C (a pair ~0.15 ms, not
        ~0.9 here: a worker thread writes its numbers); without pumps, all here."""
        assert self.sockets is not None
        try:
            self._serve_sockets(listener, n, account)
        finally:
            if self.sockets.netns >= 0:
                self._pump_sockets(listener)

    def _pump_sockets(self, listener: OwnedFd) -> None:
        assert self.sockets is not None
        w = self._watched.get(listener.fd)
        if w is None or w.pump is not None or not (self.pumps and _pump.available()):
            return
        try:
            pump = _pump.Pump(listener, b"", sockets=(self.sockets.netns, self.sockets.pump_allow))
        except OSError:  # (a host fd or thread shortage: Python goes on making them)
            return
        self.sockets.pumped = True
        self._ep.unregister(listener.fd)
        del self._watched[listener.fd]
        w.pump = pump
        self._watched[pump.fd] = w
        self._ep.register(pump.fd, select.EPOLLIN)

    def _serve_sockets(self, listener: OwnedFd, n: _kernel.Notification, account: RunAccount) -> None:
        assert self.sockets is not None
        name = _decide.syscall_name(n.nr)
        cloexec = bool(n.args[1] & _argrules.SOCK_CLOEXEC)
        try:
            fds = self.sockets.make(name, n.args)
        except _sockets.TooMany:
            _kernel.notif_send(listener, n.id, error=errno.ENOBUFS)
            self._record(n, errno.ENOBUFS, account, detail=_sockets.TOO_MANY)
            return
        except OSError as e:
            _kernel.notif_send(listener, n.id, error=e.errno or errno.EINVAL)
            return
        if name == "socketpair":  # its numbers go to the caller's memory: in a worker thread
            assert self._tg is not None
            self._tg.start_soon(self._install_pair, listener, n, fds, cloexec)
            return
        try:
            num = _sockets.install(listener, n.id, fds[0], cloexec=cloexec)
        except OSError as e:
            _kernel.notif_send(listener, n.id, error=e.errno or errno.EMFILE)
            return
        finally:
            os.close(fds[0])
        if num is not None:
            _kernel.notif_send(listener, n.id, val=num)

    async def _install_pair(self, listener: OwnedFd, n: _kernel.Notification, fds: tuple[int, ...],
                            cloexec: bool) -> None:
        work = functools.partial(_sockets.install_pair, listener, n.id, n.pid, fds, n.args[3], cloexec=cloexec)
        err: int | None = errno.EFAULT
        with anyio.move_on_after(PAIR_DEADLINE) as scope:  # (abandoned, the thread still closes the fds)
            try:
                err = await anyio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self._readers)
            except (OSError, ValueError):  # (ValueError: the listener closed, its tasks all gone)
                err = errno.EFAULT  # never out of here: the sandbox's service task would fail with it
        if scope.cancelled_caught:
            self.reads_timed_out += 1
        if err is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: the listener closed
                _kernel.notif_send(listener, n.id, error=err)

    # ---- recording

    def _record(self, n: _kernel.Notification, err: int, account: RunAccount, detail: str | None = None,
                strings: dict[int, str | None] | None = None) -> None:
        d = _decide.decode(n.nr, n.args, strings or {})
        account.denials[_decide.counter_key(account.denials, d.name)] += 1
        self._on_event(DenialEvent(time=time.time(), pid=n.pid, command=account.command, syscall=d.name, nr=n.nr,
                                   args=d.args, detail=detail if detail is not None else d.detail, errno=err))

    async def _decode_and_answer(self, listener: OwnedFd, n: _kernel.Notification, err: int, account: RunAccount,
                                 want: int) -> None:
        """Read a denied call's strings while its task still waits (what they
        say then is what the call was given), but answer within ANSWER_WAIT
        whatever the read does: the answer does not depend on it. The event
        goes out once the strings are read, or unread after DECODE_DEADLINE."""
        answered = False
        try:
            async with anyio.create_task_group() as tg:
                async def answer_soon() -> None:
                    nonlocal answered
                    await anyio.sleep(ANSWER_WAIT)
                    answered = True
                    with contextlib.suppress(OSError, ValueError):  # ValueError: the listener closed
                        _kernel.notif_send(listener, n.id, error=err)

                tg.start_soon(answer_soon)
                strings = await self._read_strings(n.pid, n.args[:want])
                tg.cancel_scope.cancel()
            if not answered:
                answered = True
                _kernel.notif_send(listener, n.id, error=err)
            self._record(n, err, account, strings=strings)
        except (OSError, ValueError):
            if not listener.closed:
                raise
        finally:
            if not answered and not listener.closed:
                _kernel.notif_send(listener, n.id, error=err)
            self._decodes_pending -= 1
            if self._decodes_pending == 0:
                idle, self._decodes_idle = self._decodes_idle, anyio.Event()
                idle.set()

    async def _read_strings(self, pid: int, addrs: tuple[int, ...]) -> dict[int, str | None]:
        def read() -> dict[int, str | None]:
            return {i: _kernel.read_child_string(pid, a, 256) for i, a in enumerate(addrs)}

        with anyio.move_on_after(DECODE_DEADLINE):
            return await anyio.to_thread.run_sync(read, abandon_on_cancel=True, limiter=self._readers)
        self.reads_timed_out += 1
        return {}

    async def _read_memory(self, pid: int, addr: int, size: int, deadline: float) -> bytes | None:
        """The child's memory, read in a worker thread (at most READERS per
        sandbox at once), or None if unreadable or not read within `deadline`
        (the thread is then abandoned; its read ends when the lock is free)."""
        if addr == 0:
            return None
        with anyio.move_on_after(deadline):
            try:
                return await anyio.to_thread.run_sync(_kernel.read_child_memory, pid, addr, size,
                                                      abandon_on_cancel=True, limiter=self._readers)
            except (OSError, ValueError, OverflowError):
                return None
        self.reads_timed_out += 1
        return None

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (at most `timeout`) until every denial received so far is an event
        (each one takes at most DECODE_DEADLINE), and take in what the pumps
        said (they say it before they answer: a finished command's connects
        are all in their records)."""
        for fd, w in list(self._watched.items()):
            if w.pump is not None and self._watched.get(fd) is w:
                self._pumped(fd, w)
        if not self._decodes_pending:
            return  # the common case: no cancel scope to enter (~40 us per run)
        with anyio.move_on_after(timeout):
            while self._decodes_pending:
                await self._decodes_idle.wait()

    # ---- connect under an allowlist

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """A connect's task: stop() cancels it."""
        with anyio.CancelScope() as scope:
            self._connects.add(scope)
            try:
                yield
            finally:
                self._connects.discard(scope)

    def _take_connect_slot(self) -> object | None:
        if len(self._slots) >= self.max_connects or not _HOST_CONNECTS.take():
            return None
        slot = object()
        self._slots.add(slot)
        return slot

    def _give_connect_slot(self, slot: object) -> None:
        """Idempotent: the task gives its slot back, and stop() gives back
        those of tasks that never ran (a task cancelled before its first
        step runs no `finally`)."""
        if slot in self._slots:
            self._slots.discard(slot)
            _HOST_CONNECTS.give()

    async def _connect_task(self, listener: OwnedFd, n: _kernel.Notification, want: _decide.ReadSockaddr,
                            account: RunAccount, slot: object) -> None:
        """Read the sockaddr (off the loop, bounded), decide, and if the
        endpoint is listed connect a socket of our own from the host's network
        and put it in place of the child's. Ended by stop(); abandoned as
        soon as the notifying task is gone. stop() may come before this
        task first runs (it cancels only the scopes it can see): then there is
        nothing to do."""
        try:
            if self._stopped:
                return
            with self._tracked():
                try:
                    await self._connect_on_behalf(listener, n, want, account)
                except OSError as e:
                    if listener.closed:
                        return
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        # The host is short of fds: the sandbox gets EAGAIN,
                        # the event names the limit and the fix.
                        self.host_fd_shortages += 1
                        self._record(n, errno.EAGAIN, account,
                                     detail=f"fd={_decide_fd(n)}: not attempted: "
                                     + str(_kernel.host_fd_shortage("connect", e)))
                        _kernel.notif_send(listener, n.id, error=errno.EAGAIN)
                        return
                    raise
                except ValueError:
                    if not listener.closed:
                        raise
        finally:
            self._give_connect_slot(slot)

    async def _connect_on_behalf(self, listener: OwnedFd, n: _kernel.Notification, want: _decide.ReadSockaddr,
                                 account: RunAccount) -> None:
        data = await self._read_memory(n.pid, want.addr, want.size, CONNECT_READ_DEADLINE)
        # What was read is only meaningful if the task is still the one waiting.
        if not _kernel.notif_id_valid(listener, n.id):
            return
        if data is None:
            self._record(n, errno.EFAULT, account, detail=f"fd={_decide_fd(n)}: the address could not be read")
            _kernel.notif_send(listener, n.id, error=errno.EFAULT)
            return
        egress = self.egress
        answer = _decide.decide_connect(n.args[0] & 0xFFFFFFFF, data, self._allowed,
                                        egress.route() if egress is not None else None)
        if isinstance(answer, _decide.Deny):
            detail = None
            parsed = _decide.parse_sockaddr(data) if egress is not None else None
            if egress is not None and parsed is not None:  # (a unix socket's connect: refused as in allow mode)
                detail = f"fd={_decide_fd(n)}, {egress.hint((parsed[1], parsed[2]))}"[:_decide.DETAIL_MAX]
            self._record(n, answer.errno, account, detail=detail)
            _kernel.notif_send(listener, n.id, error=answer.errno)
            return
        with contextlib.ExitStack() as stack:
            try:
                task = _kernel.pidfd_open_task(n.pid)
            except ProcessLookupError:
                return  # it died: nothing to answer
            stack.callback(task.close)
            # The pidfd names the notifying task only if the notification is live.
            if not _kernel.notif_id_valid(listener, n.id):
                return
            checked = self._inspect_child_socket(task, n, answer.fd, account)
            if isinstance(checked, int):
                _kernel.notif_send(listener, n.id, error=checked)
                return
            family, nonblocking, cloexec, options = checked
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            stack.callback(sock.close)
            for level, opt, value in options:
                sock.setsockopt(level, opt, value)
            target = (answer.host, answer.port)
            if family == socket.AF_INET6 and ":" not in answer.host:
                target = ("::ffff:" + answer.host, answer.port)
            err = sock.connect_ex(target)
            if answer.proxied and egress is not None and err in (0, errno.EINPROGRESS):
                # before any await: the proxy accepts only the connections we made
                egress.expect(sock.getsockname()[1])
            await self._finish_connect(listener, n, task, sock, answer.fd, nonblocking=nonblocking,
                                       cloexec=cloexec, err=err, account=account)

    async def _finish_connect(self, listener: OwnedFd, n: _kernel.Notification, task: OwnedFd, sock: socket.socket,
                              fd: int, *, nonblocking: bool, cloexec: bool, err: int, account: RunAccount) -> None:
        """The connect's second half, once our socket's connect has begun
        (`err`: its outcome so far): wait for a blocking one, install the
        socket at the child's `fd` and answer."""
        if err == errno.EINPROGRESS and not nonblocking:
            # A blocking connect: the answer is the outcome.
            outcome = await self._await_connect(listener, n, task, sock)
            if outcome is None:
                return  # the task is gone, or the sandbox is closing
            err = outcome
        if err not in (0, errno.EINPROGRESS):
            account.connects += 1
            _kernel.notif_send(listener, n.id, error=err)
            return
        if not nonblocking:
            sock.setblocking(True)
        # Our socket takes the child's fd number (the child's own socket,
        # made in its empty network namespace, is closed by the install).
        # A non-blocking connect answers EINPROGRESS and completes on the
        # installed socket: the program polls it for writability as usual.
        try:
            if not _kernel.notif_addfd(listener, n.id, sock.fileno(), fd, cloexec=cloexec):
                return  # the task is gone
        except OSError as e:  # EBADF: the task lowered its RLIMIT_NOFILE below the fd...
            _kernel.notif_send(listener, n.id, error=e.errno or errno.EBADF)
            return
        account.connects += 1
        _kernel.notif_send(listener, n.id, error=err)

    def _inspect_child_socket(self, task: OwnedFd, n: _kernel.Notification, fd: int, account: RunAccount,
                              ) -> int | tuple[int, bool, bool, list[tuple[int, int, int]]]:
        """(family, O_NONBLOCK, close-on-exec, options to carry over) of the
        child's socket `fd`, or the errno to answer."""
        try:
            theirs = _kernel.pidfd_getfd(task, fd)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise
            return e.errno or errno.EBADF
        try:
            try:
                sock = socket.socket(fileno=theirs.fd)
            except OSError:
                return errno.ENOTSOCK
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    self._record(n, errno.EACCES, account)
                    return errno.EACCES
                if _connected(sock):
                    return errno.EISCONN
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return errno.EINVAL
                nonblocking = bool(fcntl.fcntl(theirs.fd, fcntl.F_GETFL) & os.O_NONBLOCK)
                try:
                    cloexec = _kernel.fd_cloexec(n.pid, fd)
                except (OSError, ValueError):
                    return errno.EBADF  # closed meanwhile by another thread
                options = [(level, opt, sock.getsockopt(level, opt)) for level, opt in _CARRIED_OPTIONS]
                return sock.family, nonblocking, cloexec, [o for o in options if o[2]]
            finally:
                sock.detach()
        finally:
            theirs.close()

    async def _await_connect(self, listener: OwnedFd, n: _kernel.Notification, task: OwnedFd,
                             sock: socket.socket) -> int | None:
        """Wait for a connect in progress: its outcome (an errno, 0), or None
        as soon as the notifying task is gone (its pidfd turns readable) or
        its notification is no longer valid (checked every VALID_POLL_S)."""
        ep = select.epoll()
        try:
            ep.register(sock.fileno(), select.EPOLLOUT)
            ep.register(task.fd, select.EPOLLIN)
            deadline = time.monotonic() + self.connect_timeout
            while True:
                ready = {fd for fd, _ in ep.poll(0)}
                if task.fd in ready or not _kernel.notif_id_valid(listener, n.id):
                    self.connects_abandoned += 1
                    return None
                if sock.fileno() in ready:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    return err if err or _connected(sock) else errno.ETIMEDOUT
                left = deadline - time.monotonic()
                if left <= 0:
                    return errno.ETIMEDOUT
                with anyio.move_on_after(min(left, VALID_POLL_S)):
                    await anyio.wait_readable(ep.fileno())
        finally:
            anyio.notify_closing(ep.fileno())
            ep.close()


class _EgressHook(Protocol):
    """What the supervisor needs of a sandbox's egress proxy (`_egress.EgressProxy`)."""

    def route(self) -> tuple[frozenset[tuple[str, int]], tuple[str, int]]: ...

    def expect(self, local_port: int) -> None: ...

    def hint(self, address: tuple[str, int] | None = None) -> str: ...


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _decide_fd(n: _kernel.Notification) -> int:
    return _decide._s32(n.args[0])


class _HostCap:
    """Connects in flight in this host process, all sandboxes together: each
    holds up to three fds while it waits, so the cap follows the fd limit."""

    def __init__(self) -> None:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
        self.limit = max(16, min(4096, soft // 8))
        self.live = 0

    def take(self) -> bool:
        if self.live >= self.limit:
            return False
        self.live += 1
        return True

    def give(self) -> None:
        self.live -= 1


_HOST_CONNECTS = _HostCap()
