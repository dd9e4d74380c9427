"""Code contexts: a persistent, interruptible, forkable Python in a sandbox,
and warm one-shot snippets (`Sandbox.run_python`).

A context is a process forked off the sandbox's template interpreter (see
_template). `run_python` forks one too, or, in a sandbox that has no template
for its (python, preload, env) yet, starts the driver in its once role: one
interpreter for that one call, no template (see run_python). A cell is one
"exec" request on its control socket, with fresh stdout/stderr pipes for the
cell's fd 1 and 2. The driver puts /dev/null back on fd 1 and 2 before it says
"done", so what a cell's leftover thread or subprocess writes later lands in a
pipe we have stopped reading (or in the next cell's), never in a finished
Execution's output. Display items and the cell's end come as frames, checked
by _contextproto.

Everything from inside is hostile: a bad frame, a flood of frames, a closed
channel or a driver that stops answering marks the context broken
(CodeContextError) after its process is killed; host memory is bounded by
the caps below, host time by the cell's timeout plus the grace period.

Why this module is long: a context's calls (cells, fork, variables, restart,
close) share its state (its lock, process and cell in flight) and the
registry's templates; run_python's two ways (a fork, or one interpreter for
one call) are the same context object. The driver's launch is _driverboot,
a cell in flight _cell, the channel and templates _template.
"""

from __future__ import annotations

import contextlib
import json
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from . import _contextproto as proto, _driverboot
from ._cell import Cell as _Cell, Event
from ._errors import CodeContextError, SandboxClosedError
from ._execution import Execution
from ._template import Channel, ChannelBroken, Child, Template, await_hello, wait_frame

if TYPE_CHECKING:
    from ._process import Process

MAX_CODE = 4 * 1024**2


@attrs.frozen(kw_only=True)
class Caps:
    """Bounds on what one context may hand the host."""

    output: int = 1024**2  # bytes kept per stream per cell
    display: int = 32 * 1024**2  # bytes of display items kept per cell
    display_items: int = 200  # display items kept per cell
    frames: int = 10_000  # frames per cell before the context is broken (an endless stream)
    context: int = 2 * 1024**3  # bytes kept over the context's life, then it is broken
    grace_s: float = 2.0  # after an interrupt, before the kill
    reply_s: float = 30.0  # for the driver's answer to a request (and for a fork)


class CodeContexts:
    """A sandbox's templates and contexts (the sandbox owns one)."""

    def __init__(self, start: Callable[..., Awaitable[Any]], cache: str,
                 sandbox_closing: Callable[[], bool] = lambda: False) -> None:
        self._start = start  # (argv, env=, stdin_fd=) -> Process: the sandbox's start, stdout to /dev/null
        # the sandbox is being closed: its processes die to that, not to a crash (no restart, no "did not start")
        self.sandbox_closing = sandbox_closing
        self._env = {
            # matplotlib draws without a display, and keeps its cache in `cache` (the
            # sandbox's HOME/.cache: off the workspace); one BLAS thread: templates
            # fork, and idle thread pools cost memory
            "MPLBACKEND": "Agg", "MPLCONFIGDIR": f"{cache}/matplotlib",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._templates: dict[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], Template] = {}
        self._oneshots: dict[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], int] = {}
        self._lock = anyio.Lock()
        self.contexts: set[CodeContext] = set()

    async def template(self, python: str, preload: tuple[str, ...], env: Mapping[str, str],
                       *, dead: Template | None = None) -> Template:
        """The template for this key (started on first use). `dead`: the one
        found dead, replaced unless another caller already did."""
        key = (python, preload, tuple(sorted(env.items())))
        async with self._lock:
            tpl = self._templates.get(key)
            if tpl is not None and tpl is dead:
                del self._templates[key]
                tpl.close()
                tpl.proc.kill()  # its contexts die with it (its run-init kills what is left)
                tpl = None
            if tpl is None:
                tpl = await self._new_template(python, preload, env)
                self._templates[key] = tpl
            return tpl

    def use_template(self, python: str, preload: tuple[str, ...], env: Mapping[str, str]) -> bool:
        """run_python's choice when not told: fork the template if there is
        one, or if this sandbox already ran a one-shot interpreter for this key
        (it runs many snippets); else one interpreter for this call."""
        key = (python, preload, tuple(sorted(env.items())))
        if key in self._templates or self._oneshots.get(key, 0) >= 1:
            return True
        self._oneshots[key] = self._oneshots.get(key, 0) + 1
        return False

    async def _new_template(self, python: str, preload: tuple[str, ...], env: Mapping[str, str]) -> Template:
        proc, hello = await self.start_driver("template", python, preload, env)
        hello.pidfd.close()  # the template's own pid is not needed: its Process is the sandbox's
        return Template(proc, hello.chan, python)

    async def start_driver(self, role: str, python: str, preload: tuple[str, ...],
                           env: Mapping[str, str]) -> tuple[Process, Child]:
        """The driver as a command of the sandbox, in `role` ("template", or
        "once": it runs one cell), once it said hello: its Process and the
        Child its hello made (CodeContextError if it did not start or could not
        import its preload; nothing is left running then)."""
        full = dict(self._env)
        full.update(env)
        chan, theirs = Channel.pair()
        try:
            try:
                argv = [python, "-c", _driverboot.BOOT, role, json.dumps(list(preload)), *_driverboot.code()]
                proc = await self._start(argv, env=full, stdin_fd=theirs.fd)
            finally:
                theirs.close()
        except BaseException:
            chan.close()
            raise
        try:
            hello = await await_hello(chan, 300.0, python)
        except ChannelBroken as e:
            chan.close()
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
                err = b""
                with contextlib.suppress(Exception):
                    err = await proc.stderr.receive_some(4096)
            if self.sandbox_closing():  # killed by the close: not the interpreter's fault
                raise SandboxClosedError(f"the sandbox was closed while the {role} interpreter {python!r} "
                                         "started") from None
            raise CodeContextError(f"the {role} interpreter {python!r} did not start ({e}; exit status "
                                   f"{proc.returncode}; stderr: {err.decode(errors='replace').strip()[-500:]!r}). "
                                   "Is it inside the sandbox's paths (Policy.with_paths(read_only=[...]))?") from None
        except BaseException:
            chan.close()
            proc.kill()
            raise
        if hello.errors:
            hello.close()
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
            failed = "; ".join(f"{k}: {v[:300]}" for k, v in list(hello.errors.items())[:8])
            raise CodeContextError(f"the {role} interpreter {python!r} could not import its preload ({failed}). "
                                   "Is the module installed for that interpreter, and its directory inside the "
                                   "sandbox's paths (python= a venv's bin/python, "
                                   "Policy.with_paths(read_only=[venv]))?")
        return proc, hello

    def close(self) -> None:
        """Teardown (every process is dead by now): close our fds."""
        for ctx in list(self.contexts):
            ctx._close_now()
        for tpl in self._templates.values():
            tpl.close()
        self._templates.clear()


class CodeContext:
    """A persistent Python in a sandbox. Made by `Sandbox.create_code_context`
    (or `code_context`); no public constructor."""

    def __init__(self, registry: CodeContexts, template: Template | None, child: Child, *, preload: tuple[str, ...],
                 env: Mapping[str, str], caps: Caps, timeout: float, oneshot: bool = False) -> None:
        self._registry = registry
        self._template = template
        self._child: Child | None = child
        self.preload = preload
        self._env = dict(env)
        self._caps = caps
        self._timeout = timeout
        self._oneshot = oneshot
        self._lock = anyio.Lock()
        self._seq = 0
        self._kept = 0
        self._active: _Cell | None = None
        self.broken: str | None = None  # why it cannot be used (then CodeContextError)
        self.closed = False
        registry.contexts.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"broken ({self.broken})" if self.broken else (
            "running a cell" if self._active else "idle")
        pid = self._child.pid if self._child else None
        return f"<zviz.CodeContext pid={pid} preload={list(self.preload)!r} {state}>"

    @property
    def pid(self) -> int | None:
        """Host pid of the context's process (None while it has none)."""
        return self._child.pid if self._child is not None else None

    def _check(self) -> Child:
        if self.closed:
            raise CodeContextError("this code context is closed")
        if self.broken is not None:
            raise CodeContextError(f"this code context is broken: {self.broken}. restart() it (its state is lost)")
        if self._child is None:
            raise CodeContextError("this code context has no process (a restart failed); restart() it")
        return self._child

    def _break(self, reason: str) -> CodeContextError:
        self.broken = reason
        if self._child is not None:
            self._child.close()
            self._child = None
        return CodeContextError(f"code context broken: {reason}; its process was killed. restart() it "
                                "(its state is lost)")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ---- cells

    async def run(self, code: str, *, timeout: float | None = None) -> Execution:
        """Run a cell; returns its Execution (an exception in the cell is
        `Execution.error`, not raised). `timeout` interrupts it."""
        cell = await self._begin(code, timeout, stream=False)
        try:
            while cell.execution is None:
                await cell.step()
        except BaseException:
            cell.abandon()
            raise
        return cell.execution

    async def stream(self, code: str, *, timeout: float | None = None) -> AsyncIterator[Event]:
        """Run a cell and yield its events as they come: StreamOutput chunks,
        DisplayData items, then the Execution. A stream left before its end
        is interrupted (and finished) by the context's next call."""
        cell = await self._begin(code, timeout, stream=True)
        try:
            while cell.execution is None:
                for ev in await cell.step():
                    yield ev
            yield cell.execution
        finally:
            cell.abandon()

    async def _begin(self, code: str, timeout: float | None, *, stream: bool) -> _Cell:
        if not isinstance(code, str):
            raise TypeError("code must be a str")
        if len(code) > MAX_CODE:
            raise ValueError(f"a cell of {len(code)} characters (at most {MAX_CODE})")
        timeout = self._timeout if timeout is None else float(timeout)
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds (math.inf for none)")
        async with self._exclusive():
            child = self._check()
            cell = _Cell(self, child, self._next_seq(), timeout, stream)
            self._active = cell
            try:
                await cell.start(code)
            except BaseException:
                cell.abandon()
                raise
            return cell

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold the context with no cell in flight: calls from several tasks
        take turns; a cell whose caller went away is finished first."""
        while True:
            await self._settle()
            async with self._lock:
                if self._active is None or self._active.finished:
                    self._active = None
                    yield
                    return

    async def _settle(self) -> None:
        """Wait for the cell in flight: its caller's end of it, or (when the
        caller went away) step it to its end here (interrupt, then kill)."""
        cell = self._active
        if cell is None or cell.finished:
            return
        if cell.owned:
            await cell.ended.wait()
            return
        with anyio.CancelScope(shield=True):
            cell.interrupt()
            while not cell.finished:
                try:
                    await cell.step()
                except CodeContextError:
                    break

    async def _dead_idle(self, child: Child) -> None:
        """Its process died between calls (a signal from another process, the
        OOM killer): restart it and say so."""
        if not child.alive():
            await self._replace_child()
            raise CodeContextError("the context's process had died (a signal or the memory limit); it was "
                                   "restarted from its template: every variable was lost")

    def _closed_meanwhile(self) -> bool:
        return self.closed  # (a call, so that a check made before an await is not taken as still true)

    async def _replace_child(self) -> bool:
        """After its process died or was killed: a fresh one from the template
        (a dead template is replaced once). False when that failed (broken)."""
        if self._child is not None:
            self._child.close()
            self._child = None
        if self._oneshot or self.closed:
            return False
        for fresh in (False, True):
            try:
                assert self._template is not None  # only a one-shot run has none
                if fresh:  # the template died (a cell may kill its parent): a new one, once
                    self._template = await self._registry.template(self._template.python, self.preload, self._env,
                                                                   dead=self._template)
                child = await self._template.spawn(once=False, timeout=self._caps.reply_s)
                if self._closed_meanwhile():  # aclose() while we waited
                    child.close()
                    return False
                self._child = child
                return True
            except ChannelBroken as e:
                reason = str(e)
            except CodeContextError as e:  # the fork failed (e.g. the process limit): the template is fine
                reason = str(e)
                break
        self.broken = f"could not restart from the template ({reason})"
        return False

    # ---- control

    async def interrupt(self) -> None:
        """SIGINT the running cell (KeyboardInterrupt in it; the state is
        kept). No-op when no cell runs."""
        if self._active is not None and self._active.execution is None:
            self._active.interrupt()
        await anyio.lowlevel.checkpoint()

    async def restart(self) -> None:
        """Kill the context's process (and its process group) and start a
        fresh one from the template: every variable is lost."""
        if self.closed:
            raise CodeContextError("this code context is closed")
        if self._active is not None and self._child is not None:
            self._child.kill()
        async with self._exclusive():
            self.broken = None
            self._kept = 0
            if not await self._replace_child():
                raise CodeContextError(f"restart failed: {self.broken}")

    async def fork(self) -> CodeContext:
        """A copy-on-write twin of the live state (a fork of the context's
        process); both go on independently."""
        async with self._exclusive():
            child = self._check()
            await self._dead_idle(child)
            chan, theirs = Channel.pair()
            try:
                seq = self._next_seq()
                try:
                    await child.chan.send(proto.encode({"t": "fork", "seq": seq}), [theirs.fd])
                finally:
                    theirs.close()
                await self._fork_answer(child, chan, seq)
                try:
                    twin_child = await await_hello(chan, self._caps.reply_s, child.python)
                except ChannelBroken as e:
                    raise CodeContextError(f"the forked context did not start: {e}") from None
            except BaseException:
                chan.close()
                raise
            twin = CodeContext(self._registry, self._template, twin_child, preload=self.preload, env=self._env,
                               caps=self._caps, timeout=self._timeout)
            twin._seq = self._seq
            return twin

    async def _fork_answer(self, child: Child, chan: Channel, seq: int) -> None:
        """Wait for the twin's first bytes on its channel, or the parent's
        refusal (a failed fork) on its own: whichever comes first."""
        ep = select.epoll()
        try:
            ep.register(child.chan.fileno(), select.EPOLLIN)
            ep.register(chan.fileno(), select.EPOLLIN)
            with anyio.move_on_after(self._caps.reply_s):
                while True:
                    ready = {fd for fd, _ in ep.poll(0)}
                    if chan.fileno() in ready:  # a refusal is sent before the twin's end closes: look first
                        ready.add(child.chan.fileno())
                    if child.chan.fileno() in ready:
                        try:
                            frames = child.chan.read()
                        except ChannelBroken as e:
                            raise self._break(str(e)) from None
                        for f in frames:
                            if f.kind == "ack" and f.fields.get("seq") == seq:
                                raise CodeContextError(f"fork failed: {str(f.fields['error'])[:200]}")
                    if chan.fileno() in ready:
                        return
                    await anyio.wait_readable(ep.fileno())
            raise CodeContextError(f"fork: no answer from the context in {self._caps.reply_s:g} s")
        finally:
            anyio.notify_closing(ep.fileno())
            ep.close()

    async def set_vars(self, values: Mapping[str, Any]) -> None:
        """Set variables of the context from JSON values (dict, list, str,
        int, float, bool, None); anything else is a TypeError."""
        if not isinstance(values, Mapping):
            raise TypeError("set_vars takes a mapping of names to JSON values")
        for name, value in values.items():
            if not proto.is_name(name):
                raise ValueError(f"{name!r} is not a variable name set_vars accepts (an identifier, no dunder)")
            proto.check_json_value(value, f"set_vars[{name!r}]")
        await self._request({"t": "set", "vars": dict(values)}, ("ack",))

    async def get_var(self, name: str) -> Any:
        """A variable's value, if it is a JSON value (else TypeError;
        KeyError when it is not defined)."""
        if not proto.is_name(name):
            raise ValueError(f"{name!r} is not a variable name get_var accepts (an identifier, no dunder)")
        f = await self._request({"t": "get", "name": name}, ("value",))
        err = f.fields["error"]
        if err is not None:
            if err.startswith("NameError"):
                raise KeyError(name)
            if err.startswith("TooLarge"):
                raise ValueError(f"get_var({name!r}): the value's JSON is over {proto.MAX_JSON} bytes")
            raise TypeError(f"get_var({name!r}): {err[:300]}")
        return f.fields["value"]

    async def _request(self, req: dict[str, Any], kinds: tuple[str, ...]) -> proto.Frame:
        async with self._exclusive():
            child = self._check()
            await self._dead_idle(child)
            seq = self._next_seq()
            req["seq"] = seq
            try:
                await child.chan.send(proto.encode(req), timeout=self._caps.reply_s)
                f = await wait_frame(child.chan, seq, kinds, self._caps.reply_s)
            except ChannelBroken as e:
                raise self._break(str(e)) from None
            if f.kind == "ack" and f.fields["error"] is not None:
                raise CodeContextError(f"the driver refused the request: {str(f.fields['error'])[:200]}")
            return f

    async def aclose(self) -> None:
        """Kill the context's process tree and close its channel."""
        child = self._child
        if child is not None and not self.closed:
            self.closed = True  # a cell in flight must not restart it
            child.kill()
            # it no longer counts against the process limit once it is dead (polled: a
            # cell's task may be waiting on the pidfd, and an fd takes one waiter)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                while child.alive():  # noqa: ASYNC110 - no event to wait for: its pidfd may have a waiter
                    await anyio.sleep(0.002)
        self._close_now()
        await anyio.lowlevel.checkpoint()

    def _close_now(self) -> None:
        self.closed = True
        if self._child is not None:
            self._child.close()
            self._child = None
        if self._active is not None:
            self._active.close_fds()
        self._registry.contexts.discard(self)


# ---------------------------------------------------------------- what the sandbox calls


def arguments(python: str, env: Mapping[str, str] | None, output_cap: int | None, timeout: float) -> dict[str, Any]:
    """The checked keyword arguments of `create`/`run_python`."""
    if not isinstance(python, str) or not python:
        raise TypeError("python must be a command or path, e.g. 'python3' or a venv's bin/python")
    if env and any(not isinstance(k, str) or not isinstance(v, str) for k, v in env.items()):
        raise TypeError("env must map str to str")
    caps = Caps() if output_cap is None else Caps(output=int(output_cap))
    return dict(python=python, env=dict(env or {}), caps=caps, timeout=timeout)


def check_preload(preload: Sequence[str]) -> tuple[str, ...]:
    if isinstance(preload, str):
        raise TypeError("preload is a sequence of module names, e.g. ('numpy',)")
    out = tuple(preload)
    for name in out:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
            raise ValueError(f"preload: {name!r} is not a module name")
    return out


async def create(registry: CodeContexts, *, python: str, preload: Sequence[str], env: Mapping[str, str],
                 caps: Caps, timeout: float) -> CodeContext:
    pre = check_preload(preload)
    tpl = await registry.template(python, pre, env)
    try:
        child = await tpl.spawn(once=False, timeout=caps.reply_s)
    except ChannelBroken:  # the template died (e.g. a snippet killed it): once more with a fresh one
        tpl = await registry.template(python, pre, env, dead=tpl)
        child = await tpl.spawn(once=False, timeout=caps.reply_s)
    return CodeContext(registry, tpl, child, preload=pre, env=env, caps=caps, timeout=timeout)


async def run_python(registry: CodeContexts, code: str, *, python: str, preload: Sequence[str],
                     env: Mapping[str, str], caps: Caps, timeout: float, fork: bool | None = None) -> Execution:
    """`Sandbox.run_python`. A close of the sandbox while it runs is
    SandboxClosedError, as for `run()`: its one-shot context says
    CodeContextError ("the sandbox was closed while the code context's cell
    ran"), which names a context the caller never made."""
    try:
        return await _run_python(registry, code, python=python, preload=preload, env=env, caps=caps,
                                 timeout=timeout, fork=fork)
    except CodeContextError as e:
        if not registry.sandbox_closing():
            raise
        raise SandboxClosedError("the sandbox was closed while run_python() ran (closed from another task or "
                                 "thread, or its block or event loop ended): its code was killed") from e


async def _run_python(registry: CodeContexts, code: str, *, python: str, preload: Sequence[str],
                      env: Mapping[str, str], caps: Caps, timeout: float, fork: bool | None = None) -> Execution:
    if not isinstance(code, str):
        raise TypeError("code must be a str")
    if fork is not None and not isinstance(fork, bool):
        raise TypeError(f"fork must be True, False or None, not {fork!r}")
    pre = check_preload(preload)
    if fork is False or (fork is None and not registry.use_template(python, pre, env)):
        return await _run_once(registry, code, python=python, preload=pre, env=env, caps=caps, timeout=timeout)
    tpl = await registry.template(python, pre, env)
    try:
        child = await tpl.spawn(once=True, timeout=caps.reply_s)
    except ChannelBroken:
        tpl = await registry.template(python, pre, env, dead=tpl)
        child = await tpl.spawn(once=True, timeout=caps.reply_s)
    ctx = CodeContext(registry, tpl, child, preload=pre, env=env, caps=caps, timeout=timeout, oneshot=True)
    try:
        return await ctx.run(code, timeout=timeout)
    finally:
        ctx._close_now()


async def _run_once(registry: CodeContexts, code: str, *, python: str, preload: tuple[str, ...],
                    env: Mapping[str, str], caps: Caps, timeout: float) -> Execution:
    """run_python without a template: the driver in its once role, started
    for this call (it imports `preload` itself). The same cell, frames and
    caps as a forked one-shot context; its command (and whatever the cell left
    running) is killed and reaped before this returns."""
    if len(code) > MAX_CODE:  # before an interpreter is started for it
        raise ValueError(f"a cell of {len(code)} characters (at most {MAX_CODE})")
    proc, child = await registry.start_driver("once", python, preload, env)
    try:
        ctx = CodeContext(registry, None, child, preload=preload, env=env, caps=caps, timeout=timeout, oneshot=True)
        try:
            return await ctx.run(code, timeout=timeout)
        finally:
            ctx._close_now()
    finally:
        child.close()
        proc.kill()
        with anyio.CancelScope(shield=True):
            await proc.wait()
        if proc.stderr is not None:  # (ours: else it stayed open as long as an error's traceback held this frame)
            proc.stderr.close()
