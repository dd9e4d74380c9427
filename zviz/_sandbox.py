"""Sandbox.create, open_sandbox and Sandbox: the trio/anyio shell that composes the parts.

Ownership: a Sandbox's `Life` (`_lifecycle`) owns its workdir, its service
task (the supervisor's task group), its `Runner` (the zygote and /dev/null),
its host resources and every Process it started; a Process owns its pidfd,
its init-status pipe and its pipe ends (a full spawn's seccomp listener is
handed to the supervisor). `aclose()` (and leaving `open_sandbox` by success,
error or cancellation) kills every process (SIGKILL to the pid-namespace
init, which takes the whole tree with it), reaps it, closes every fd and
removes the workdir, under a shielded cancel scope.

Where the rest lives: `_records` (RunResult, SandboxStatistics, the tally),
`_process` (Process and the run loop), `_runner` (spawning, the zygote),
`_files` (the file API), `_events` (the denial events), `_args` (the checks
of run()'s arguments), `_lifecycle` (the service task and teardown).

Why this module is long: it is the one place where the parts meet (the
host facts a sandbox is planned from, the spawn of one command, the public
methods); planning itself, once per policy, is `_planmemo`'s.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import resource
import socket
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs

from . import (
    _args,
    _capacity,
    _disk,
    _files,
    _hostpaths,
    _hostside,
    _kernel,
    _lifecycle,
    _linux,
    _netns,
    _plan,
    _planmemo,
    _pool,
    _probe,
    _process,
    _workdir,
)
from ._args import OutputCallback
from ._errors import (
    CommandNotFoundError,
    FeatureUnavailable,
    PolicyError,
    SandboxClosedError,
    SandboxSetupError,
    ZvizWarning,
)
from ._events import EventLog, EventsMissed
from ._kernel import OwnedFd
from ._lifecycle import Life
from ._policy import Network, Policy
from ._process import Hooks, Process
from ._proxy import FdReceiveStream, FdSendStream
from ._records import RunResult, SandboxStatistics, Tally
from ._resources import HostResources
from ._runner import Runner
from ._supervisor import DenialEvent, RunAccount, Supervisor

if TYPE_CHECKING:
    from . import _snapshot
    from ._context import CodeContext, CodeContexts
    from ._egress import EgressEvent  # (the module is imported by a domains-mode sandbox only)
    from ._execution import Execution
    from ._snapshot import SnapshotInfo


class Sandbox:
    """One sandbox: a workdir, a policy and a supervisor. Made by
    `Sandbox.create` or `open_sandbox`; no public constructor."""

    def __init__(self, policy: Policy, workdir: str, plan: _plan.SandboxPlan, life: Life, resources: HostResources,
                 trace: Any = None) -> None:
        self.policy = policy
        self.workdir = workdir
        self._resources = resources  # the memory cgroup and the size-capped workdir (its Life releases them)
        self._plan = plan
        self._life = life
        self._runner = life.runner
        self._tally = life.tally
        self._pid_ns = bool(plan.clone_flags & _linux.CLONE_NEWPID)
        self._degraded: tuple[str, ...] = plan.degraded
        self._procs = life.procs
        self._snapshot_busy: anyio.Event | None = None  # set while snapshot() copies the workspace
        # set_network: calls so far, and the latest that applied its rules (a later call's rules stand,
        # whichever lookup ends first)
        self._network_calls = self._network_applied = 0
        self._events = life.events
        self._trace = trace  # zviz trace's settings (private)
        self._trace_record = trace.record if trace is not None else None
        # the eBPF monitor (zviz.ebpf) while attached; its last figures after
        self._monitor: Any = None
        self._monitor_sid = 0
        self._syscalls_final: dict[str, int] | None = None
        self._errors_final: dict[tuple[str, str], int] | None = None
        writable = [plan.workspace, *policy.fs.read_write]
        if plan.new_root is not None:
            writable += [b.target for b in policy.fs.binds if not b.read_only]
            if plan.new_root.private_tmp:
                writable += ["/tmp", "/dev/shm"]
            if plan.home is not None:
                writable.append(plan.home)
        self.files = _files.Files(_files.View(cwd=plan.workspace, writable=tuple(writable), uid=plan.host_uid,
                                              gid=plan.host_gid, open_root=self._open_root,
                                              check_open=self._check_open, in_use=self._life.in_use,
                                              closing=functools.partial(getattr, self._life, "closing")))
        self._contexts_made: CodeContexts | None = None  # made on first use (_contexts)

    @classmethod
    async def create(cls, policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
                     keep_workdir: bool = False, monitor: bool | object = False,
                     template: str | os.PathLike[str] | None = None) -> Sandbox:
        """Open a sandbox and return it: `sb = await zviz.Sandbox.create(policy)`;
        close it with `await sb.aclose()` from any task of the same event loop.
        Same arguments as `open_sandbox`."""
        return await _create(policy, workdir=workdir, keep_workdir=keep_workdir, monitor=monitor, template=template)

    async def aclose(self) -> None:
        """Kill every process, reap it, close every fd and remove the workdir
        (unless kept). Idempotent; callable from any task of the sandbox's event
        loop; when it returns (even cancelled) no process of the sandbox is
        left. What is left to give back once they are dead (a fresh workdir of
        its own, its memory cgroup, its host uid) goes in the background on
        this loop, at the latest when the loop ends; a failure there is a
        ZvizWarning (docs/architecture.md, "teardown")."""
        life = self._life
        if not life.closing:
            life.closing = True
            life.runner.kill()  # now: the kernel kills the sandbox while its service task wakes up
        life.close_requested.set()
        with anyio.CancelScope(shield=True):
            await _lifecycle.wait(life, life.dead if life.deferrable else life.done)
        if not life.done.is_set():
            life.detach()  # the service reports what fails from now on
            return
        err, life.error = life.error, None
        if err is not None:
            raise err

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._life.closing else f"{len(self._procs)} running"
        return f"<zviz.Sandbox {self.policy.name} workdir={self.workdir!r} {state}>"

    @property
    def closed(self) -> bool:
        """True once `aclose()` was called (or the sandbox's loop ended)."""
        return self._life.closing

    @property
    def _supervisor(self) -> Supervisor | None:
        """The live supervisor (tests look at it)."""
        return self._life.supervisor

    @property
    def _zygote(self) -> Any:
        """The live zygote (tests and benchmarks look at its pid), or None."""
        return self._runner.zygote

    def _check_open(self) -> None:
        if self._life.closing:
            raise SandboxClosedError("this sandbox is closed (aclose() was called, or its `async with` block or "
                                     "event loop ended): open a new one")

    async def snapshot(self, path: str | os.PathLike[str], *, max_files: int = 1_000_000,
                       max_bytes: int = 16 << 30) -> SnapshotInfo:
        """Save the workspace (the workdir, /workspace inside; not /tmp or
        HOME, which are the sandbox's own tmpfs) as a template at `path` on the
        host (absent or an empty directory): `open_sandbox(template=path)`
        starts from it. It runs while no command runs (it raises if one does;
        commands started meanwhile wait). The copy never follows a symlink,
        skips fifos, sockets and devices, drops set-id bits and stops at
        `max_files` entries or `max_bytes` of data (docs/templates.md)."""
        from . import _copytree, _snapshot  # (imported on first use: not on every open's or the CLI's path)

        self._check_open()
        if self._procs:
            raise RuntimeError(f"snapshot: {len(self._procs)} command(s) of this sandbox still run (code contexts "
                               "included): wait for them or close them, then snapshot")
        if self._snapshot_busy is not None:
            raise RuntimeError("snapshot: another snapshot of this sandbox is being taken: wait for it")
        ids = (self._plan.host_uid, self._plan.host_gid) if self._plan.host_uid != os.geteuid() else None
        life = self._life
        # A close meanwhile stops the copy (its thread asks `life.closing` before each entry) and the
        # teardown gives the workdir back only once the copy has let go of it (`life.in_use`): else the
        # copy read a workdir being removed, skipped what had gone and made a partial template.
        self._snapshot_busy = anyio.Event()
        try:
            with life.in_use():
                return await anyio.to_thread.run_sync(functools.partial(
                    _snapshot.snapshot, self.workdir, path, readable_by=ids, max_files=max_files,
                    max_bytes=max_bytes, stop=lambda: life.closing))
        except _copytree.Stopped:
            raise SandboxClosedError("the sandbox was closed while snapshot() copied its workspace: nothing was "
                                     "saved; snapshot a sandbox that stays open until it returns") from None
        finally:
            busy, self._snapshot_busy = self._snapshot_busy, None
            busy.set()

    # ---- running commands

    @property
    def workspace(self) -> str:
        """The workdir's path inside the sandbox (its initial cwd): `/workspace`,
        whatever its host path (the host path itself on a host without a new root)."""
        return self._plan.workspace

    def _resolve(self, argv: Sequence[str], env: Mapping[str, str]) -> str:
        """The command's path inside the sandbox, checked on the host through
        the view's mapping (a command the host cannot see there, e.g. in the
        sandbox's own /tmp, is left to the exec inside: status 127 if missing)."""
        cmd = argv[0]
        # (what the sandbox may write is looked at without following its links: _files.probe_command)
        writable = (self.workdir, *self.policy.fs.read_write, *(b.source for b in self.policy.fs.binds
                                                                if not b.read_only))
        if "/" in cmd:
            inside = os.path.normpath(cmd if os.path.isabs(cmd) else os.path.join(self.workspace, cmd))
            host = _plan.host_path(self._plan, self.policy, self.workdir, inside)
            if host is not None and _files.probe_command(host, writable, executable=False) is False:
                raise CommandNotFoundError(cmd, env.get("PATH", ""))
            return inside
        for d in env.get("PATH", "").split(":"):
            if not d.startswith("/"):
                continue
            inside = os.path.join(d, cmd)
            host = _plan.host_path(self._plan, self.policy, self.workdir, inside)
            if host is not None and _files.probe_command(host, writable, executable=True) is not False:
                return inside
        raise CommandNotFoundError(cmd, env.get("PATH", ""))

    async def start(self, argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, shell: bool = False, stdin: bool = True, stdout: bool = True,
                    stderr: bool = True, timeout: float | None = None) -> Process:
        """Start a command with streaming stdio (`Process.stdin/stdout/stderr`).
        Streams you do not ask for are /dev/null. The wall-clock rule, the
        output cap and the accounting are `run()`'s (docs/policy.md, "limits")."""
        timeout = self._timeout(timeout)
        argv = _args.command_argv(argv, shell, cwd)
        with _capacity.exhaustion_as_error("spawn"):
            proc = await self._start(argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                                     output_cap=self.policy.limits.output)
        if timeout != float("inf"):
            assert self._life.tg is not None
            self._life.tg.start_soon(_process.watchdog, proc, timeout, _process.arm_watchdog(proc))
        return proc

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.policy.limits.wall_s if self.policy.limits.wall_s is not None else float("inf")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds (math.inf for none), not {timeout!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds (math.inf for none), not {timeout!r}")
        return float(timeout)

    async def _start(self, argv: tuple[str, ...], *, env: Mapping[str, str] | None, stdin: bool,
                     stdout: bool, stderr: bool, output_cap: int | None = None,
                     stdin_fd: int | None = None, warm: tuple[Any, int] | None = None) -> Process:
        self._check_open()
        while self._snapshot_busy is not None:  # a snapshot copies the workspace: no command runs meanwhile
            await self._snapshot_busy.wait()
            self._check_open()
        _args.check_env(env)
        assert self._life.supervisor is not None
        supervisor = self._life.supervisor
        merged = dict(self.policy.env)
        merged.update(env or {})
        exe = self._resolve(argv, merged)
        cmd = self._runner.command(argv, exe, env)
        if warm is not None:  # zviz.run_snippet's: a fork of a warm interpreter (_warm.py)
            cmd = attrs.evolve(cmd, warm=warm)

        with contextlib.ExitStack() as stack:
            # On failure every fd made here is closed; on success the child has
            # its copies and ours are detached into the Process below.
            ours: list[OwnedFd | None] = []
            child_ends: list[int] = []
            for want, is_input, label in ((stdin, True, "stdin"), (stdout, False, "stdout"), (stderr, False, "stderr")):
                if is_input and stdin_fd is not None:  # the caller's fd (a code context's control socket)
                    child_ends.append(stdin_fd)
                    ours.append(None)
                elif want:
                    r, w = _kernel.pipe(label)
                    child, mine = (r, w) if is_input else (w, r)
                    stack.callback(mine.close)
                    stack.callback(child.close)
                    child_ends.append(child.fd)
                    ours.append(mine)
                else:
                    child_ends.append(self._runner.devnull_fd)
                    ours.append(None)
            status_r, status_w = _kernel.pipe("init-status")
            stack.callback(status_w.close)
            stack.callback(status_r.close)
            t0 = time.monotonic()
            spawned = await self._runner.spawn(cmd, child_ends, status_w.fd, supervisor)
            self._tally.spawn_s += time.monotonic() - t0
            not_ours = cmd.zrun or cmd.warm is not None  # its pid is the zygote's or the fork server's child
            if self._life.closing:  # closed while the zygote forked it: the teardown has not seen it
                self._runner.discard(spawned, not_ours)
                raise SandboxClosedError("the sandbox was closed while a command was being started in it")
            status = OwnedFd(status_r.detach(), "init-status")
            os.set_blocking(status.fd, False)
            streams: list[Any] = []
            for end, is_input in zip(ours, (True, False, False), strict=True):
                if end is None:
                    streams.append(None)
                    continue
                owned = OwnedFd(end.detach(), end.label)
                if is_input:
                    streams.append(FdSendStream(owned, self._tally.bytes, "stdin", closing=self._runner.closing))
                else:
                    streams.append(FdReceiveStream(owned, output_cap, self._tally.bytes, end.label.split("-")[0]))
        account = RunAccount(command=argv[0])
        try:
            done = None
            if spawned.listener is not None:
                done = supervisor.attach(spawned.listener, spawned.pidfd, account)
            hooks = Hooks(pid_ns=self._pid_ns,
                          ended=functools.partial(self._life.process_ended, account=account, zrun=cmd.zrun),
                          flush=supervisor.flush,
                          settle=self._runner.barrier if cmd.zrun else None, closing=self._runner.closing,
                          our_child=not not_ours)
            proc = Process(argv, spawned, account, streams[0], streams[1], streams[2], done, t0, status, hooks)
        except BaseException:
            # Nothing may outlive a failed start: kill, reap, close.
            self._runner.discard(spawned, not_ours)
            status.close()
            for st in streams:
                if st is not None:
                    st.close()
            raise
        if done is not None or cmd.zrun:
            self._tally.add_account(account)
        if cmd.zrun:
            self._runner.add_run(proc.pid, spawned.ns_pid, account)
        self._procs.add(proc)
        self._tally.started += 1
        return proc

    async def run(self, argv: Sequence[str] | str, *, stdin: bytes | None = b"", timeout: float | None = None,
                  env: Mapping[str, str] | None = None, cwd: str | None = None, shell: bool = False,
                  on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        """Run a command to completion and capture its output (capped by
        `limits.output`). `timeout` defaults to the policy's `limits.wall_s`.
        `shell=True` runs a string with /bin/sh -c; `cwd` is a path inside the
        sandbox (relative: to the workdir); `on_stdout`/`on_stderr` get each
        chunk of output as it arrives (plain or async callables).
        `SandboxClosedError` if the sandbox is closed (by another task)
        before the command ends."""
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin must be bytes or None, not {type(stdin).__name__}")
        for name, cb in (("on_stdout", on_stdout), ("on_stderr", on_stderr)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be a callable taking bytes, not {cb!r}")
        timeout = self._timeout(timeout)
        argv = _args.command_argv(argv, shell, cwd)
        with _capacity.exhaustion_as_error("spawn"):
            proc = await self._start(argv, env=env, stdin=bool(stdin), stdout=True, stderr=True)
        return await self._to_end(proc, stdin, timeout, on_stdout, on_stderr)

    async def _to_end(self, proc: Process, stdin: bytes | None, timeout: float, on_stdout: OutputCallback | None,
                      on_stderr: OutputCallback | None) -> RunResult:
        return await _process.run_to_end(proc, bytes(stdin or b""), timeout=timeout,
                                         output_cap=self.policy.limits.output,
                                         cpu_limit_s=self.policy.limits.cpu_s, tally=self._tally,
                                         resource_limit=self._resources.resource_limit,
                                         on_stdout=on_stdout, on_stderr=on_stderr)

    # ---- code contexts (zviz/_context.py)

    @property
    def _contexts(self) -> CodeContexts:
        """The code contexts' registry, made on first use: a sandbox that never
        runs one does not import that machinery (`zviz run`'s start-up). Its
        Life closes it at every teardown, so it reaches this sandbox's _start
        only weakly (an unclosed sandbox stays collectable)."""
        if self._contexts_made is None:
            from ._context import CodeContexts

            plan = self._plan
            cache = f"{plan.home}/.cache" if plan.home else f"{dict(plan.env).get('TMPDIR', '/tmp')}/zviz-cache"
            self._life.contexts = self._contexts_made = CodeContexts(_weak_start(self), cache, self._runner.closing)
        return self._contexts_made

    def _context_args(self, python: str, env: Mapping[str, str] | None, output_cap: int | None,
                      timeout: float | None) -> dict[str, Any]:
        self._check_open()
        from . import _context

        return _context.arguments(python, env, output_cap, self._timeout(timeout))

    async def create_code_context(self, *, preload: Sequence[str] = (), python: str = "python3",
                                  env: Mapping[str, str] | None = None, timeout: float | None = None,
                                  output_cap: int | None = None) -> CodeContext:
        """A persistent Python forked off this sandbox's template for `python`
        and `preload` (docs/code-contexts.md). `timeout`: each cell's default
        (`limits.wall_s`); `output_cap`: bytes kept per stream per cell."""
        from . import _context

        return await _context.create(self._contexts, preload=preload,
                                     **self._context_args(python, env, output_cap, timeout))

    @contextlib.asynccontextmanager
    async def code_context(self, *, preload: Sequence[str] = (), python: str = "python3",
                           env: Mapping[str, str] | None = None, timeout: float | None = None,
                           output_cap: int | None = None) -> AsyncIterator[CodeContext]:
        """`async with sb.code_context(preload=("numpy",)) as ctx:`"""
        ctx = await self.create_code_context(preload=preload, python=python, env=env, timeout=timeout,
                                             output_cap=output_cap)
        try:
            yield ctx
        finally:
            await ctx.aclose()

    async def run_python(self, code: str, *, preload: Sequence[str] = (), timeout: float | None = None,
                         python: str = "python3", env: Mapping[str, str] | None = None,
                         output_cap: int | None = None, fork: bool | None = None) -> Execution:
        """Run `code` in a fresh fork of the template interpreter (which
        imported `preload` once), in a fresh directory: nothing of one call is
        seen by the next. `fork`: None picks (the first call of a sandbox with
        no template interpreter runs in one interpreter started for it, later
        ones start the template and fork it), False always one interpreter per
        call, True always a fork of the template."""
        from . import _context

        return await _context.run_python(self._contexts, code, preload=preload, fork=fork,
                                         **self._context_args(python, env, output_cap, timeout))

    # ---- the eBPF monitor (zviz.ebpf calls these)

    def _attach_monitor(self, monitor: Any, sid: int) -> None:
        self._monitor = monitor
        self._monitor_sid = sid
        self._runner.track(monitor.map_fd, sid)

    def _detach_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.drain_now()
            self._syscalls_final = self._monitor.syscalls_for(self._monitor_sid)
            self._errors_final = self._monitor.errors_for(self._monitor_sid)
        self._monitor = None
        self._runner.untrack()

    def syscall_errors(self) -> Mapping[tuple[str, str], int] | None:
        """With the eBPF monitor: failed calls by (syscall, errno name)."""
        if self._monitor is not None:
            return self._monitor.errors_for(self._monitor_sid)  # type: ignore[no-any-return]
        return self._errors_final

    # ---- files

    async def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """`sb.files.write(path, data, mode=mode)`."""
        await self.files.write(path, data, mode=mode)

    async def read_file(self, path: str, *, max_bytes: int = _files.DEFAULT_MAX_READ) -> bytes:
        """`sb.files.read(path, max_bytes=max_bytes)`."""
        return await self.files.read(path, max_bytes=max_bytes)

    async def _open_root(self) -> tuple[OwnedFd, str]:
        """An O_PATH fd of the sandbox's root as its processes see it (its
        zygote's root), and "/"; without a zygote, the workdir (and its path)."""
        self._check_open()
        assert self._life.supervisor is not None
        z = await self._runner.ensure_zygote(self._life.supervisor) if self._plan.new_root is not None else None
        if z is not None:
            try:
                fd = os.open(f"/proc/{z.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise SandboxSetupError("files", e.errno or 0, f"/proc/{z.pid}/root",
                                        "cannot look into the sandbox's root") from None
            return OwnedFd(fd, "sandbox-root"), "/"
        fd = os.open(self.workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return OwnedFd(fd, "workdir"), self.workspace

    # ---- observation

    def statistics(self) -> SandboxStatistics:
        if self._monitor is not None:
            self._monitor.drain_now()
            syscalls = self._monitor.syscalls_for(self._monitor_sid)
        else:
            syscalls = self._syscalls_final
        stats = self._tally.snapshot(running=len(self._procs), degraded=self._degraded, syscalls=syscalls,
                                     memory=self._resources.memory_figures(), disk=self._resources.disk_figures())
        if self._life.egress is not None:
            stats = attrs.evolve(stats, egress=self._life.egress.statistics())
        return stats

    async def set_network(self, network: Network) -> None:
        """New network rules for a running sandbox, within its mode (the
        kernel filter of a running sandbox cannot change): `domains` takes
        new names, ports, pins and limits; `allow` new endpoints. New
        connections follow them; open ones are left as they are (close and
        reopen the sandbox to cut them)."""
        self._check_open()
        if not isinstance(network, Network):
            raise TypeError(f"set_network takes a zviz.Network, not {type(network).__name__}")
        if network.mode != self.policy.net.mode:
            raise PolicyError("net.mode", network.mode, f"{self.policy.net.mode!r}, this sandbox's mode (a running "
                              "sandbox's mode cannot change: open a new one)")
        self._network_calls += 1
        call = self._network_calls
        if network.mode == "domains":
            assert self._life.egress is not None
            self._life.egress.set_network(network)
        elif network.mode == "allow":
            endpoints = await _resolve_endpoints_off_loop(attrs.evolve(self.policy, net=network))
            self._check_open()  # (closed during the lookup)
            if call < self._network_applied:
                return  # a later call's rules are in place already: they stand (as if this one came first)
            assert self._life.supervisor is not None
            self._life.supervisor.set_allowed(endpoints)
        self._network_applied = call
        self.policy = attrs.evolve(self.policy, net=network)

    def _add_event(self, event: DenialEvent) -> None:
        self._events.add(event)

    def events(self) -> AsyncIterator[DenialEvent | EgressEvent | EventsMissed]:
        """Every denial kept so far (the newest 10,000), then new ones as they
        happen, until the sandbox closes: `async for event in sb.events():`
        (with net.mode = "domains", each connection through the egress
        proxy is an `EgressEvent` too).
        A reader that falls more than 10,000 events behind gets one
        `EventsMissed(count)` in place of what it lost, then goes on."""
        return self._events.reader()

    def events_so_far(self) -> tuple[DenialEvent | EgressEvent, ...]:
        """Every denial recorded so far (the monitor's pending events included)."""
        if self._monitor is not None:
            self._monitor.drain_now()
        return self._events.snapshot()

def _weak_start(sb: Sandbox) -> Callable[..., Awaitable[Process]]:
    """The code contexts' way to start their template: `sb._start` with only
    stderr piped, through a weak reference."""
    ref = weakref.WeakMethod(sb._start)

    async def start(argv: Sequence[str], *, env: Mapping[str, str] | None, stdin_fd: int) -> Process:
        method = ref()
        if method is None:
            raise SandboxClosedError("this sandbox is closed: open a new one")
        return await method(tuple(argv), env=env, stdin=False, stdout=False, stderr=True, stdin_fd=stdin_fd)

    return start


def _zviz_dirs() -> tuple[str, ...]:
    """zviz's own host directories (its cache, the parents of workdirs), to
    be masked where they exist (_plan.Host.hidden): resolved by the caller
    with the sandbox's other paths, in one walk (each on its own cost ~0.08 ms)."""
    from ._cachedir import location
    from ._diskcache import ensure_directory

    ensure_directory()  # masked only if it exists: made now, not by this very open's filter store after the plan
    return tuple(p for p in (location(), _workdir.base_path(False), _workdir.base_path(True)) if p)


def _prepare(policy: Policy, workdir: str, owns_workdir: bool, features: _probe.KernelFeatures, trace: Any,
             zygote_allowed: bool, tally: Tally, resources: HostResources,
             host_ids: tuple[int, int], template: _snapshot.Template | None = None,
             warn: bool = True, known: dict[str, tuple[bool, str]] | None = None) -> tuple[_plan.SandboxPlan, Runner]:
    """Plan the sandbox once (it does not depend on the command) and make
    its Runner. Planning now also reports degraded layers once, and fails early.
    `known`: `_hostpaths.resolve` of `_plan.looked_up(policy)`, made by the caller."""
    f = features
    init = _kernel.init_fd()
    if known is None:
        known = _hostpaths.resolve(_plan.looked_up(policy))
    listed = {"fs.read_only": policy.fs.read_only, "fs.read_write": policy.fs.read_write,
              "fs.binds.source": tuple(b.source for b in policy.fs.binds)}
    # a listed path missing before the host side was made may be one of its making (zviz's workdir parent):
    # looked at again, with the workdir and zviz's own directories, in one walk
    missing = tuple(p for paths in listed.values() for p in paths if p not in known)
    zviz_dirs = _zviz_dirs()
    own = _hostpaths.resolve((workdir, *zviz_dirs, *missing))
    hidden = tuple(own[p][1] for p in zviz_dirs if p in own and own[p][0])
    found = dict(known)
    for p in (*missing, workdir):
        if p in own:
            found[p] = own[p]
    is_dir, links = {}, {}
    for p, (d, real) in found.items():
        is_dir[p] = d
        if real != p:  # a symlink on the way: the plan checks and binds the real path
            links[p] = real
    for field, paths in listed.items():
        for p in paths:
            if p not in is_dir:
                raise PolicyError(field, p, "a path that exists on this host")
    hard = {name: resource.getrlimit(num)[1] for name, num in _plan.RLIMIT.items()}
    hard = {k: (_plan.INFINITY if v == resource.RLIM_INFINITY else v) for k, v in hard.items()}
    resources.create_cgroup(policy.limits.memory)
    host = _plan.Host(features=f, euid=os.geteuid(), egid=os.getegid(), is_dir=is_dir, links=links,
                      rlimit_hard=hard, memory_cgroup=resources.cgroup is not None,
                      memory_cgroup_reason=resources.cgroup_reason, sandbox_ids=host_ids,
                      hidden=hidden,
                      # (made for processes that open `none` sandboxes: the plan decides which use it)
                      blank_netns=policy.net.mode == "none" and trace is None and _netns.usable())
    notify = f.seccomp_notify
    seccomp_flags = 0
    if notify:
        seccomp_flags |= _kernel.SECCOMP_FILTER_FLAG_NEW_LISTENER
        if f.wait_killable_recv:
            seccomp_flags |= _kernel.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    elif policy.net.mode in ("allow", "domains"):
        raise PolicyError("net.mode", policy.net.mode, "a kernel with seccomp user notification (>= 5.5)")
    # Each spawn fills in argv, exe, env and fds. The same policy on the same host plans the same but for
    # the workdir and ids: made once, filled in per sandbox (_planmemo).
    enter_netns = policy.net.mode == "domains" and _kernel.can_enter_netns()
    if policy.net.mode == "domains" and policy.net.way == "direct":
        from . import _egressdirect

        why = _egressdirect.unavailable(enter_netns=enter_netns, zygote=zygote_allowed and trace is None)
        if why is not None:
            raise FeatureUnavailable("net.way = 'direct'", f"this host lacks {why}",
                                     "run as root on Linux 6.7+, or use way='proxy' (the default: zviz's proxy, "
                                     "through the programs' proxy variables)")
    made = _planmemo.prepared(policy, host, workdir, zygote_allowed=zygote_allowed, trace=trace,
                              seccomp_flags=seccomp_flags, notify=notify, enter_netns=enter_netns)
    probe_plan = made.plan
    runner = Runner(plan=probe_plan, stage=made.stage, zygote_stage=made.zygote_stage, packed=made.packed,
                    init_fd=init.fd, cgroup_fd=resources.cgroup.procs.fd if resources.cgroup is not None else -1,
                    use_zygote=made.use_zygote, tally=tally)
    runner.egress_inside = made.proxy_inside
    try:
        if probe_plan.degraded and warn:  # (a pooled sandbox warns when it is handed out)
            _warn_degraded(probe_plan.degraded, stacklevel=5)
        if probe_plan.disk is not None and owns_workdir:
            resources.mount_disk(probe_plan.disk, probe_plan.host_uid, probe_plan.host_gid)
        if template is not None and os.geteuid() == 0:
            resources.mount_template(template, probe_plan.host_uid, probe_plan.host_gid)
    except BaseException:
        runner.close()
        raise
    return probe_plan, runner


def _count_direct(runner: Runner, tally: Tally, name: str) -> str:
    """A direct connect the kernel refused in the sandbox's namespace: the
    denial of the only live run (its RunResult.denials), or the sandbox's
    when none or several run; the run's command, or ""."""
    account = runner.sole_run()
    if account is None:
        tally.count_denial(name)
        return ""
    account.denials[name] += 1
    return account.command


def _warn_degraded(degraded: tuple[str, ...], stacklevel: int) -> None:
    warnings.warn("zviz sandbox runs degraded: " + "; ".join(degraded), ZvizWarning, stacklevel=stacklevel)


def _resolve_endpoints(policy: Policy) -> frozenset[tuple[str, int]]:
    out = set()
    for e in policy.net.allow:
        if e.is_ip():
            ip = ipaddress.ip_address(e.host)
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            out.add((str(mapped) if mapped else str(ip), e.port))
            continue
        try:
            infos = socket.getaddrinfo(e.host, e.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise PolicyError("net.allow", str(e), f"a resolvable host ({err})") from None
        for info in infos:
            out.add((str(info[4][0]), e.port))
    return frozenset(out)


async def _resolve_endpoints_off_loop(policy: Policy) -> frozenset[tuple[str, int]]:
    """`_resolve_endpoints` with its name lookups in a worker thread: a slow or
    unreachable resolver stalls only this open (or set_network), not every
    other sandbox on the loop. Cancelled, the caller goes on and the lookup's
    thread ends on its own. Addresses only: no thread."""
    if all(e.is_ip() for e in policy.net.allow):
        return _resolve_endpoints(policy)
    return await anyio.to_thread.run_sync(_resolve_endpoints, policy, abandon_on_cancel=True)


async def _create(policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
                  keep_workdir: bool = False, monitor: bool | object = False, trace: Any = None,
                  zygote: bool = True, template: str | os.PathLike[str] | None = None,
                  pooled: bool = False, use_pool: bool = True, one_command: bool = False) -> Sandbox:
    """`Sandbox.create` with the private settings (zviz trace's, the benchmarks';
    `pooled`: made by the sandbox pool, _pool.py; `use_pool=False`: never take
    a pooled one, e.g. zviz.sync's private loop, which ends with the sandbox;
    `one_command`: the caller runs one command in it (`zviz run`): a pooled
    sandbox if one is ready, else one without a zygote, whose command is the
    stage's own spawn: ~0.6 ms of CPU and ~0.8 ms of wall time less than a
    zygote and a run of it)."""
    if policy is None:
        policy = Policy.shell()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a zviz.Policy, not {type(policy).__name__}")
    if (use_pool and not pooled and workdir is None and template is None and not keep_workdir and not monitor
            and trace is None):
        # a pre-started sandbox of exactly this policy and kind (only what a fresh one would be)
        ready = await _pool.take_soon(policy, zygote=bool(zygote) or one_command)
        if ready is not None:
            if ready._degraded:
                _warn_degraded(ready._degraded, stacklevel=4)
            return ready
    if one_command:
        zygote = False
    features = _probe.probe()
    endpoints = await _resolve_endpoints_off_loop(policy)  # (before anything is made for it)
    given = None
    if workdir is not None:
        # (a local stat or two before anything runs: not worth a worker thread)
        given = os.path.realpath(os.fspath(workdir))  # noqa: ASYNC240 - the stage binds the real path
        if not os.path.isdir(given):  # noqa: ASYNC240
            raise ValueError(f"workdir {os.fspath(workdir)!r} is not an existing directory")
    owns = given is None
    _disk.check(policy.fs.disk, owns_workdir=owns, keep_workdir=keep_workdir)
    tmpl = None
    if template is not None:
        if not owns or keep_workdir:
            raise ValueError("template= starts a fresh workdir that goes with the sandbox: drop workdir= and "
                             "keep_workdir=, and save what you need with `await sb.snapshot(path)`")
        from . import _snapshot

        tmpl = _snapshot.open_template(template, read_write=(*policy.fs.read_write, *(
            b.source for b in policy.fs.binds if not b.read_only)))
    # the policy's host paths, resolved once for the walk's question and the plan
    known = _hostpaths.resolve(_plan.looked_up(policy))
    walk = _workdir.sandbox_walks(policy.namespaces.mount, (*policy.fs.read_only, *policy.fs.read_write), known)
    # slot, host uid, workdir: given back on every way out, after all else (_hostside.py; its Life does that
    # once the sandbox exists)
    side = await _hostside.acquire(given, keep_workdir, walk)
    try:
        path, host_ids = side.path, (side.lease.uid, side.lease.gid)
        if given is not None and side.lease.uid != os.geteuid():
            _files.check_workdir_reachable(given, side.lease.uid)
        resources = HostResources(path, policy.fs.disk)
        try:
            if tmpl is not None and os.geteuid() != 0:  # no mount on the host: a copy (zviz/_snapshot.py)
                from ._snapshot import populate

                await anyio.to_thread.run_sync(populate, tmpl, path)
            tally = Tally()
            with _capacity.exhaustion_as_error("prepare"):
                plan, runner = _prepare(policy, path, owns, features, trace, bool(zygote), tally, resources,
                                        host_ids, tmpl, warn=not pooled, known=known)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await resources.release()
            raise
        if not monitor:  # (a monitor tracks the zygote from its first instruction: spawned once it is attached)
            runner.begin_zygote()  # its child sets itself up while the rest of this runs (Runner._spawn_zygote)
        # a pid namespace dies with its init: no kill by uid at teardown then
        side.pid_namespace = bool(plan.clone_flags & _linux.CLONE_NEWPID)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _hostside.release(side)
        raise
    events: EventLog[DenialEvent | EgressEvent] = EventLog()
    life = Life(runner, tally, events, side, resources)
    life.pooled = pooled
    sb = Sandbox(policy, path, plan, life, resources, trace=trace)
    life.description = repr(sb)
    try:
        # Made here, in the caller's step (its fds with the rest of the setup's, before
        # another sandbox's setup can run); it runs in the service task's group.
        with _capacity.exhaustion_as_error("supervisor"):
            life.supervisor = Supervisor(allowed_endpoints=endpoints,
                                         net_allow=policy.net.mode in ("allow", "domains"),
                                         on_event=life.events.add, task_group=None,
                                         learner=trace.learn if trace is not None and trace.learning else None,
                                         on_done=life.tally.fold)
        if plan.blank_netns:  # its sockets are made by the supervisor (zviz/_netns.py)
            from . import _sockets

            life.supervisor.sockets = _sockets.Sockets(
                frozenset({"socket", "socketpair"} & (policy.syscalls.names() - set(plan.deny_syscalls))))
        if policy.net.mode == "domains":  # its connects to the proxy's address reach this (_egress)
            from . import _egress

            life.egress = life.supervisor.egress = _egress.EgressProxy(
                policy.net, life.events.add, functools.partial(_count_direct, runner, life.tally))
            if runner.egress_inside:
                runner.on_zygote = life.egress.listen_inside
            if policy.net.way == "direct":  # its DNS and its connects out (_egressdirect), checked above
                from . import _egressdirect

                life.egress.direct = life.supervisor.direct = _egressdirect.DirectEgress(life.egress)
                runner.on_zygote = life.egress.enter_direct
        monitor_cm = None
        if monitor:
            from .ebpf import _attach_monitor

            monitor_cm = _attach_monitor(sb, monitor)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _hostside.release(life.host)
        life.final_cleanup()
        raise

    # aclose() returns once every process is dead when nothing the caller can see is left after that: a fresh
    # workdir of its own that goes with it, no mount on it (a size cap or a template: unmounted before return),
    # no monitor or trace whose figures come at the end, a pid namespace (else the kill by uid comes last)
    life.deferrable = (owns and not keep_workdir and monitor_cm is None and trace is None and side.pid_namespace
                       and not resources.disk_mounted and not resources.template_mounted)
    _lifecycle.spawn_service(functools.partial(_lifecycle.serve, life, monitor_cm, life.supervisor),
                             name=f"zviz sandbox {path}", on_end=functools.partial(_lifecycle.service_ended, life))
    del monitor_cm
    try:
        with anyio.CancelScope(shield=True):  # a cancelled create() still closes what it opened
            await _lifecycle.wait(life, life.ready)
        await anyio.lowlevel.checkpoint_if_cancelled()
        if life.done.is_set():
            err, life.error = life.error, None
            raise err if err is not None else SandboxClosedError("the sandbox's event loop is ending")
    except BaseException:
        await sb.aclose()
        raise
    weakref.finalize(sb, _lifecycle.collected, life)
    return sb


@contextlib.asynccontextmanager
async def open_sandbox(policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
                       keep_workdir: bool = False, monitor: bool | object = False,
                       template: str | os.PathLike[str] | None = None) -> AsyncIterator[Sandbox]:
    """Open a sandbox: `async with zviz.open_sandbox(zviz.Policy.python()) as sb:`.

    workdir: a directory to use as the sandbox's read-write workdir (kept on
    exit); by default a fresh temp dir, removed on exit unless `keep_workdir`.
    monitor: True to attach an eBPF monitor (root and bcc; see zviz.ebpf), or a
    shared monitor from `zviz.ebpf.open_monitor()`.
    template: a template made by `Sandbox.snapshot`: the workdir starts with
    its files (copy-on-write; the template is never changed; docs/templates.md).
    Leaving the block (by success, error or cancellation) is `Sandbox.aclose()`.
    """
    async with _open_sandbox(policy, workdir=workdir, keep_workdir=keep_workdir, monitor=monitor,
                             template=template) as sb:
        yield sb


@contextlib.asynccontextmanager
async def _open_sandbox(policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
                        keep_workdir: bool = False, monitor: bool | object = False, trace: Any = None,
                        zygote: bool = True, template: str | os.PathLike[str] | None = None,
                        use_pool: bool = True, one_command: bool = False) -> AsyncIterator[Sandbox]:
    """open_sandbox with the private settings (zviz trace's, the benchmarks', the CLI's)."""
    sb = await _create(policy, workdir=workdir, keep_workdir=keep_workdir, monitor=monitor, trace=trace,
                       zygote=zygote, template=template, use_pool=use_pool, one_command=one_command)
    try:
        yield sb
    finally:
        await sb.aclose()
