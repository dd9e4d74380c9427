"""`Process` (one command in a sandbox) and the loop that runs one to its end.

A Process owns its pidfd, its init-status pipe and its stdio pipe ends (the
seccomp listener of a full spawn is the supervisor's). It knows nothing of the
Sandbox that made it: what it needs from it comes in as values and callbacks
(`Hooks`), and what the sandbox needs from it is the functions of this module.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import select
import signal
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio
import attrs

from . import _kernel, _zygote
from ._errors import SandboxClosedError
from ._kernel import OwnedFd
from ._proxy import Collector, FdReceiveStream, FdSendStream, Pacer
from ._records import RunResult, Tally, cpu_limit
from ._supervisor import RunAccount

PROGRAM_WAIT_S = 0.05  # how long a signal waits for the program's zviz-init to fork it (~0.1-0.3 ms)


@attrs.frozen
class Hooks:
    """What a Process needs from its sandbox."""

    pid_ns: bool  # its tree is a pid namespace (else its process group)
    ended: Callable[[Process], None]  # called once, when it has been reaped
    flush: Callable[[], Awaitable[None]]  # returns once the supervisor has recorded every denial it received
    # a zygote's run killed before its run-init cleaned up: wait until the zygote has killed what it left
    settle: Callable[[], Awaitable[None]] | None = None  # (None for a full spawn)
    closing: Callable[[], bool] | None = None  # the sandbox is being closed (its teardown kills everything)
    our_child: bool = True  # its pid is our child (False: a warm snippet's pid 1, the fork server's, _warm.py)


class Process:
    """A command running in a sandbox. Made by `Sandbox.start`; no public
    constructor. An async context manager: leaving the block kills the
    command (if still running), reaps it and closes its streams.

    `stdin`/`stdout`/`stderr` are streams (anyio's ByteSendStream /
    ByteReceiveStream and trio's SendStream / ReceiveStream), or None when
    not requested; `stdin_stream()` etc. return them typed non-optional."""

    def __init__(self, argv: tuple[str, ...], spawned: _kernel.Spawned, account: RunAccount,
                 stdin: FdSendStream | None, stdout: FdReceiveStream | None, stderr: FdReceiveStream | None,
                 listener_done: anyio.Event | None, started: float, status: OwnedFd, hooks: Hooks) -> None:
        self.argv = argv
        self._pid = spawned.pid
        self._hooks = hooks
        # started by the sandbox's zygote: pidfd of its run-init, not our child
        self._zrun = hooks.settle is not None
        self._orphans_pending = False  # killed before its run-init cleaned up: the zygote does
        self._pidfd = spawned.pidfd
        self._account = account
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        for st in (stdout, stderr):
            if st is not None:
                st.on_overflow = self._over_output
        self._listener_done = listener_done
        self._status_fd = status
        self._started = started
        self._status: int | None = None
        self._cpu = 0.0
        self._maxrss = 0
        self._ended: float | None = None
        self.timed_out = False
        self.limit: str | None = None  # which policy limit ended it: wall_s, output
        self._watchdog: anyio.CancelScope | None = None
        self._closed = False
        # The sandbox was closed under `run()`'s loop (its teardown reaps the
        # process and closes its fds, in the sandbox's own task; the loop waits
        # on those fds in the caller's task and is woken through its scope).
        self._sandbox_closed = False
        self._driver: anyio.CancelScope | None = None
        self._wait_lock = anyio.Lock()  # wait() from several tasks (a caller's, the teardown's)

    async def __aenter__(self) -> Process:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await finish(self)

    def stdin_stream(self) -> FdSendStream:
        """`stdin`, typed non-optional; ValueError if it was not requested."""
        if self.stdin is None:
            raise ValueError("this process has no stdin stream: start(..., stdin=True)")
        return self.stdin

    def stdout_stream(self) -> FdReceiveStream:
        """`stdout`, typed non-optional; ValueError if it was not requested."""
        if self.stdout is None:
            raise ValueError("this process has no stdout stream: start(..., stdout=True)")
        return self.stdout

    def stderr_stream(self) -> FdReceiveStream:
        """`stderr`, typed non-optional; ValueError if it was not requested."""
        if self.stderr is None:
            raise ValueError("this process has no stderr stream: start(..., stderr=True)")
        return self.stderr

    def _over_output(self) -> None:
        # Output past the policy's limit cannot be delivered: stop the flood at its source.
        if self._status is None and self.limit is None:
            self.limit = "output"
            self.kill()

    def __repr__(self) -> str:
        state = "running" if self._status is None else f"exited status={self._status}"
        return f"<zviz.Process pid={self.pid} argv={list(self.argv)!r} {state}>"

    @property
    def pid(self) -> int:
        """Host pid of the process that stands for the command (zviz-init of
        its run, whose child is the program); -1 once it is gone."""
        if self._pid < 0 and not self._pidfd.closed:
            self._pid = _zygote.pidfd_pid(self._pidfd)
        return self._pid

    @property
    def returncode(self) -> int | None:
        """Like subprocess: exit code, -N when killed by signal N, None while
        running. Polled: set as soon as the process has exited, without a
        `wait()` (a look at its pidfd, no blocking)."""
        if self._status is None:
            self._poll()
        if self._status is None:
            return None
        if os.WIFSIGNALED(self._status):
            return -os.WTERMSIG(self._status)
        return os.WEXITSTATUS(self._status)

    @property
    def denials(self) -> Mapping[str, int]:
        return types.MappingProxyType(dict(self._account.denials))

    def _poll(self) -> None:
        if self._status is None and not self._pidfd.closed and _kernel.pidfd_exited(self._pidfd):
            self._reap()

    @property
    def pid_in_sandbox(self) -> int | None:
        """The program's pid as the sandbox sees it (`os.getpid()` inside); None once it has exited."""
        found = self._program()
        if found is None:
            return None
        pidfd, nspid = found
        pidfd.close()
        return nspid

    def _program(self) -> tuple[OwnedFd, int] | None:
        """A pidfd of the program (its zviz-init's child; not forked yet right after the start: looked for
        again for a while, a signal sent then was dropped) and its pid in the sandbox; None when gone."""
        live = self._status is None and not self._pidfd.closed
        return _kernel.child_pidfd(self.pid, self._pidfd, wait_s=PROGRAM_WAIT_S) if live else None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the program (not to the zviz-init that runs it; right after the start, once it is
        forked). SIGKILL is `kill()`: the whole tree. No-op once it has exited."""
        sig = signal.Signals(sig)
        if sig == signal.SIGKILL:
            self.kill()
            return
        found = self._program()
        if found is None:
            return
        pidfd, _ = found
        try:
            _kernel.pidfd_kill(pidfd, sig)
        finally:
            pidfd.close()

    def terminate(self) -> None:
        """SIGTERM to the program (it may catch it); `kill()` cannot be caught."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the command and everything it started (its pid namespace)."""
        if self._status is None and not self._pidfd.closed:
            _kernel.pidfd_kill(self._pidfd)
            self._kill_group()

    def _kill_group(self) -> None:
        # Without a pid namespace the tree is the process group (setsid in the
        # stage). The group id is our unreaped child's pid: it cannot be reused.
        # With one, killing init (pid 1) already took the whole tree.
        if self._hooks.pid_ns:
            return
        if self._status is None or not self._pidfd.closed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for exit; returns `returncode`. Once it returns, no process
        of the command is left."""
        if self._status is None:
            # One task at a time waits on the pidfd (two waiters on one fd are an error on trio and
            # asyncio): the others queue here, and find it reaped (or take over from a cancelled one).
            try:  # (acquire() always yields: try without first)
                self._wait_lock.acquire_nowait()
            except anyio.WouldBlock:
                await self._wait_lock.acquire()
            try:
                if self._status is None:
                    try:
                        await anyio.wait_readable(self._pidfd.fd)
                    except anyio.ClosedResourceError:
                        pass  # reaped by another task meanwhile (returncode, run()'s loop, teardown)
                    self._reap()
            finally:
                self._wait_lock.release()
        await self._settle()
        rc = self.returncode
        assert rc is not None
        return rc

    async def _settle(self) -> None:
        # A run-init killed before its cleanup (timeout, kill(), or the
        # command's own doing) leaves the run's orphans to the zygote, which
        # kills them when it reaps it: the barrier returns after that.
        if self._orphans_pending and self._hooks.settle is not None:
            self._orphans_pending = False
            await self._hooks.settle()

    def _reap(self) -> None:
        if self._status is not None:
            return
        status: int
        ru: resource.struct_rusage | None
        if self._zrun or not self._hooks.our_child:
            # The zygote reaps its run-inits, the fork server a warm snippet's pid 1 (wait4 here would fail,
            # or wait for whichever child of ours got its pid once it was reaped); killed before it reported,
            # it ended by SIGKILL (ours, the OOM killer's, its parent's death), and what a run left is the
            # zygote's to kill (see _settle).
            status, ru = int(signal.SIGKILL), None
        else:
            # Everything else in its process group goes too (no-op with a pid ns).
            self._kill_group()
            try:
                _pid, status, ru = os.wait4(self.pid, 0)
            except ChildProcessError:  # reaped by someone else (waitpid(-1) in the host program)
                status, ru = 0x7F00, None
        # zviz-init (pid 1) reports the program's own status and usage; if init
        # itself was killed (timeout, kill()), its status is the truth.
        reported = _kernel.read_init_status(self._status_fd)
        self._status_fd.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if reported is None and self._zrun:
            self._orphans_pending = True
        if reported is not None:
            self._status = reported.wstatus
            self._cpu = reported.utime + reported.stime
            self._maxrss = reported.maxrss_kb * 1024
        else:
            self._status = status
            self._cpu = (ru.ru_utime + ru.ru_stime) if ru else 0.0
            self._maxrss = 0  # init's own figure would be the supervisor's (see _init.c)
        self._ended = time.monotonic()
        if not self._pidfd.closed:
            anyio.notify_closing(self._pidfd.fd)
        self._pidfd.close()
        self._hooks.ended(self)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the program and every descendant it reaped."""
        return self._cpu

    @property
    def peak_rss(self) -> int:
        """Largest resident set (bytes) of the program or a reaped descendant;
        0 when the program was killed before zviz-init could report it."""
        return self._maxrss

    def _interrupt(self) -> None:
        """Teardown, before it closes this process's fds: the sandbox is
        closing. A `run()` waiting on them stops now and raises
        SandboxClosedError (an fd closed under an epoll set just leaves it:
        no event would ever come)."""
        if self._driver is not None:  # (not once its loop is over: it has its result, or timed out)
            self._sandbox_closed = True
            self._driver.cancel()

    def _close_streams(self, *, sandbox_closed: bool = False) -> None:
        self._closed = True
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                if sandbox_closed:  # a task reading or writing it is told why
                    s.sandbox_closed = True
                s.close()
        self._status_fd.close()


# ---------------------------------------------------------------- what the sandbox does with one


def arm_watchdog(proc: Process) -> anyio.CancelScope:
    """The watchdog's scope, made before its task runs: a process reaped
    before the task first runs has already cancelled it (else the task would
    sleep the whole timeout, holding the sandbox's task group open)."""
    scope = anyio.CancelScope()
    proc._watchdog = scope  # cancelled when the process is reaped
    if proc._status is not None:
        scope.cancel()
    return scope


async def watchdog(proc: Process, timeout: float, scope: anyio.CancelScope) -> None:
    """Kill `proc` after `timeout` seconds (a task of the sandbox's group;
    `scope` from arm_watchdog)."""
    with scope:
        if proc._status is not None:
            return
        await anyio.sleep(timeout)
        if proc._status is None:
            proc.timed_out = True
            proc.limit = "wall_s"
            proc.kill()


OutputCallback = Callable[[bytes], "Awaitable[None] | None"]


async def run_to_end(proc: Process, stdin: bytes, *, timeout: float, output_cap: int | None,
                     cpu_limit_s: float | None, tally: Tally,
                     resource_limit: Callable[[int], str | None], on_stdout: OutputCallback | None = None,
                     on_stderr: OutputCallback | None = None) -> RunResult:
    """`Sandbox.run` once the process is started: feed, capture, time out,
    reap, and make the result. `resource_limit(status)` names a sandbox-wide
    limit (memory, disk) that ended it, if any."""
    out, err = Collector(output_cap, proc._over_output), Collector(output_cap, proc._over_output)
    # A close from now until the loop ends cancels this scope (teardown, _interrupt); one before (its
    # fds closed already) is seen here.
    proc._driver = anyio.CancelScope()
    proc._sandbox_closed = proc._closed
    try:
        try:
            with anyio.move_on_after(timeout) as scope, proc._driver:
                if not proc._sandbox_closed:
                    await _drive(proc, stdin, out, err, on_stdout, on_stderr)
        finally:
            proc._driver = None
        if scope.cancelled_caught and not proc._sandbox_closed:
            proc.timed_out = True
            proc.limit = proc.limit or "wall_s"
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await finish(proc)
    status = proc._status or 0
    if not proc._sandbox_closed and proc._hooks.closing is not None and proc._hooks.closing():
        # Its loop saw the end before the teardown came to it, but a SIGKILL nobody asked
        # for (no timeout, no limit) while the sandbox closes is the close's.
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        proc._sandbox_closed = killed and not proc.timed_out and proc.limit is None
    if proc._sandbox_closed:
        # Killed by the close, not by its timeout or a limit: no result, but the output so far.
        raise SandboxClosedError(f"the sandbox was closed while {proc.argv[0]!r} ran (from another task or thread, "
                                 "or its block or event loop ended): the command was killed; what it had written "
                                 "is on this error's .stdout and .stderr", stdout=out.value(), stderr=err.value())
    # (run() reads and writes the pipes itself: the streams did not count)
    tally.bytes["stdout"] += out.total
    tally.bytes["stderr"] += err.total
    if proc.stdin is not None:
        tally.bytes["stdin"] += proc.stdin.bytes_sent
    if proc.limit is None:
        proc.limit = resource_limit(status)
    return RunResult(
        argv=proc.argv,
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        stdout=out.value(), stderr=err.value(), timed_out=proc.timed_out,
        limit=proc.limit or cpu_limit(status, proc.cpu_s, cpu_limit_s),
        truncated=out.truncated or err.truncated,
        wall_s=(proc._ended or time.monotonic()) - proc._started,
        cpu_s=proc.cpu_s, peak_rss=proc.peak_rss, denials=dict(proc._account.denials),
    )


async def _drive(proc: Process, data: bytes, out: Collector, err: Collector,
                 on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> None:
    """One task, one epoll set: feed stdin, drain stdout and stderr, and
    reap the process when its pidfd fires. Returns when it has exited and
    both pipes reached EOF (or 2 s after exit: without a pid namespace a
    descendant that left the process group could hold a pipe open)."""
    assert proc.stdout is not None and proc.stderr is not None
    ep = select.epoll()
    try:
        pidfd = proc._pidfd.fd
        sinks = {proc.stdout._fd.fd: out, proc.stderr._fd.fd: err}
        callbacks = {}
        if on_stdout is not None:
            callbacks[proc.stdout._fd.fd] = on_stdout
        if on_stderr is not None:
            callbacks[proc.stderr._fd.fd] = on_stderr
        for fd in sinks:
            ep.register(fd, select.EPOLLIN)
        ep.register(pidfd, select.EPOLLIN)
        stdin_fd = -1
        view = memoryview(data)
        if proc.stdin is not None:
            stdin_fd = proc.stdin._fd.fd
            if view:
                ep.register(stdin_fd, select.EPOLLOUT)
            else:
                proc.stdin.close()
        exited_at: float | None = None
        pacer = Pacer()  # (a command that never lets its pipes run dry always has an event ready)
        while sinks or proc._status is None:
            if exited_at is not None and time.monotonic() - exited_at > 2.0:
                break
            events = ep.poll(0)
            if not events:
                with anyio.move_on_after(float("inf") if exited_at is None else 2.0 - (time.monotonic() - exited_at)):
                    await anyio.wait_readable(ep.fileno())
                continue
            await pacer.pace()
            for fd, _ev in events:
                if fd == pidfd:
                    ep.unregister(pidfd)
                    proc._reap()
                    exited_at = time.monotonic()
                elif fd == stdin_fd:
                    try:
                        n = os.write(fd, view[:65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # EPIPE: the reader is gone
                        n = len(view)
                    assert proc.stdin is not None
                    proc.stdin.bytes_sent += n
                    view = view[n:]
                    if not view:
                        ep.unregister(fd)
                        proc.stdin.close()
                        stdin_fd = -1
                elif fd in sinks:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        sinks[fd].feed(chunk)
                        cb = callbacks.get(fd)
                        if cb is not None:
                            res = cb(chunk)
                            if inspect.isawaitable(res):
                                await res
                    else:
                        ep.unregister(fd)
                        del sinks[fd]
        await anyio.lowlevel.checkpoint_if_cancelled()
    finally:
        anyio.notify_closing(ep.fileno())
        ep.close()


async def finish(proc: Process) -> None:
    """Kill if still running, reap, let the supervisor drain, close streams."""
    if proc._status is None:
        proc.kill()
    await proc.wait()
    if proc._closed:
        return
    await proc._hooks.flush()  # its denials' events are out
    if proc._listener_done is not None:
        # The listener hangs up once no task of its filter is left; the
        # supervisor answers what is pending first.
        with anyio.move_on_after(1.0):
            await proc._listener_done.wait()
    proc._close_streams()


async def reap_all(procs: Iterable[Process]) -> None:
    """Teardown: kill every process, wait for each, close its streams."""
    procs = list(procs)
    for p in procs:
        p._interrupt()
        p.kill()
    for p in procs:
        if p._status is None:
            await p.wait()
        p._close_streams(sandbox_closed=True)
