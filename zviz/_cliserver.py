"""The CLI server: runs `zviz run` for the thin clients of one context (_cliclient.py).

Why this module is long: every check between a request and a sandbox made
for it (who connected, who sent it, the challenge, the request's shape) and
every bound on what a client can cost the others (its streams, the log) is
here, next to the loop that applies them, so that one reading shows all of
them; the peer's context itself is _cliclient's (the client checks the server
with it too).

One server per user and context (the key: the zviz package's files, the
interpreter, zviz's environment, the process's kernel context) listens on a
SOCK_SEQPACKET unix socket in the private `srv/` directory of the start-up
cache, `<name>.sock`, while it holds `<name>.lock` (flock: one server per
name; a second one started by a race exits). Its log is `<name>.log`.

A connection is served only when the connecting process's context, read from
/proc through its pidfd (SO_PEERPIDFD, so the pid cannot have been reused
meanwhile), and then that of the request's sender (its pidfd comes with the
message: SO_PASSPIDFD), equal the server's own: same uid and gids, capabilities,
no_new_privs, seccomp mode and filter count, namespaces, cgroup, LSM label
and rlimits. A process inside a sandbox (its own user and pid namespaces)
or one more confined than the server is refused: its `zviz run` runs in its
own process. Landlock, which /proc does not show, is caught by a challenge:
the client must open one of the server's fds through /proc (ptrace access,
which a Landlocked process lacks to anything outside its domain). On a
kernel without SO_PEERPIDFD (before 6.5) the server cannot check that,
writes `<name>.off` with the reason, and exits; clients then run every
command themselves.

A request is one message: the protocol, the client's key, its working
directory, which of its fds 0-2 are open, and the arguments; the open ones
of those fds come with it (SCM_RIGHTS). The server challenges the client
(`_challenge`), answers "accepted", runs
`_cli.serve_request` with the client's fds as the command's stdio and as its
own sys.stdout/sys.stderr (per request, through a context variable), and
answers the exit status. A client that hangs up or forwards a signal gets
its sandbox killed (the status is 128 + the signal, SIGHUP for a hang-up).
The server exits after `ZVIZ_SERVER_IDLE` seconds (300) with no request; it
first removes its socket, then drops the connections still queued on it
(their clients see the hang-up before "accepted" and run the command
themselves).

Requests of one server share its process: its pool of pre-started
sandboxes (size 1 per policy unless ZVIZ_POOL_SIZE says otherwise; a
policy is pooled from its second request on), its start-up caches, its
bound on open sandboxes.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import fcntl
import io
import math
import os
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio

from . import _cliclient
from ._cliclient import ACCEPTED, CHALLENGE, EXITED, KILL, MAX_REQUEST, PROOF, PROTOCOL

if TYPE_CHECKING:
    from ._policy import Policy

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", _cliclient.SO_PEERPIDFD)
IDLE_ENV = "ZVIZ_SERVER_IDLE"
IDLE_S = 300.0
REQUEST_TIMEOUT_S = 5.0  # from the connection to the whole request
MAX_CLIENTS = 256  # connections served at once; more wait in the listen queue
MAX_LOG = 1 << 20  # bytes: the log is emptied past this
SEEN_POLICIES = 64  # policies remembered for _pool_for
WRITE_TIMEOUT_S = 2.0  # the most one message to a client's stdout/stderr may hold the server up

Stdio = tuple[int | None, int | None, int | None]
_streams: contextvars.ContextVar[tuple[io.TextIOBase, io.TextIOBase] | None] = contextvars.ContextVar(
    "zviz_cli_streams", default=None)


class _FdText(io.TextIOBase):
    """A client's stdout or stderr as a text stream (what print and argparse write)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def end(self) -> None:
        """The request is over: later writes (from a task that outlived it) are dropped."""
        self._fd = None

    def isatty(self) -> bool:
        return self._fd is not None and os.isatty(self._fd)

    def write(self, s: str) -> int:
        """Never blocks the server for long: a client that does not read its
        stderr loses what does not fit within WRITE_TIMEOUT_S, and everything
        written to it after (one wait per stream and request, not one per
        write: a traceback is dozens of writes)."""
        data = s.encode("utf-8", "replace")
        if not data or self._fd is None:
            return len(s)
        fd = self._fd
        try:
            was_blocking = os.get_blocking(fd)
            if was_blocking:
                os.set_blocking(fd, False)  # (the client's description: restored below)
        except OSError:
            self._fd = None
            return len(s)
        try:
            deadline = time.monotonic() + WRITE_TIMEOUT_S
            while data:
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:
                    import select

                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._fd = None  # (stuck: the rest of this request's messages are dropped)
                        break
                    select.select([], [fd], [], min(left, 0.1))
                except OSError:
                    self._fd = None  # the client's end is gone: the rest is dropped
                    break
        finally:
            if was_blocking:
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, True)
        return len(s)


class _PerRequest(io.TextIOBase):
    """sys.stdout or sys.stderr of the server: the current request's, else the log."""

    def __init__(self, which: int, fallback: Any) -> None:
        self._which = which
        self._fallback = fallback

    def _target(self) -> Any:
        got = _streams.get()
        return self._fallback if got is None else got[self._which]

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(self._target().isatty())

    def write(self, s: str) -> int:
        return int(self._target().write(s))

    def flush(self) -> None:
        self._target().flush()


def main(name: str) -> None:
    """The server's process (started by a client, in its own session)."""
    log = sys.stderr
    key = _cliclient.key()
    if _cliclient.name_of(key) != name:
        print(f"zviz server: this process's context is not the one of {name}: not serving", file=log)
        return
    os.chdir("/")
    try:
        dfd = _cliclient.open_server_dir()
    except OSError as e:
        print(f"zviz server: {e}", file=log)
        return
    lock = os.open(f"/proc/self/fd/{dfd}/{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server of this name runs
    os.ftruncate(lock, 0)
    os.write(lock, str(os.getpid()).encode())  # (for stop_servers)
    _trim_log()
    unavailable = _peer_checks_unavailable()
    if unavailable:
        off = f"/proc/self/fd/{dfd}/{name}.off"
        with contextlib.suppress(OSError):
            # (a fresh file: whatever is at that name, a link planted by a sandbox
            # that may write in the cache directory too, is replaced, never followed)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(off)
            fd = os.open(off, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (unavailable + "\n").encode())
            finally:
                os.close(fd)
        print(f"zviz server: {unavailable}: not serving (clients run commands themselves)", file=log)
        return
    path = f"/proc/self/fd/{dfd}/{name}.sock"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead server's (we hold the lock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    # every message carries a pidfd of its sender (SCM_PIDFD): the request is
    # checked against who sent it, not only who connected (accepted sockets inherit it)
    listener.setsockopt(socket.SOL_SOCKET, _cliclient.SO_PASSPIDFD, 1)
    listener.listen(64)
    listener.setblocking(False)
    sock_id = os.stat(path, follow_symlinks=False).st_ino
    sys.stdout = _PerRequest(0, sys.stdout)
    sys.stderr = _PerRequest(1, log)
    idle = _idle_seconds(os.environ.get(IDLE_ENV) or "")
    print(f"zviz server {name}: pid {os.getpid()}, serving (idle exit after {idle:g} s)", file=log, flush=True)
    try:
        anyio.run(_serve, listener, key, idle, backend="asyncio")
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path, follow_symlinks=False).st_ino == sock_id:
                os.unlink(path)
        listener.close()
        os.close(dfd)
        print(f"zviz server {name}: exited", file=log, flush=True)


def _idle_seconds(text: str) -> float:
    """ZVIZ_SERVER_IDLE: seconds > 0 ("inf": never), else IDLE_S, said in the log
    (nan made the accept loop spin, a negative value a server per client)."""
    try:
        idle = float(text or IDLE_S)
    except ValueError:
        idle = math.nan
    if not idle > 0:
        print(f"zviz server: {IDLE_ENV}={text!r} is not a number of seconds > 0: {IDLE_S:g} s used", file=sys.stderr)
        return IDLE_S
    return idle


def stop_servers(timeout: float = 5.0) -> list[int]:
    """Stop this user's CLI servers of every context (`zviz gc`): SIGTERM, then
    wait for each to let go of its lock; remove the files of stopped and dead
    ones. The pids signalled."""
    try:
        dfd = _cliclient.open_server_dir()
    except OSError:
        return []
    stopped = []
    try:
        for entry in os.listdir(f"/proc/self/fd/{dfd}"):
            if not entry.endswith(".lock"):
                continue
            try:
                lock = os.open(f"/proc/self/fd/{dfd}/{entry}", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _remove_files(dfd, entry[:-len(".lock")])  # a dead server's (we hold its lock)
                    continue
                except BlockingIOError:
                    pass
                text = os.pread(lock, 32, 0)
                if not text.isdigit():
                    continue
                pid = int(text)
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    # (the file's pid is whatever was written there: signal it only if
                    # it is this name's server, holding this very lock)
                    if not _is_server(pid, entry[:-len(".lock")], os.fstat(lock)):
                        continue
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                        stopped.append(pid)
                finally:
                    os.close(pidfd)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        _remove_files(dfd, entry[:-len(".lock")])
                        break
                    except BlockingIOError:
                        time.sleep(0.01)
            finally:
                os.close(lock)
    finally:
        os.close(dfd)
    return stopped


def _remove_files(dfd: int, name: str) -> None:
    """A stopped or dead server's socket, marker, log and lock (the caller holds the lock)."""
    for suffix in (".sock", ".off", ".log", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/proc/self/fd/{dfd}/{name}{suffix}")


def _is_server(pid: int, name: str, lock: os.stat_result) -> bool:
    """Whether process `pid` is the server `name` and holds the flock on the file `lock`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if f"main({name!r})".encode() not in cmdline.read():
                return False
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            held = [line.split() for line in locks.read().splitlines()]
    except OSError:
        return False
    where = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    return any(f[1:2] == ["FLOCK"] and f[4:6] == [str(pid), where] for f in held)


def _log(line: str) -> None:
    """A line in the log (fd 2), emptied past MAX_LOG: nothing a client, or a
    refused process that reaches the socket, does may grow it without bound."""
    print(line, file=sys.__stderr__, flush=True)
    with contextlib.suppress(OSError):
        if os.fstat(2).st_size > MAX_LOG:
            _trim_log()


class _Refused:
    last = -1.0
    unlogged = 0


def _log_refusal(why: str) -> None:
    """At most one line a second: a refused process may connect as often as it likes."""
    now = time.monotonic()
    if now - _Refused.last < 1.0:
        _Refused.unlogged += 1
        return
    more = f" (and {_Refused.unlogged} more since the last line)" if _Refused.unlogged else ""
    _Refused.last, _Refused.unlogged = now, 0
    _log(f"zviz server: refused a connection: {why}{more}")


def _trim_log() -> None:
    """Empty the log (fd 2: this server's, opened O_APPEND by the client that started it)."""
    with contextlib.suppress(OSError):
        if os.path.isfile("/proc/self/fd/2") and not os.isatty(2):
            os.ftruncate(2, 0)


def _peer_checks_unavailable() -> str:
    """Why this kernel cannot tell the server who connects (SO_PEERPIDFD), or ""."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pidfd = a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        os.close(pidfd)
    except OSError as e:
        return f"SO_PEERPIDFD is not supported ({e.strerror}; Linux >= 6.5)"
    finally:
        a.close()
        b.close()
    return ""


async def _serve(listener: socket.socket, key: bytes, idle: float) -> None:
    import warnings

    from . import _cli, _sandbox  # noqa: F401  (loaded now: the first request does not wait for them)
    from ._errors import ZvizWarning
    from ._pool import ENV as POOL_ENV, set_pool_size

    warnings.simplefilter("default", ZvizWarning)
    warnings.formatwarning = lambda msg, cat, *rest, **kw: f"zviz: warning: {msg}\n"
    if not os.environ.get(POOL_ENV):
        set_pool_size(1)
    own = _cliclient.context("/proc/self")
    active = 0
    last = time.monotonic()
    limiter = anyio.CapacityLimiter(MAX_CLIENTS)

    async def handle(conn: socket.socket) -> None:
        nonlocal active, last
        try:
            async with limiter:
                await _handle(conn, key, own)
        except Exception as e:  # noqa: BLE001  (a bug: logged, the server goes on)
            _log(f"zviz server: a request failed: {e!r}")
        finally:
            conn.close()
            active -= 1
            last = time.monotonic()

    async def stop_on_signal(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                _log(f"zviz server: signal {signum}: closing every sandbox and exiting")
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope)
        while True:
            wait = max(0.0, last + idle - time.monotonic()) if active == 0 else idle
            with anyio.move_on_after(wait):
                await anyio.wait_readable(listener)
            if active == 0 and time.monotonic() - last >= idle:
                break
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            refused = _refusal(conn, own)
            if refused:
                _log_refusal(refused)
                conn.close()
                continue
            active += 1
            tg.start_soon(handle, conn)
        tg.cancel_scope.cancel()


def _refusal(conn: socket.socket, own: bytes) -> str:
    """Why the process at the other end may not use this server, or ""."""
    return _cliclient.peer_refusal(conn, own)


async def _handle(conn: socket.socket, key: bytes, own: bytes) -> None:
    with anyio.move_on_after(REQUEST_TIMEOUT_S):
        await anyio.wait_readable(conn)
    try:
        data, anc, flags, _ = conn.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(3 * 4) + socket.CMSG_SPACE(4),
                                           socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return
    fds: list[int] = []
    senders: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind in (socket.SCM_RIGHTS, _cliclient.SCM_PIDFD):
            usable = len(payload) - len(payload) % 4
            (fds if kind == socket.SCM_RIGHTS else senders).extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    try:
        # who sent it (the connection may have changed hands since the check at accept)
        refused = _sender_refusal(senders, own)
        if refused:
            _log_refusal(f"a request's sender: {refused}")
            return
        request = _parse(data, flags, fds, key)
        if request is None:
            return
        args, stdio, cwd = request
        refused = await _challenge(conn)
        if refused:
            _log_refusal(f"a request's sender: {refused}")
            return
        conn.send(ACCEPTED)
        status = await _run(conn, args, stdio, cwd)
        _log(f"zviz server: served a request: exit status {status}")
        with contextlib.suppress(OSError):
            conn.send(EXITED + str(status).encode())
    finally:
        for fd in fds + senders:
            os.close(fd)


async def _challenge(conn: socket.socket) -> str:
    """Why the client failed to show that it may look into this process, or "".
    It is asked for a fresh fd of this process, which it can only get by opening
    /proc/THIS/fd/N: that needs ptrace access, which a process in a Landlock
    domain has to no process outside it. /proc shows no Landlock domain, and
    once no_new_privs is set (a server started from such a context) the domain
    a client entered changes nothing else that /proc shows."""
    r, w = os.pipe2(os.O_CLOEXEC)
    got: list[int] = []
    try:
        conn.send(CHALLENGE + str(r).encode())
        with anyio.move_on_after(REQUEST_TIMEOUT_S):
            await anyio.wait_readable(conn)
        try:
            data, anc, _, _ = conn.recvmsg(16, socket.CMSG_SPACE(4) * 2, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return "no answer to the challenge"
        rights = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET:
                usable = len(payload) - len(payload) % 4
                fds = list(struct.unpack(f"{usable // 4}i", payload[:usable]))
                got.extend(fds)
                if kind == socket.SCM_RIGHTS:
                    rights.extend(fds)
        if data != PROOF or len(rights) != 1:
            return "the client cannot look into this server (a Landlock domain, or another ptrace restriction)"
        a, b = os.fstat(rights[0]), os.fstat(r)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            return "the client answered the challenge with another file"
        return ""
    finally:
        for fd in (r, w, *got):
            os.close(fd)


def _sender_refusal(senders: list[int], own: bytes) -> str:
    """Why the sender of a request (its pidfd, SCM_PIDFD) may not use this server, or ""."""
    if len(senders) != 1:
        return "no pidfd of the sender"
    pid = 0
    with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{senders[0]}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                pid = int(line.split()[1])
    return _cliclient.process_refusal(senders[0], pid, own)


def _parse(data: bytes, flags: int, fds: list[int], key: bytes) -> tuple[list[str], Stdio, str] | None:
    """A well-formed request of this server's key, else None (the client runs it itself)."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_REQUEST:
        return None
    fields = data.split(b"\0")
    if len(fields) < 5 or fields[0] != PROTOCOL or fields[1] != key or not fields[3].isdigit():
        return None
    mask = int(fields[3])
    if mask > 7 or bin(mask).count("1") != len(fds):
        return None
    cwd = fields[2].decode("utf-8", "surrogateescape")
    if not os.path.isabs(cwd):
        return None
    it = iter(fds)
    stdio: Stdio = tuple(next(it) if mask & (1 << i) else None for i in range(3))  # type: ignore[assignment]
    args = [f.decode("utf-8", "surrogateescape") for f in fields[4:]]
    return args, stdio, cwd


_seen: collections.OrderedDict[Policy, None] = collections.OrderedDict()


def _pool_for(policy: Policy) -> bool:
    """A policy's sandbox comes from the pool (which then keeps one ready for
    it) from its second request on: a policy used once (a one-off --env or
    --timeout) never leaves a pre-started sandbox that nobody takes."""
    again = policy in _seen
    _seen[policy] = None
    _seen.move_to_end(policy)
    while len(_seen) > SEEN_POLICIES:
        _seen.popitem(last=False)
    return again


async def _run(conn: socket.socket, args: list[str], stdio: Stdio, cwd: str) -> int:
    """Run the request; a hang-up or a forwarded signal from the client kills it."""
    streams = (_FdText(stdio[1]), _FdText(stdio[2]))
    _streams.set(streams)  # (this task's context, and copies of it: see below)
    try:
        return await _run_with(conn, args, stdio, cwd)
    finally:
        # A task started meanwhile (the sandbox pool's, which serves every later
        # client) holds a copy of this context: the streams end with the request,
        # before the client's fd numbers are closed and given to the next one's.
        for stream in streams:
            stream.end()


async def _run_with(conn: socket.socket, args: list[str], stdio: Stdio, cwd: str) -> int:
    from . import _cli

    killed = 0
    status = 0
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal killed
            while True:
                await anyio.wait_readable(conn)
                try:
                    msg = conn.recv(16)
                except BlockingIOError:
                    continue
                except OSError:
                    msg = b""
                if msg.startswith(KILL) and msg[1:].isdigit() and 0 < int(msg[1:]) < 65:
                    killed = int(msg[1:])
                elif msg:
                    continue  # (nothing else is expected from a client)
                else:
                    killed = signal.SIGHUP
                tg.cancel_scope.cancel()
                return

        tg.start_soon(watch)
        status = await _cli.serve_request(args, stdio, cwd, _pool_for)
        tg.cancel_scope.cancel()
    return 128 + killed if killed else status
