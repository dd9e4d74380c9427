"""Back-pressure on host resources: how many sandboxes one process keeps open
at once, and host-resource exhaustion as an error that names itself.

Each open sandbox holds file descriptors (its workdir marker, uid lease,
zviz-init, /dev/null, the supervisor's epoll, the zygote's pidfd, control
socket and seccomp listener) and each running command a few more (pidfd,
three pipes, the status pipe, a listener without the zygote). A process that
opens sandboxes without bound runs out of fds in the middle of a setup, where
every failure costs a cleanup. So `open_sandbox` waits for a slot instead:

    ZVIZ_MAX_SANDBOXES   open sandboxes per process (default: the soft
                         RLIMIT_NOFILE // FDS_PER_SANDBOX, at least 1)

Waiting is FIFO within an event loop; sandboxes opened from several threads'
event loops share the bound (a waiter on another loop polls every 50 ms).

The egress proxies (net.mode = "domains") hold fds for their sandboxes'
connections (`FDS_PER_CONNECTION` each), at a rate the sandboxed code
chooses: they take them from the same ledger (`take_fds`), and may hold at
most half of the process's fds between them, so a sandbox that opens
connections by the hundred is refused more of them (an event naming the
limit) instead of leaving the other sandboxes of the process with none
(EMFILE in their next command). A new sandbox waits while the ledger is full.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel

from ._errors import PolicyError, ResourceExhausted, SandboxSetupError

ENV = "ZVIZ_MAX_SANDBOXES"
# A sandbox with one running command holds ~15 fds (measured: 14 for Policy.python() in round 16, its
# memory cgroup's three open files included; tests/test_capacity.py), with streams being set up a few
# more; 24 leaves room for the caller's own.
FDS_PER_SANDBOX = 24
FDS_PER_CONNECTION = 6  # a proxied connection at its most: two sockets and a pipe each way (_egress)
EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN)


def _soft_nofile() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def max_sandboxes() -> int:
    text = os.environ.get(ENV, "")
    if text:
        if not text.isdigit() or int(text) < 1:
            raise PolicyError(ENV, text, "a positive integer: how many sandboxes one process keeps open at once")
        return int(text)
    return max(1, _soft_nofile() // FDS_PER_SANDBOX)


def fd_budget() -> int:
    """The fds the ledger hands out: the soft RLIMIT_NOFILE (or what
    ZVIZ_MAX_SANDBOXES sandboxes take, if that is more: the caller's word)."""
    return max(_soft_nofile(), max_sandboxes() * FDS_PER_SANDBOX)


class _Waiter:
    __slots__ = ("event", "token")

    def __init__(self) -> None:
        self.token = anyio.lowlevel.current_token()
        self.event = anyio.Event()


class _Gate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.proxy_fds = 0  # held by the egress proxies' connections (take_fds)
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def take_fds(self, n: int) -> bool:
        """`n` fds for an egress proxy's connection, if the proxies hold less
        than half of the budget with them and the open sandboxes' share stays
        free; False: refuse the connection (give them back with `give_fds`)."""
        with self._lock:
            budget = fd_budget()
            if (self.proxy_fds + n > budget // 2
                    or self.proxy_fds + n + self.active * FDS_PER_SANDBOX > budget):
                return False
            self.proxy_fds += n
            return True

    def give_fds(self, n: int) -> None:
        with self._lock:
            self.proxy_fds -= n

    def _try_enter(self, me: _Waiter | None) -> bool:
        with self._lock:
            room = (self.active + 1) * FDS_PER_SANDBOX + self.proxy_fds <= fd_budget()  # (what proxies hold)
            if self.active < max_sandboxes() and room and (not self._waiters or self._waiters[0] is me):
                if me is not None:
                    self._waiters.popleft()
                self.active += 1
                return True
            if me is not None and me not in self._waiters:
                self._waiters.append(me)
            return False

    async def enter(self) -> None:
        if self._try_enter(None):
            return
        me = _Waiter()
        try:
            while not self._try_enter(me):
                with anyio.move_on_after(0.05):  # a slot freed on another thread's loop is polled
                    await me.event.wait()
                if me.event.is_set():
                    me.event = anyio.Event()
        except BaseException:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(me)
            raise

    def waiting(self) -> bool:
        """Someone waits for a slot (the sandbox pool then makes none)."""
        return bool(self._waiters)

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            head = self._waiters[0] if self._waiters else None
        if head is not None:
            try:
                same_loop = head.token == anyio.lowlevel.current_token()
            except RuntimeError:
                same_loop = False
            if same_loop:
                head.event.set()


GATE = _Gate()


@contextlib.asynccontextmanager
async def slot() -> AsyncIterator[None]:
    """One of the process's sandbox slots, for the life of a sandbox."""
    await GATE.enter()
    try:
        yield
    finally:
        GATE.leave()


@contextlib.contextmanager
def exhaustion_as_error(step: str) -> Iterator[None]:
    """A host resource that ran out (EMFILE, ENFILE, ENOMEM, EAGAIN) during a
    setup step becomes `ResourceExhausted`, which names the limit and the fix."""
    try:
        yield
    except ResourceExhausted:
        raise
    except OSError as e:
        if e.errno not in EXHAUSTION:
            raise
        where = e.step if isinstance(e, SandboxSetupError) else step
        path = e.path if isinstance(e, SandboxSetupError) else (e.filename if isinstance(e.filename, str) else None)
        raise ResourceExhausted(where, e.errno, path) from e
