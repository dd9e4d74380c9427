"""What a sandbox needs from the event loop to live apart from the task that
made it: a task of the loop's own (not a child of any caller's task group),
and a way to wake that loop from a finalizer or another thread.

trio has a system nursery for exactly this (`trio.lowlevel.spawn_system_task`:
cancelled when the main task has returned, i.e. when the loop ends); asyncio's
tasks belong to no scope at all, and `asyncio.run` cancels the ones left when
its main coroutine returns. Either way the task is cancelled at the loop's end,
which is where an unclosed sandbox is torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import types
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import sniffio

from . import _hostside, _kernel, _process
from ._errors import ZvizWarning
from ._events import EventLog
from ._hostside import HostSide
from ._process import Process
from ._records import Tally
from ._resources import HostResources
from ._runner import Runner
from ._supervisor import RunAccount, Supervisor

if TYPE_CHECKING:
    from ._context import CodeContexts
    from ._egress import EgressProxy

AFTER_CALLER_MAX_S = 0.05

# Sandboxes whose aclose() has returned while their service still gives things back.
_detached: set[Life] = set()

# asyncio keeps only weak references to tasks: a running service must not vanish.
_asyncio_tasks: set[asyncio.Task[None]] = set()


def spawn_service(fn: Callable[[], Coroutine[Any, Any, None]], name: str,
                  on_end: Callable[[], None] | None = None) -> None:
    """Run `fn()` as a task of the current event loop that belongs to no
    caller: it outlives the task that started it. It must not raise (on trio a
    system task's exception crashes the run). `on_end` is called when an
    asyncio task ends, even one cancelled before its first step (the loop
    ending right after it was made: then `fn`'s body never ran at all)."""
    if sniffio.current_async_library() == "trio":
        import trio

        from ._proxy import register_with_trio

        register_with_trio()  # idempotent: a sandbox's streams are trio streams on trio
        trio.lowlevel.spawn_system_task(fn, name=name)
        return
    task = asyncio.get_running_loop().create_task(fn(), name=name)
    _asyncio_tasks.add(task)
    task.add_done_callback(_asyncio_tasks.discard)
    if on_end is not None:
        task.add_done_callback(lambda _task: on_end())


def _loop_key() -> object:
    """The current event loop (its trio token, or the asyncio loop)."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    return asyncio.get_running_loop()


def threadsafe_caller() -> Callable[[Callable[[], None]], None]:
    """A function that schedules a callback on the current loop from anywhere
    (another thread, a finalizer); it raises RuntimeError once the loop is gone."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def call_trio(cb: Callable[[], None]) -> None:
            try:
                token.run_sync_soon(cb)
            except trio.RunFinishedError:
                raise RuntimeError("the trio run has finished") from None

        return call_trio
    loop = asyncio.get_running_loop()

    def call_asyncio(cb: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(cb)  # RuntimeError once the loop is closed

    return call_asyncio


class Life:
    """What a sandbox's service task, its finalizer and its processes share.
    It never refers to the Sandbox itself, so that a sandbox nobody closed can
    still be garbage-collected (and then torn down, with a ResourceWarning)."""

    def __init__(self, runner: Runner, tally: Tally, events: EventLog[Any], host: HostSide,
                 resources: HostResources) -> None:
        self.runner = runner
        self.resources = resources
        self.tally = tally
        self.events = events
        self.host = host  # its slot, host uid and workdir (_hostside): given back last
        self.path = host.path
        self.procs: set[Process] = set()
        self.tg: anyio.abc.TaskGroup | None = None  # the service's, with the supervisor
        self.supervisor: Supervisor | None = None
        self.ready = anyio.Event()
        self.close_requested = anyio.Event()
        # Set once no process of the sandbox exists any more (its zygote, pid 1
        # of its pid namespace, is reaped), then `done` once everything else
        # is given back too (fds, cgroup, workdir, uid, slot).
        self.dead = anyio.Event()
        self.done = anyio.Event()
        # aclose() may return at `dead` (the rest then finishes in the service
        # task, in the background): only when nothing the caller can see is
        # left to do, i.e. a workdir of our own that goes, no monitor or trace
        # whose figures come at the end, and a pid namespace (without one,
        # what a command left is killed by uid at the very end). See teardown.
        self.deferrable = False
        self.detached = False  # aclose() returned before `done`: the service reports its own failure
        self.call_soon = threadsafe_caller()
        self.loop = _loop_key()
        self.closing = False  # aclose() called, or the finalizer ran: no more use
        self.error: BaseException | None = None  # what the service failed with
        self.description = ""
        self.contexts: CodeContexts | None = None  # the sandbox's code contexts (closed at teardown)
        self.egress: EgressProxy | None = None  # net.mode = "domains": its proxy (every connection closed at teardown)
        self.pooled = False  # pre-started, waiting in the pool (_pool.py): nobody's to close yet
        self.started = False  # the service task ran (asyncio may cancel a task before its first step)
        self.never_served = False  # it ended without running (service_ended): the waiter tears down
        self.unserved_torn_down = False
        # Calls working on the sandbox's workdir and view from a worker thread (the file API,
        # snapshot()): the teardown drops its mount namespace and gives its workdir back only once none
        # is left (each stops at its next step once it sees `closing`, and raises SandboxClosedError).
        self._users = 0
        self._unused: anyio.Event | None = None

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Around a call that works on the workdir or the view (see `_users`)."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users and self._unused is not None:
                self._unused.set()

    async def unused(self) -> None:
        """Return once no call is `in_use`."""
        while self._users:
            self._unused = anyio.Event()
            await self._unused.wait()

    def detach(self) -> None:
        """Its aclose() returns now, before `done`: the rest is the service's alone."""
        self.detached = True
        _detached.add(self)

    def process_ended(self, proc: Process, *, account: RunAccount, zrun: bool) -> None:
        self.procs.discard(proc)
        if zrun:
            if self.egress is not None:  # its direct connects' denials are its own (not yet read: now)
                self.egress.drain_refusals()
            self.runner.end_run(proc.pid, account)
            self.tally.fold(account)
        self.tally.process_ended(proc.cpu_s, proc.peak_rss, proc.timed_out)

    async def teardown(self) -> None:
        """Kill and reap everything, close every fd. Shielded by the caller."""
        self.closing = True
        self.runner.kill()  # the zygote is pid 1: every run dies with it
        await _process.reap_all(self.procs)
        await self.runner.reap()
        if self.contexts is not None:
            self.contexts.close()  # their processes died with the zygote: close our ends
        if self.egress is not None:
            await self.egress.aclose()  # its connections, before the caller goes on
        # Nothing of the sandbox runs or can run any more: a deferrable aclose()
        # returns here, and what follows is bookkeeping the caller never waits
        # for (done by this task when the loop lets it, at the latest when the
        # loop ends: the service is cancelled then and this part is shielded).
        self.dead.set()
        if self.deferrable:
            await after_caller()
        await self.unused()  # a file call or snapshot in flight lets go of the view and the workdir first
        await self.runner.aclose()
        self.events.close()
        await self.resources.release()  # the memory cgroup and the size-capped workdir, now empty

    def final_cleanup(self) -> None:
        """Synchronous and idempotent: what must go even if teardown could not run."""
        self.closing = True
        self.runner.kill()
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                proc.kill()
        if self.contexts is not None:
            with contextlib.suppress(Exception):
                self.contexts.close()  # (idempotent; kills what a context still has, closes our ends)
        if self.supervisor is not None:
            self.supervisor.close()  # (its epoll set, if its task never ran)
        if self.egress is not None:
            self.egress.close_now()
        self.runner.close()
        with contextlib.suppress(OSError):  # teardown could not run (the loop is gone): unmount at least
            self.resources.unmount_now()
        with contextlib.suppress(Exception):
            _hostside.release_now(self.host)  # (idempotent: done already unless teardown could not run)


def collected(life: Life) -> None:
    """weakref.finalize of an unclosed Sandbox (collected, or the interpreter exits)."""
    if life.closing or life.done.is_set():
        return
    life.closing = True
    with contextlib.suppress(Exception):  # a finalizer may not raise; an error filter would make this one
        warnings.warn(f"unclosed {life.description}: close it with `await sb.aclose()` or use "
                      "`async with zviz.open_sandbox(...)`", ResourceWarning, stacklevel=1)
    # Kill now (a signal is safe from any thread); the service task reaps and
    # removes the rest on its loop. With the loop gone, do what can be done here.
    life.runner.kill()
    try:
        life.call_soon(life.close_requested.set)
    except Exception:  # noqa: BLE001 - the loop is gone (closed, finished)
        life.final_cleanup()


def start_owned(tg: anyio.abc.TaskGroup, coro: Coroutine[Any, Any, None],
                owned: list[Coroutine[Any, Any, None]]) -> None:
    """`tg.start_soon` for a coroutine the caller keeps (in `owned`), to close
    with `close_unstarted` once the task group has ended. On asyncio, anyio
    runs each task's coroutine inside a wrapper of its own: a task group
    cancelled before the task's first step (a sandbox closed at once, or its
    loop ending) cancels the wrapper, and the coroutine it never awaited
    warns "coroutine ... was never awaited" when it is collected, in whatever
    code runs then."""
    owned.append(coro)
    tg.start_soon(lambda: coro)


def close_unstarted(owned: list[Coroutine[Any, Any, None]]) -> None:
    """Close those of `owned` that never ran (see `start_owned`)."""
    for coro in owned:  # (inspect.getcoroutinestate's test, without importing inspect)
        if (getattr(coro, "cr_frame", None) is not None and not getattr(coro, "cr_running", True)
                and not getattr(coro, "cr_suspended", True)):
            coro.close()
    owned.clear()


async def serve(life: Life, monitor_cm: contextlib.AbstractAsyncContextManager[Any] | None,
                sup: Supervisor) -> None:
    """A sandbox's service task: owns its task group (the supervisor, the
    watchdogs, the connects made on a process's behalf) and its teardown.
    It runs apart from every caller's task (see _lifecycle), so the sandbox
    can be used and closed from any task of its loop; it ends at aclose(),
    at the sandbox's collection, or when the loop ends (cancelled: then the
    sandbox was never closed, and it says so). It never raises."""
    life.started = True
    owned: list[Coroutine[Any, Any, None]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            if monitor_cm is not None:
                await stack.enter_async_context(monitor_cm)
            async with anyio.create_task_group() as tg:
                sup.bind(tg)
                start_owned(tg, sup.run(), owned)
                if life.egress is not None:
                    start_owned(tg, life.egress.run(), owned)
                life.tg, life.supervisor = tg, sup
                life.ready.set()
                try:
                    await life.close_requested.wait()
                except BaseException:
                    # Not a close request: the service failed (a supervisor error), or the loop
                    # is ending. aclose() then waits for the whole teardown and raises the error.
                    life.deferrable = False
                    if not life.closing and not life.pooled:  # the loop is ending with the sandbox open
                        life.closing = True
                        with contextlib.suppress(Exception):
                            warnings.warn(f"unclosed {life.description} when its event loop ended: close it "
                                          "with `await sb.aclose()`", ResourceWarning, stacklevel=1)
                    raise
                finally:
                    try:
                        with anyio.CancelScope(shield=True):
                            await life.teardown()
                    finally:
                        sup.stop()  # (even when teardown failed: else its task group would wait for it forever)
    except BaseException as e:  # noqa: BLE001 - a service task must not raise; aclose() reports it
        while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:  # one error: itself, not a group
            e = e.exceptions[0]
        if not isinstance(e, anyio.get_cancelled_exc_class()):
            life.error = e
    finally:
        close_unstarted(owned)
        # Last, once every fd of the sandbox is closed (the supervisor's too):
        # what is left of its uid, its workdir, the uid, the slot.
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await _hostside.release(life.host)
        life.final_cleanup()
        life.dead.set()
        life.done.set()
        life.ready.set()
        _detached.discard(life)
        if life.detached and life.error is not None:  # its aclose() has returned: nobody else will see it
            err, life.error = life.error, None
            report_late_failure(life.description, err)


def service_ended(life: Life) -> None:
    """The service task's end (spawn_service's on_end). A task that never ran
    (asyncio cancels a task before its first step when the loop ends right
    after the sandbox was made) set none of the sandbox's events: they are set
    here, and whoever waits for them does the teardown (`wait`)."""
    if not life.started:
        life.never_served = True
        life.ready.set()
        life.dead.set()
        life.done.set()


async def wait(life: Life, event: anyio.Event) -> None:
    """`event` of `life` (ready, dead, done); when the service task never ran,
    its whole teardown, done here. Shielded by the caller."""
    await event.wait()
    if not life.never_served or life.unserved_torn_down:
        return
    life.unserved_torn_down = True
    life.deferrable = False
    life.closing = True
    try:
        await life.teardown()
    except Exception as e:  # noqa: BLE001 - reported by aclose()
        life.error = e
    finally:
        if life.supervisor is not None:
            with contextlib.suppress(Exception):
                life.supervisor.stop()
        with contextlib.suppress(Exception):
            await _hostside.release(life.host)
        life.final_cleanup()


def trio_idle() -> Callable[..., Coroutine[Any, Any, None]]:
    """trio's `wait_all_tasks_blocked`, taken from trio's core: importing it
    from `trio.testing` imports pytest where pytest is installed (~90 ms, in
    the first sandbox's close of a process)."""
    try:
        from trio._core._run import wait_all_tasks_blocked
    except ImportError:  # (a trio that moved it: the public name)
        from trio.testing import wait_all_tasks_blocked
    return wait_all_tasks_blocked


async def after_caller() -> None:
    """Let the task that waits for a sandbox's death (its aclose()) go first:
    on trio, until every other task is blocked (the loop is idle) or
    AFTER_CALLER_MAX_S has passed (a loop that is never idle does not hold
    the rest of the teardown back for long); on asyncio, whose ready queue is
    first-in first-out, one turn of the loop."""
    if sniffio.current_async_library() == "trio":
        with anyio.move_on_after(AFTER_CALLER_MAX_S):
            await trio_idle()()
        return
    await anyio.lowlevel.checkpoint()


async def released() -> None:
    """Wait until every sandbox of this loop whose aclose() returned early
    (at its processes' death) has given everything back: its fds, cgroup,
    workdir, uid and slot (tests, and whoever must see the disk settled),
    the fds handed to the closer thread included (a dead sandbox's mount
    namespace: _runner)."""
    while True:
        loop = _loop_key()
        pending = [life for life in _detached if life.loop is loop and not life.done.is_set()]
        if not pending:
            break
        await pending[0].done.wait()
    closed = _kernel.closes_marker()
    # (set by the closer thread within ~0.3 ms, an unmount's grace period; a worker thread to wait on it
    # would stay in the process ~10 s after, idle, which tests counting threads see)
    while closed is not None and not closed.is_set():  # noqa: ASYNC110 - a threading.Event: no anyio.Event
        await anyio.sleep(0.001)


def report_late_failure(description: str, err: BaseException) -> None:
    """A failure of a sandbox's teardown after its aclose() returned (every
    process was dead by then; this is what came after: a cgroup, a mount):
    a ZvizWarning, or, where warnings are errors (which cannot be raised from
    here), the interpreter's unraisable-exception hook, which prints it."""
    msg = f"closing {description} failed after its processes were gone: {err!r}"
    try:
        warnings.warn(msg, ZvizWarning, stacklevel=1)
    except Exception as w:  # noqa: BLE001 - a filter made the warning an error: it must not be lost either
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(w), exc_value=w, exc_traceback=w.__traceback__,
                                                 err_msg="Exception ignored in zviz sandbox teardown",
                                                 object=None))
