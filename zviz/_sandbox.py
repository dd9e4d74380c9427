"""open_sandbox and Sandbox: the trio/anyio shell that composes the parts.

Ownership: a Sandbox owns its workdir, its supervisor task, its `Runner` (the
zygote and /dev/null) and every Process it started; a Process owns its pidfd,
its init-status pipe and its pipe ends (a full spawn's seccomp listener is
handed to the supervisor). Leaving `open_sandbox` by success, error or
cancellation kills every process (SIGKILL to the pid-namespace init, which
takes the whole tree with it), reaps it, closes every fd and removes the
workdir, under a shielded cancel scope.

Where the rest lives: `_records` (RunResult, SandboxStatistics, the tally),
`_process` (Process and the run loop), `_runner` (spawning, the zygote),
`_files` (workdir file I/O), `_events` (the denial events).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import resource
import shutil
import socket
import stat
import time
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from . import _bpf, _capacity, _context, _disk, _files, _hostside, _kernel, _linux, _plan, _probe, _process, _workdir
from ._context import CodeContext
from ._errors import CommandNotFoundError, PolicyError, SandboxClosedError, ZvizWarning
from ._events import EventLog, EventsMissed
from ._execution import Execution
from ._kernel import OwnedFd
from ._policy import Policy
from ._process import Hooks, Process
from ._proxy import FdReceiveStream, FdSendStream
from ._records import RunResult, SandboxStatistics, Tally
from ._resources import HostResources
from ._runner import Runner
from ._supervisor import DenialEvent, RunAccount, Supervisor


class Sandbox:
    """One sandbox: a workdir, a policy and a supervisor. Made by
    `open_sandbox`; no public constructor."""

    def __init__(self, policy: Policy, workdir: str, plan: _plan.SandboxPlan, runner: Runner, tally: Tally,
                 resources: HostResources, trace: Any = None, host_ids: tuple[int, int] | None = None) -> None:
        self.policy = policy
        self.workdir = workdir
        self._host_ids = host_ids or (os.geteuid(), os.getegid())  # who it is on the host (_ids.py)
        self._resources = resources  # the memory cgroup and the size-capped workdir (open_sandbox releases them)
        self._plan = plan
        self._runner = runner
        self._tally = tally
        self._pid_ns = bool(plan.clone_flags & _linux.CLONE_NEWPID)
        self._degraded: tuple[str, ...] = plan.degraded
        self._closed = False
        self._procs: set[Process] = set()
        self._tg: anyio.abc.TaskGroup | None = None  # set by open_sandbox, with the supervisor
        self._supervisor: Supervisor | None = None
        self._events: EventLog[DenialEvent] = EventLog()
        self._trace = trace  # zviz trace's settings (private)
        self._trace_record = trace.record if trace is not None else None
        # the eBPF monitor (zviz.ebpf) while attached; its last figures after
        self._monitor: Any = None
        self._monitor_sid = 0
        self._syscalls_final: dict[str, int] | None = None
        self._errors_final: dict[tuple[str, str], int] | None = None
        self._contexts = _context.CodeContexts(functools.partial(self._start, stdin=False, stdout=False, stderr=True),
                                               dict(plan.env).get("TMPDIR", "/tmp"))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._procs)} running"
        return f"<zviz.Sandbox {self.policy.name} workdir={self.workdir!r} {state}>"

    @property
    def _zygote(self) -> Any:
        """The live zygote (tests and benchmarks look at its pid), or None."""
        return self._runner.zygote

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError("this sandbox is closed: use it inside its `async with open_sandbox(...)` block")

    # ---- running commands

    def _resolve(self, argv: Sequence[str], env: Mapping[str, str]) -> str:
        cmd = argv[0]
        if "/" in cmd:
            path = cmd if os.path.isabs(cmd) else os.path.join(self.workdir, cmd)
            if not os.path.exists(path):
                raise CommandNotFoundError(cmd, env.get("PATH", ""))
            return path
        found = shutil.which(cmd, path=env.get("PATH", ""))
        if not found:
            raise CommandNotFoundError(cmd, env.get("PATH", ""))
        return found

    async def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                    stdin: bool = True, stdout: bool = True, stderr: bool = True,
                    timeout: float | None = None) -> Process:
        """Start a command with streaming stdio (`Process.stdin/stdout/stderr`).
        Streams you do not ask for are /dev/null. `timeout` (default: the
        policy's `limits.wall_s`; `math.inf` for none) kills it when it runs
        out; `Process.timed_out` then says so."""
        timeout = self._timeout(timeout)
        with _capacity.exhaustion_as_error("spawn"):
            proc = await self._start(argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr)
        if timeout != float("inf"):
            assert self._tg is not None
            self._tg.start_soon(_process.watchdog, proc, timeout, _process.arm_watchdog(proc))
        return proc

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.policy.limits.wall_s if self.policy.limits.wall_s is not None else float("inf")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise PolicyError("timeout", timeout, "a positive number of seconds (math.inf for none)")
        return float(timeout)

    async def _start(self, argv: Sequence[str], *, env: Mapping[str, str] | None, stdin: bool,
                     stdout: bool, stderr: bool, stdin_fd: int | None = None) -> Process:
        self._check_open()
        argv = tuple(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise PolicyError("argv", argv, "a non-empty sequence of strings")
        if any("\0" in a for a in argv):
            raise PolicyError("argv", argv, "strings without NUL bytes")
        if env and any(not isinstance(k, str) or not isinstance(v, str) or "=" in k or "\0" in k + v
                       for k, v in env.items()):
            raise PolicyError("env", dict(env), "NAME -> value strings without '=' in names or NUL")
        assert self._supervisor is not None
        merged = dict(self.policy.env)
        merged.update(env or {})
        exe = self._resolve(argv, merged)
        cmd = self._runner.command(argv, exe, env)

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
            spawned = await self._runner.spawn(cmd, child_ends, status_w.fd, self._supervisor)
            self._tally.spawn_s += time.monotonic() - t0
            status = OwnedFd(status_r.detach(), "init-status")
            os.set_blocking(status.fd, False)
            streams: list[Any] = []
            for end, is_input in zip(ours, (True, False, False), strict=True):
                if end is None:
                    streams.append(None)
                    continue
                owned = OwnedFd(end.detach(), end.label)
                streams.append(FdSendStream(owned) if is_input else FdReceiveStream(owned))
        account = RunAccount(command=argv[0])
        try:
            done = None
            if spawned.listener is not None:
                done = self._supervisor.attach(spawned.listener, spawned.pidfd, account)
            hooks = Hooks(pid_ns=self._pid_ns,
                          ended=functools.partial(self._process_ended, account=account, zrun=cmd.zrun),
                          flush=self._supervisor.flush,
                          settle=self._runner.barrier if cmd.zrun else None)
            proc = Process(argv, spawned, account, streams[0], streams[1], streams[2], done, t0, status, hooks)
        except BaseException:
            # Nothing may outlive a failed start: kill, reap, close.
            self._runner.discard(spawned, cmd.zrun)
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

    def _process_ended(self, proc: Process, *, account: RunAccount, zrun: bool) -> None:
        self._procs.discard(proc)
        if zrun:
            self._runner.end_run(proc.pid, account)
            self._tally.fold(account)
        self._tally.process_ended(proc.cpu_s, proc.peak_rss, proc.timed_out)

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = b"", timeout: float | None = None,
                  env: Mapping[str, str] | None = None) -> RunResult:
        """Run a command to completion and capture its output (capped by
        `limits.output`). `timeout` defaults to the policy's `limits.wall_s`."""
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise TypeError("stdin must be bytes or None")
        timeout = self._timeout(timeout)
        with _capacity.exhaustion_as_error("spawn"):
            proc = await self._start(argv, env=env, stdin=bool(stdin), stdout=True, stderr=True)
        return await _process.run_to_end(proc, bytes(stdin or b""), timeout=timeout,
                                         output_cap=self.policy.limits.output,
                                         cpu_limit_s=self.policy.limits.cpu_s, tally=self._tally,
                                         resource_limit=self._resources.resource_limit)

    # ---- code contexts (zviz/_context.py)

    def _context_args(self, python: str, env: Mapping[str, str] | None, output_cap: int | None,
                      timeout: float | None) -> dict[str, Any]:
        self._check_open()
        return _context.arguments(python, env, output_cap, self._timeout(timeout))

    async def create_code_context(self, *, preload: Sequence[str] = (), python: str = "python3",
                                  env: Mapping[str, str] | None = None, timeout: float | None = None,
                                  output_cap: int | None = None) -> CodeContext:
        """A persistent Python forked off this sandbox's template for `python`
        and `preload` (docs/code-contexts.md). `timeout`: each cell's default
        (`limits.wall_s`); `output_cap`: bytes kept per stream per cell."""
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
                         output_cap: int | None = None) -> Execution:
        """Run `code` in a fresh fork of the template (which imported `preload`
        once), in a fresh directory: nothing of one call is seen by the next."""
        return await _context.run_python(self._contexts, code, preload=preload,
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

    async def write_file(self, relpath: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write `data` to `relpath` in the workdir (parents created). `mode`
        0o755 makes it executable; set-id bits are refused."""
        self._check_open()
        _files.write_file(self.workdir, relpath, data, mode, self._host_ids)
        await anyio.lowlevel.checkpoint()

    async def read_file(self, relpath: str, *, max_bytes: int = 64 * 1024**2) -> bytes:
        """Read `relpath` from the workdir (a regular file, at most `max_bytes`)."""
        self._check_open()
        data = _files.read_file(self.workdir, relpath, max_bytes)
        await anyio.lowlevel.checkpoint()
        return data

    # ---- observation

    def statistics(self) -> SandboxStatistics:
        if self._monitor is not None:
            self._monitor.drain_now()
            syscalls = self._monitor.syscalls_for(self._monitor_sid)
        else:
            syscalls = self._syscalls_final
        return self._tally.snapshot(running=len(self._procs), degraded=self._degraded, syscalls=syscalls,
                                    memory=self._resources.memory_figures(), disk=self._resources.disk_figures())

    def _add_event(self, event: DenialEvent) -> None:
        self._events.add(event)

    def events(self) -> AsyncIterator[DenialEvent | EventsMissed]:
        """Every denial kept so far (the newest 10,000), then new ones as they
        happen, until the sandbox closes: `async for event in sb.events():`.
        A reader that falls more than 10,000 events behind gets one
        `EventsMissed(count)` in place of what it lost, then goes on."""
        return self._events.reader()

    def events_so_far(self) -> tuple[DenialEvent, ...]:
        """Every denial recorded so far (the monitor's pending events included)."""
        if self._monitor is not None:
            self._monitor.drain_now()
        return self._events.snapshot()

    # ---- teardown

    async def _aclose(self) -> None:
        """Kill and reap everything, close every fd. Shielded by the caller."""
        self._closed = True
        self._runner.kill()  # the zygote is pid 1: every run dies with it
        await _process.reap_all(self._procs)
        self._contexts.close()  # their processes died with the zygote: close our ends
        await self._runner.aclose()
        self._events.close()


def _prepare(policy: Policy, workdir: str, owns_workdir: bool, features: _probe.KernelFeatures, trace: Any,
             zygote_allowed: bool, tally: Tally, resources: HostResources,
             host_ids: tuple[int, int]) -> tuple[_plan.SandboxPlan, Runner]:
    """Plan the sandbox once (it does not depend on the command) and make
    its Runner. Planning now also reports degraded layers once, and fails early."""
    f = features
    init = _kernel.init_fd()
    names = set(policy.fs.read_only) | set(policy.fs.read_write)
    names |= set(_plan.DEVICES) | {workdir} | set(_plan.STAGING)
    is_dir, links = {}, {}
    for p in names:
        try:
            st = os.stat(p)
        except OSError:
            continue
        is_dir[p] = stat.S_ISDIR(st.st_mode)
        real = os.path.realpath(p)
        if real != p:  # a symlink on the way: the plan checks and binds the real path
            links[p] = real
    for field, paths in (("fs.read_only", policy.fs.read_only), ("fs.read_write", policy.fs.read_write)):
        for p in paths:
            if p not in is_dir:
                raise PolicyError(field, p, "a path that exists on this host")
    hard = {name: resource.getrlimit(num)[1] for name, num in _plan.RLIMIT.items()}
    hard = {k: (_plan.INFINITY if v == resource.RLIM_INFINITY else v) for k, v in hard.items()}
    resources.create_cgroup(policy.limits.memory)
    host = _plan.Host(features=f, euid=os.geteuid(), egid=os.getegid(), is_dir=is_dir, links=links,
                      rlimit_hard=hard, memory_cgroup=resources.cgroup is not None,
                      memory_cgroup_reason=resources.cgroup_reason, sandbox_ids=host_ids)
    notify = f.seccomp_notify
    seccomp_flags = 0
    if notify:
        seccomp_flags |= _kernel.SECCOMP_FILTER_FLAG_NEW_LISTENER
        if f.wait_killable_recv:
            seccomp_flags |= _kernel.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    elif policy.net.mode == "allow":
        raise PolicyError("net.mode", "allow", "a kernel with seccomp user notification (>= 5.5)")
    # Each spawn fills in argv, exe, env and fds.
    probe_plan = _plan.plan_sandbox(policy, host, workdir=workdir)
    pid_ns = bool(probe_plan.clone_flags & _linux.CLONE_NEWPID)
    # A zygote needs the pid namespace (its death must take every run
    # with it) and that namespace's /proc (a run-init finds what its
    # program left behind in /proc/thread-self/children).
    use_zygote = zygote_allowed and pid_ns and probe_plan.mount_proc and trace is None
    spec = _bpf.FilterSpec(allow=policy.syscalls.names() - set(probe_plan.deny_syscalls),
                           net_mode=policy.net.mode, notify=notify, zygote=use_zygote, pid_ns=pid_ns)
    if trace is not None:
        spec = trace.filter_spec(notify)
    bpf = _bpf.compile_filter(spec)
    stage = _plan.stage_spec(probe_plan, bpf=bpf, seccomp_flags=seccomp_flags)
    if trace is not None:
        stage = attrs.evolve(stage, ll_net=0, ll_ports=())  # tracing observes connections rather than refusing them
    runner = Runner(plan=probe_plan, stage=stage, init_fd=init.fd,
                    cgroup_fd=resources.cgroup.procs.fd if resources.cgroup is not None else -1,
                    use_zygote=use_zygote, tally=tally)
    try:
        if probe_plan.degraded:
            warnings.warn("zviz sandbox runs degraded: " + "; ".join(probe_plan.degraded), ZvizWarning,
                          stacklevel=4)
        if probe_plan.disk is not None and owns_workdir:
            resources.mount_disk(probe_plan.disk, probe_plan.host_uid, probe_plan.host_gid)
    except BaseException:
        runner.close()
        raise
    return probe_plan, runner


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


@contextlib.asynccontextmanager
async def open_sandbox(policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
                       keep_workdir: bool = False, monitor: bool | object = False,
                       _trace: Any = None, _zygote: bool = True) -> AsyncIterator[Sandbox]:
    """Open a sandbox: `async with zviz.open_sandbox(zviz.Policy.python()) as sb:`.

    workdir: a directory to use as the sandbox's read-write workdir (kept on
    exit); by default a fresh temp dir, removed on exit unless `keep_workdir`.
    monitor: True to attach an eBPF monitor (root and bcc; see zviz.ebpf), or a
    shared monitor from `zviz.ebpf.open_monitor()`.
    """
    if policy is None:
        policy = Policy.shell()
    if not isinstance(policy, Policy):
        raise PolicyError("policy", policy, "a zviz.Policy")
    features = _probe.probe()
    given = None
    if workdir is not None:
        # (a local stat or two before anything runs: not worth a worker thread)
        given = os.path.realpath(os.fspath(workdir))  # noqa: ASYNC240 - the stage binds the real path
        if not os.path.isdir(given):  # noqa: ASYNC240
            raise PolicyError("workdir", os.fspath(workdir), "an existing directory")
    owns = given is None
    _disk.check(policy.fs.disk, owns_workdir=owns, keep_workdir=keep_workdir)
    walk = _workdir.sandbox_walks(policy.namespaces.mount, (*policy.fs.read_only, *policy.fs.read_write))
    # slot, host uid, workdir: given back on every way out, after all below (_hostside.py)
    async with _hostside.host_side(given, keep_workdir, walk) as side:
        path, host_ids = side.path, (side.lease.uid, side.lease.gid)
        if given is not None and side.lease.uid != os.geteuid():
            _files.check_workdir_reachable(given, side.lease.uid)
        sb: Sandbox | None = None
        resources = HostResources(path, policy.fs.disk)
        # The caller's exception is carried past our task group and re-raised as
        # itself: a body that raises ValueError raises ValueError, not a group.
        body_exc: BaseException | None = None
        try:
            tally = Tally()
            with _capacity.exhaustion_as_error("prepare"):
                plan, runner = _prepare(policy, path, owns, features, _trace, bool(_zygote), tally, resources,
                                        host_ids)
            # a pid namespace dies with its init: no kill by uid at teardown then
            side.pid_namespace = bool(plan.clone_flags & _linux.CLONE_NEWPID)
            sb = Sandbox(policy, path, plan, runner, tally, resources, trace=_trace, host_ids=host_ids)
            async with contextlib.AsyncExitStack() as stack:
                if monitor:
                    from .ebpf import _attach_monitor

                    await stack.enter_async_context(_attach_monitor(sb, monitor))
                endpoints = _resolve_endpoints(policy)
                async with anyio.create_task_group() as tg:
                    # The supervisor serves each spawn's listener in a task of this
                    # group; it is live as soon as the group is.
                    sup = Supervisor(allowed_endpoints=endpoints, net_allow=policy.net.mode == "allow",
                                     on_event=sb._events.add, task_group=tg,
                                     learner=_trace.learn if _trace is not None and _trace.learning else None,
                                     on_done=tally.fold)
                    tg.start_soon(sup.run)
                    sb._tg = tg
                    sb._supervisor = sup
                    try:
                        try:
                            yield sb
                        except BaseException as e:  # noqa: BLE001 - re-raised below, unwrapped
                            body_exc = e
                        finally:
                            with anyio.CancelScope(shield=True):
                                await sb._aclose()
                    finally:
                        sup.stop()
            if body_exc is not None:
                raise body_exc
        finally:
            body_exc = None  # no reference cycle through the traceback
            if sb is not None:
                sb._closed = True
                sb._runner.close()  # idempotent: a failure before the task group leaves /dev/null open
            with anyio.CancelScope(shield=True):
                await resources.release()
