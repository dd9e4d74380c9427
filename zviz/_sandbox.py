"""open_sandbox, Sandbox, Process, results and statistics (the trio/anyio shell).

Ownership: a Sandbox owns its workdir, its supervisor task, and every Process it
started; a Process owns its pidfd, its seccomp listener (handed to the
supervisor) and its pipe ends. Leaving `open_sandbox` by success, error or
cancellation kills every process (SIGKILL to the pid-namespace init, which
takes the whole tree with it), reaps it, closes every fd and removes the
workdir, under a shielded cancel scope.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
import types
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import attrs

from . import _bpf, _cgroup, _disk, _kernel, _linux, _plan, _probe, _zygote
from ._errors import CommandNotFoundError, PolicyError, SandboxClosedError, SandboxSetupError, ZvizWarning
from ._events import EventLog, EventsMissed
from ._kernel import OwnedFd
from ._policy import Policy
from ._proxy import Collector, FdReceiveStream, FdSendStream
from ._supervisor import DenialEvent, RunAccount, Supervisor

# ---------------------------------------------------------------- records


def _frozen_mapping(value: Mapping[str, int]) -> Mapping[str, int]:
    return types.MappingProxyType(dict(sorted(value.items())))


@attrs.frozen(kw_only=True)
class RunResult:
    """The outcome of `Sandbox.run` (or `Process.wait`)."""

    argv: tuple[str, ...]
    exit_code: int | None  # None when killed by a signal
    signal: int | None  # the signal that killed it, if any
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool  # stdout or stderr went over limits.output
    # the limit that ended the command: "wall_s", "output", "cpu_s", "memory"
    # (killed by the sandbox's memory cgroup), "disk" (failed with fs.disk full), or None
    limit: str | None
    wall_s: float
    cpu_s: float  # user + system, the whole reaped tree
    peak_rss: int  # bytes, largest single process of the tree
    denials: Mapping[str, int] = attrs.field(converter=_frozen_mapping, eq=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def status(self) -> int:
        """A shell-style status: the exit code, 128+N when killed by signal N,
        124 on timeout."""
        if self.timed_out:
            return 124
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 1

    def to_json(self) -> dict:
        return {
            "argv": list(self.argv), "exit_code": self.exit_code, "signal": self.signal,
            "status": self.status,
            "stdout": self.stdout.decode("utf-8", "replace"), "stderr": self.stderr.decode("utf-8", "replace"),
            "timed_out": self.timed_out, "truncated": self.truncated, "limit": self.limit, "wall_s": round(self.wall_s, 6),
            "cpu_s": round(self.cpu_s, 6), "peak_rss": self.peak_rss, "denials": dict(self.denials),
        }


@attrs.frozen(kw_only=True)
class SandboxStatistics:
    """A snapshot of one sandbox (`Sandbox.statistics()`)."""

    processes_started: int
    processes_running: int
    denials: Mapping[str, int] = attrs.field(converter=_frozen_mapping, eq=False)
    denials_total: int
    notifications: int
    connects: int
    timeouts: int
    bytes_stdin: int
    bytes_stdout: int
    bytes_stderr: int
    cpu_s: float
    peak_rss: int
    spawn_s_total: float
    degraded: tuple[str, ...]
    memory_limit: int | None = None  # the sandbox's memory cgroup limit (None: no cgroup)
    memory_peak: int | None = None  # most the whole sandbox held at once, by the cgroup's count
    memory_oom_kills: int = 0  # processes the kernel killed at the memory limit
    disk_limit: int | None = None  # fs.disk, where enforced
    disk_used: int | None = None  # bytes in the workdir's tmpfs now
    syscalls: Mapping[str, int] | None = attrs.field(default=None, eq=False)  # eBPF monitor only


# ---------------------------------------------------------------- Process


class Process:
    """A command running in a sandbox. Made by `Sandbox.start`; no public
    constructor. `stdin`/`stdout`/`stderr` are streams (None when captured or
    not piped)."""

    def __init__(self, sandbox: Sandbox, argv: tuple[str, ...], spawned: _kernel.Spawned,
                 account: RunAccount, stdin: FdSendStream | None, stdout: FdReceiveStream | None,
                 stderr: FdReceiveStream | None, listener_done: anyio.Event | None, started: float,
                 status: OwnedFd, zrun: bool = False) -> None:
        self._sandbox = sandbox
        self.argv = argv
        self._pid = spawned.pid
        self._zrun = zrun  # started by the sandbox's zygote: pidfd of its run-init, not our child
        self._orphans_pending = False  # killed before its run-init cleaned up: the zygote does
        self._pidfd = spawned.pidfd
        self._account = account
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
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
        """Like subprocess: exit code, -N when killed by signal N, None while running."""
        if self._status is None:
            return None
        if os.WIFSIGNALED(self._status):
            return -os.WTERMSIG(self._status)
        return os.WEXITSTATUS(self._status)

    @property
    def denials(self) -> Mapping[str, int]:
        return types.MappingProxyType(dict(self._account.denials))

    def kill(self) -> None:
        """SIGKILL the command and everything it started (its pid namespace)."""
        if self._status is None:
            _kernel.pidfd_kill(self._pidfd)
            self._kill_group()

    def _kill_group(self) -> None:
        # Without a pid namespace the tree is the process group (setsid in the
        # stage). The group id is our unreaped child's pid: it cannot be reused.
        # With one, killing init (pid 1) already took the whole tree.
        if self._sandbox._pid_ns:
            return
        if self._status is None or not self._pidfd.closed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for exit; returns `returncode`. Once it returns, no process
        of the command is left."""
        if self._status is None:
            await anyio.wait_readable(self._pidfd.fd)
            self._reap()
        await self._settle()
        assert self._status is not None
        return self.returncode  # type: ignore[return-value]

    async def _settle(self) -> None:
        # A run-init killed before its cleanup (timeout, kill(), or the
        # command's own doing) leaves the run's orphans to the zygote, which
        # kills them when it reaps it: the barrier returns after that.
        if self._orphans_pending:
            self._orphans_pending = False
            await self._sandbox._zygote_barrier()

    def _reap(self) -> None:
        if self._status is not None:
            return
        if self._zrun:
            # The zygote reaps its run-inits; killed before it reported, the
            # run ended by SIGKILL (ours, or its own doing), and what it left
            # is the zygote's to kill (see _settle).
            status, ru = signal.SIGKILL, None
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
        self._sandbox._process_ended(self)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the program and every descendant it reaped."""
        return self._cpu

    @property
    def peak_rss(self) -> int:
        """Largest resident set (bytes) of the program or a reaped descendant;
        0 when the program was killed before zviz-init could report it."""
        return self._maxrss

    def _close_streams(self) -> None:
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                s.close()
        self._status_fd.close()


# ---------------------------------------------------------------- Sandbox


_CAPTURE = object()
_PENDING = 0x80000000  # eBPF monitor (zviz/ebpf/_program.c): not counted until exec
_SKIP_EXEC = 0x40000000  # ... and that exec (zviz-init's own) does not count


class Sandbox:
    """One sandbox: a workdir, a policy and a supervisor. Made by
    `open_sandbox`; no public constructor."""

    def __init__(self, policy: Policy, workdir: str, owns_workdir: bool, features: _probe.KernelFeatures) -> None:
        self.policy = policy
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        self._features = features
        self._closed = False
        self._procs: set[Process] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._supervisor: Supervisor | None = None
        self._events: EventLog[DenialEvent] = EventLog()
        self._started = 0
        self._timeouts = 0
        self._bytes = Counter()
        self._cpu = 0.0
        self._peak_rss = 0
        self._spawn_s = 0.0
        # Accounts of runs whose listener is live; finished ones are folded
        # into the totals (memory and statistics() cost stay flat over runs).
        self._accounts: set[RunAccount] = set()
        self._denials_done: Counter = Counter()
        self._notifications_done = 0
        self._connects_done = 0
        self._host: _plan.Host | None = None
        self._filter: bytes = b""
        self._seccomp_flags = 0
        self._degraded: tuple[str, ...] = ()
        self._monitor = None
        self._init: OwnedFd | None = None
        self._devnull: OwnedFd | None = None
        self._pid_ns = False
        self._trace: Any = None  # zviz trace's settings (private)
        self._trace_record: Any = None
        self._monitor_sid = 0
        self._syscalls_final: dict[str, int] | None = None
        self._errors_final: dict[tuple[str, str], int] | None = None
        # The zygote (zviz/_zygote.py): spawned at the first command where the
        # layers allow (a pid namespace with its /proc), then every command
        # is a fork of it. _zygote_allowed=False keeps one full spawn per
        # command (benchmarks compare the two).
        self._zygote_allowed = True
        self._use_zygote = False
        self._zygote: _zygote.Zygote | None = None
        self._zygote_done: anyio.Event | None = None
        self._run_rlimits: list[tuple[int, int, int]] = []
        self._stray: RunAccount | None = None  # the zygote's calls, and a run's that could not be told
        self._cgroup: _cgroup.MemoryCgroup | None = None
        self._memory_final: tuple[int | None, int | None, int] = (None, None, 0)  # limit, peak, OOM kills
        self._disk_mounted = False
        self._disk_final: int | None = None
        self._oom_seen = 0  # the memory cgroup's OOM kills already attributed to a command
        self._runs_by_pid: dict[int, RunAccount] = {}  # live runs of the zygote, by their run-init's host pid

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._procs)} running"
        return f"<zviz.Sandbox {self.policy.name} workdir={self.workdir!r} {state}>"

    # ---- setup (called by open_sandbox)

    def _prepare(self) -> None:
        f = self._features
        self._init = _kernel.init_fd()
        names = set(self.policy.fs.read_only) | set(self.policy.fs.read_write)
        names |= set(_plan.DEVICES) | {self.workdir} | set(_plan.STAGING)
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
        for field, paths in (("fs.read_only", self.policy.fs.read_only), ("fs.read_write", self.policy.fs.read_write)):
            for p in paths:
                if p not in is_dir:
                    raise PolicyError(field, p, "a path that exists on this host")
        hard = {name: resource.getrlimit(num)[1] for name, num in _plan.RLIMIT.items()}
        hard = {k: (_plan.INFINITY if v == resource.RLIM_INFINITY else v) for k, v in hard.items()}
        cg_reason = "limits.memory is not set"
        if self.policy.limits.memory is not None:
            self._cgroup, cg_reason = _cgroup.MemoryCgroup.create(_cgroup.unique_name(), self.policy.limits.memory)
        self._host = _plan.Host(features=f, euid=os.geteuid(), egid=os.getegid(), is_dir=is_dir, links=links,
                                rlimit_hard=hard, memory_cgroup=self._cgroup is not None,
                                memory_cgroup_reason=cg_reason)
        notify = f.seccomp_notify
        self._seccomp_flags = 0
        if notify:
            self._seccomp_flags |= _kernel.SECCOMP_FILTER_FLAG_NEW_LISTENER
            if f.wait_killable_recv:
                self._seccomp_flags |= _kernel.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        elif self.policy.net.mode == "allow":
            raise PolicyError("net.mode", "allow", "a kernel with seccomp user notification (>= 5.5)")
        # The plan is made once per sandbox (it does not depend on the command):
        # each spawn fills in argv, exe, env and fds. Planning now also reports
        # degraded layers once, and fails early.
        probe_plan = _plan.plan_spawn(self.policy, self._host, argv=("true",), exe="/bin/true", workdir=self.workdir)
        self._plan = probe_plan
        self._pid_ns = bool(probe_plan.clone_flags & _linux.CLONE_NEWPID)
        # A zygote needs the pid namespace (its death must take every run
        # with it) and that namespace's /proc (a run-init finds what its
        # program left behind in /proc/thread-self/children).
        self._use_zygote = (self._zygote_allowed and self._pid_ns and probe_plan.mount_proc
                            and self._trace is None)
        spec = _bpf.FilterSpec(allow=self.policy.syscalls.names() - set(probe_plan.deny_syscalls),
                               net_mode=self.policy.net.mode, notify=notify, zygote=self._use_zygote,
                               pid_ns=self._pid_ns)
        if self._trace is not None:
            spec = self._trace.filter_spec(notify)
        self._filter = _bpf.compile_filter(spec)
        self._base_spec = probe_plan.to_spec(stdin=-1, stdout=-1, stderr=-1, bpf=self._filter,
                                             seccomp_flags=self._seccomp_flags, init_fd=self._init.fd, status_fd=-1)
        if self._trace is not None:
            # tracing observes connections rather than refusing them
            self._base_spec["ll_net"] = 0
            self._base_spec["ll_ports"] = []
        if self._cgroup is not None:
            self._base_spec["cgroup_fd"] = self._cgroup.procs.fd
        self._base_env = dict(probe_plan.env)
        self._base_envp = self._base_spec["envp"]
        self._error_paths = tuple(p for p, _ in probe_plan.landlock.paths) if probe_plan.landlock else ()
        self._error_rlimits = tuple(n for n, _, _ in probe_plan.rlimits)
        self._devnull = _kernel.open_devnull()
        self._degraded = probe_plan.degraded
        self._run_rlimits = list(self._base_spec["rlimits"])
        if probe_plan.degraded:
            warnings.warn("zviz sandbox runs degraded: " + "; ".join(probe_plan.degraded), ZvizWarning, stacklevel=4)
        if probe_plan.disk is not None and self._owns_workdir:
            _disk.mount(self.workdir, probe_plan.disk, probe_plan.host_uid, probe_plan.host_gid)
            self._disk_mounted = True
        if self._owns_workdir and probe_plan.host_uid != os.geteuid():
            os.chown(self.workdir, probe_plan.host_uid, probe_plan.host_gid)

    def _resolve_endpoints(self) -> frozenset[tuple[str, int]]:
        out = set()
        for e in self.policy.net.allow:
            if e.is_ip():
                import ipaddress

                ip = ipaddress.ip_address(e.host)
                out.add((str(ip.ipv4_mapped) if getattr(ip, "ipv4_mapped", None) else str(ip), e.port))
                continue
            try:
                infos = socket.getaddrinfo(e.host, e.port, type=socket.SOCK_STREAM)
            except socket.gaierror as err:
                raise PolicyError("net.allow", str(e), f"a resolvable host ({err})") from None
            for info in infos:
                out.add((info[4][0], e.port))
        return frozenset(out)

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
        proc = await self._start(argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr)
        if timeout != float("inf"):
            assert self._tg is not None
            self._tg.start_soon(self._watchdog, proc, timeout)
        return proc

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.policy.limits.wall_s if self.policy.limits.wall_s is not None else float("inf")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise PolicyError("timeout", timeout, "a positive number of seconds (math.inf for none)")
        return float(timeout)

    async def _watchdog(self, proc: Process, timeout: float) -> None:
        with anyio.CancelScope() as scope:
            proc._watchdog = scope  # cancelled when the process is reaped
            await anyio.sleep(timeout)
            if proc._status is None:
                proc.timed_out = True
                proc.limit = "wall_s"
                proc.kill()

    async def _start(self, argv: Sequence[str], *, env: Mapping[str, str] | None, stdin: object,
                     stdout: object, stderr: object) -> Process:
        self._check_open()
        argv = tuple(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise PolicyError("argv", argv, "a non-empty sequence of strings")
        if any("\0" in a for a in argv):
            raise PolicyError("argv", argv, "strings without NUL bytes")
        if env and any(not isinstance(k, str) or not isinstance(v, str) or "=" in k or "\0" in k + v
                       for k, v in env.items()):
            raise PolicyError("env", dict(env), "NAME -> value strings without '=' in names or NUL")
        assert self._host is not None and self._supervisor is not None
        merged = dict(self.policy.env)
        merged.update(env or {})
        exe = self._resolve(argv, merged)
        exe_b = exe.encode()
        envp = self._base_envp
        if env:
            full = dict(self._base_env)
            full.update(env)
            envp = [f"{k}={v}".encode() for k, v in sorted(full.items())]
        request = None
        spec: dict[str, Any] = {}
        if self._use_zygote:
            request = _zygote.encode_request(exe_b, [a.encode() for a in argv], envp, self._run_rlimits)
        else:
            spec = dict(self._base_spec)
            spec["exe"] = exe_b
            spec["argv"] = [b"zviz-init", str(_linux.STATUS_FD).encode(), exe_b] + [a.encode() for a in argv]
            spec["envp"] = envp

        with contextlib.ExitStack() as stack:
            # On failure every fd made here is closed; on success the child has
            # its copies and ours are detached into the Process below.
            ours: list[OwnedFd | None] = []
            child_ends: list[int] = []
            for want, is_input, label in ((stdin, True, "stdin"), (stdout, False, "stdout"), (stderr, False, "stderr")):
                if want:
                    r, w = _kernel.pipe(label)
                    child, mine = (r, w) if is_input else (w, r)
                    stack.callback(mine.close)
                    stack.callback(child.close)
                    child_ends.append(child.fd)
                    ours.append(mine)
                else:
                    child_ends.append(self._devnull.fd)
                    ours.append(None)
            status_r, status_w = _kernel.pipe("init-status")
            stack.callback(status_w.close)
            stack.callback(status_r.close)
            t0 = time.monotonic()
            if request is not None:
                spawned = await self._zygote_run(request, [*child_ends, status_w.fd])
            else:
                spec["stdin"], spec["stdout"], spec["stderr"] = child_ends
                spec["status_fd"] = status_w.fd
                spawned = _kernel.spawn(spec, paths=self._error_paths, rlimit_names=self._error_rlimits)
            self._spawn_s += time.monotonic() - t0
            status = OwnedFd(status_r.detach(), "init-status")
            os.set_blocking(status.fd, False)
            streams: list = []
            for mine, is_input in zip(ours, (True, False, False)):
                if mine is None:
                    streams.append(None)
                    continue
                owned = OwnedFd(mine.detach(), mine.label)
                streams.append(FdSendStream(owned) if is_input else FdReceiveStream(owned))
        account = RunAccount(command=argv[0])
        try:
            done = None
            if spawned.listener is not None:
                done = self._supervisor.attach(spawned.listener, spawned.pidfd, account)
            proc = Process(self, argv, spawned, account, streams[0], streams[1], streams[2], done, t0, status,
                           zrun=request is not None)
        except BaseException:
            # Nothing may outlive a failed start: kill, reap, close.
            _kernel.pidfd_kill(spawned.pidfd)
            if request is None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(spawned.pid, 0)
            for owned in (spawned.pidfd, spawned.listener, status):
                if owned is not None:
                    owned.close()
            for st in streams:
                if st is not None:
                    st.close()
            raise
        if done is not None or request is not None:
            self._accounts.add(account)
        if request is not None and proc.pid > 0:
            self._runs_by_pid[proc.pid] = account
        self._procs.add(proc)
        self._started += 1
        return proc

    async def _zygote_run(self, request: bytes, fds: list[int]) -> _kernel.Spawned:
        """One run through the zygote (spawned on first use; a zygote that
        died, e.g. to the OOM killer, is replaced once)."""
        for attempt in (0, 1):
            if self._zygote is None:
                self._spawn_zygote()
            assert self._zygote is not None
            try:
                pidfd = await self._zygote.request(request, fds)
            except _zygote.ZygoteGone:
                await self._drop_zygote()
                if attempt:
                    raise SandboxSetupError("zygote", errno.EPIPE, None,
                                            "the sandbox's zviz-init died twice in a row") from None
                continue
            return _kernel.Spawned(pid=-1, pidfd=pidfd, listener=None)
        raise AssertionError("unreachable")

    def _spawn_zygote(self) -> None:
        assert self._supervisor is not None and self._devnull is not None
        ours, theirs = _zygote.control_pair()
        try:
            spec = dict(self._base_spec)
            spec["exe"] = b"zviz-init"
            spec["argv"] = [b"zviz-init", b"--zygote", str(_linux.STATUS_FD).encode()]
            spec["stdin"] = spec["stdout"] = spec["stderr"] = self._devnull.fd
            spec["status_fd"] = theirs.fd
            spec["rlimits"] = []  # per run (the zygote's own CPU time must not count)
            if "track_value" in spec:
                spec["track_value"] |= _SKIP_EXEC  # the monitor counts from the program's exec
            spawned = _kernel.spawn(spec, paths=self._error_paths, rlimit_names=())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._zygote = _zygote.Zygote(spawned.pid, spawned.pidfd, ours)
        if spawned.listener is not None:
            self._stray = RunAccount(command="(sandbox)")
            self._accounts.add(self._stray)
            self._zygote_done = self._supervisor.attach(spawned.listener, spawned.pidfd, self._stray,
                                                        resolve=self._account_for)

    async def _zygote_barrier(self) -> None:
        z = self._zygote
        if z is None or self._closed:
            return  # closing: the zygote's death takes everything
        try:
            await z.barrier()
        except _zygote.ZygoteGone:
            await self._drop_zygote()  # its death took the orphans with it

    async def _drop_zygote(self) -> None:
        """Kill and reap a zygote (every run of it dies with it). Its death
        waits for every process of its pid namespace to die: a checkpoint,
        not a blocking waitpid."""
        z, self._zygote = self._zygote, None
        if z is None:
            return
        z.kill()
        with anyio.CancelScope(shield=True):
            await anyio.wait_readable(z.pidfd.fd)
        anyio.notify_closing(z.pidfd.fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(z.pid, 0)
        z.close()

    def _account_for(self, pid: int) -> RunAccount:
        """The run a notifying task belongs to, in O(1): each run-init leads a
        session of its own (setsid in zviz-init), which every process of the
        run inherits, so the caller's session id is its run-init's pid.
        getsid is one syscall under RCU: nothing a sandbox holds can make it
        wait. A process that calls setsid() itself leaves its run's session
        and is counted in the sandbox's own bucket; it can never join another
        run's session (setsid makes its own pid the id, setpgid stays within
        a session), and a session id stays allocated while any member lives,
        so a live run-init's pid is never some other session's id."""
        assert self._stray is not None
        try:
            sid = os.getsid(pid)
        except OSError:  # gone already
            return self._stray
        return self._runs_by_pid.get(sid, self._stray)

    def _attach_monitor(self, monitor: Any, sid: int) -> None:
        # Every spawn from now on is tracked by the monitor from its first
        # instruction: the stage writes the pid into the monitor's map before
        # the child is let go.
        self._monitor = monitor
        self._monitor_sid = sid
        self._base_spec["track_map_fd"] = monitor.map_fd
        self._base_spec["track_value"] = sid | _PENDING  # PENDING until exec (_program.c)

    def _detach_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.drain_now()
            self._syscalls_final = self._monitor.syscalls_for(self._monitor_sid)
            self._errors_final = self._monitor.errors_for(self._monitor_sid)
        self._monitor = None
        self._base_spec.pop("track_map_fd", None)
        self._base_spec.pop("track_value", None)

    def syscall_errors(self) -> Mapping[tuple[str, str], int] | None:
        """With the eBPF monitor: failed calls by (syscall, errno name)."""
        if self._monitor is not None:
            return self._monitor.errors_for(self._monitor_sid)
        return self._errors_final

    def _process_ended(self, proc: Process) -> None:
        self._procs.discard(proc)
        if proc._zrun:
            if self._runs_by_pid.get(proc._pid) is proc._account:
                del self._runs_by_pid[proc._pid]
            self._fold_account(proc._account)
        self._cpu += proc.cpu_s
        self._peak_rss = max(self._peak_rss, proc.peak_rss)
        if proc.timed_out:
            self._timeouts += 1

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = b"", timeout: float | None = None,
                  env: Mapping[str, str] | None = None) -> RunResult:
        """Run a command to completion and capture its output (capped by
        `limits.output`). `timeout` defaults to the policy's `limits.wall_s`."""
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise TypeError("stdin must be bytes or None")
        timeout = self._timeout(timeout)
        proc = await self._start(argv, env=env, stdin=bool(stdin), stdout=True, stderr=True)
        cap = self.policy.limits.output

        def over_output() -> None:
            # Output past the limit cannot be delivered: stop the flood at its source.
            if proc._status is None and proc.limit is None:
                proc.limit = "output"
                proc.kill()

        out, err = Collector(cap, over_output), Collector(cap, over_output)
        try:
            with anyio.move_on_after(timeout) as scope:
                await self._drive(proc, bytes(stdin or b""), out, err)
            if scope.cancelled_caught:
                proc.timed_out = True
                proc.limit = proc.limit or "wall_s"
                proc.kill()
                with anyio.CancelScope(shield=True):
                    await proc.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(proc)
        self._bytes["stdout"] += out.total
        self._bytes["stderr"] += err.total
        if proc.stdin is not None:
            self._bytes["stdin"] += proc.stdin.bytes_sent
        status = proc._status or 0
        if proc.limit is None:
            proc.limit = self._resource_limit(status)
        return RunResult(
            argv=proc.argv,
            exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            stdout=out.value(), stderr=err.value(), timed_out=proc.timed_out,
            limit=proc.limit or _cpu_limit(status, proc.cpu_s, self.policy.limits.cpu_s),
            truncated=out.truncated or err.truncated,
            wall_s=(proc._ended or time.monotonic()) - proc._started,
            cpu_s=proc.cpu_s, peak_rss=proc.peak_rss, denials=dict(proc._account.denials),
        )

    def _resource_limit(self, status: int) -> str | None:
        """A sandbox-wide limit that ended a command: killed by the memory
        cgroup's OOM killer (a kill the cgroup counted since the last SIGKILLed
        command looked: nothing is read on the common path), or failed with
        the size-capped workdir full."""
        if self._cgroup is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            kills = self._cgroup.oom_kills()
            seen, self._oom_seen = self._oom_seen, kills
            if kills > seen:
                return "memory"
        if self._disk_mounted and status != 0 and _disk.full(self.workdir):
            return "disk"
        return None

    async def _drive(self, proc: Process, data: bytes, out: Collector, err: Collector) -> None:
        """One task, one epoll set: feed stdin, drain stdout and stderr, and
        reap the process when its pidfd fires. Returns when it has exited and
        both pipes reached EOF (or 2 s after exit: without a pid namespace a
        descendant that left the process group could hold a pipe open)."""
        assert proc.stdout is not None and proc.stderr is not None
        ep = select.epoll()
        try:
            pidfd = proc._pidfd.fd
            sinks = {proc.stdout._fd.fd: out, proc.stderr._fd.fd: err}
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
            while sinks or proc._status is None:
                if exited_at is not None and time.monotonic() - exited_at > 2.0:
                    break
                events = ep.poll(0)
                if not events:
                    if exited_at is None:
                        await anyio.wait_readable(ep.fileno())
                    else:
                        with anyio.move_on_after(max(0.0, 2.0 - (time.monotonic() - exited_at))):
                            await anyio.wait_readable(ep.fileno())
                    continue
                for fd, ev in events:
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
                        else:
                            ep.unregister(fd)
                            del sinks[fd]
            await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            anyio.notify_closing(ep.fileno())
            ep.close()

    async def _finish(self, proc: Process) -> None:
        """Kill if still running, reap, let the supervisor drain, close streams."""
        if proc._status is None:
            proc.kill()
        await proc.wait()
        if self._supervisor is not None:
            await self._supervisor.flush()  # its denials' events are out
        if proc._listener_done is not None:
            # The listener hangs up once no task of its filter is left; the
            # supervisor answers what is pending first.
            with anyio.move_on_after(1.0):
                await proc._listener_done.wait()
        proc._close_streams()

    # ---- files

    def _open_beneath(self, relpath: str, flags: int, mode: int = 0o644) -> int:
        """Open `relpath` beneath the workdir without following any symlink (the
        sandboxed code controls the workdir and may plant one)."""
        if not isinstance(relpath, str) or not relpath or "\0" in relpath:
            raise PolicyError("path", relpath, "a relative path inside the workdir")
        parts = [p for p in relpath.split("/") if p not in ("", ".")]
        if relpath.startswith("/") or not parts or ".." in parts:
            raise PolicyError("path", relpath, "a relative path inside the workdir, without '..'")
        dirfd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                if flags & os.O_CREAT:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=dirfd)
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                os.close(dirfd)
                dirfd = nxt
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dirfd)
        finally:
            os.close(dirfd)

    async def write_file(self, relpath: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write `data` to `relpath` in the workdir (parents created). `mode`
        0o755 makes it executable; set-id bits are refused."""
        self._check_open()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data must be bytes")
        if not isinstance(mode, int) or mode & ~0o777:
            raise PolicyError("mode", mode, "permission bits within 0o777 (no set-id, no sticky)")
        fd = self._open_beneath(relpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxSetupError("write-file", errno.EINVAL, relpath, "not a regular file")
            os.set_blocking(fd, True)
            view = memoryview(bytes(data))
            while view:
                view = view[os.write(fd, view):]
            uid = self._host_uid()
            if uid != os.geteuid():
                os.fchown(fd, uid, uid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        await anyio.lowlevel.checkpoint()

    async def read_file(self, relpath: str, *, max_bytes: int = 64 * 1024**2) -> bytes:
        """Read `relpath` from the workdir (a regular file, at most `max_bytes`)."""
        self._check_open()
        fd = self._open_beneath(relpath, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SandboxSetupError("read-file", errno.EINVAL, relpath, "not a regular file")
            if st.st_size > max_bytes:
                raise SandboxSetupError("read-file", errno.EFBIG, relpath, f"larger than max_bytes={max_bytes}")
            os.set_blocking(fd, True)
            chunks, total = [], 0
            while total <= max_bytes:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
                total += len(b)
        finally:
            os.close(fd)
        await anyio.lowlevel.checkpoint()
        return b"".join(chunks)[:max_bytes]

    def _host_uid(self) -> int:
        if os.geteuid() == 0:
            return _plan.NOBODY  # root's sandboxes run as nobody, with or without a user namespace
        return os.geteuid()

    # ---- observation

    def _fold_account(self, account: RunAccount) -> None:
        if account in self._accounts:
            self._accounts.discard(account)
            self._denials_done.update(account.denials)
            self._notifications_done += account.notifications
            self._connects_done += account.connects

    def statistics(self) -> SandboxStatistics:
        denials: Counter = Counter(self._denials_done)
        notifications, connects = self._notifications_done, self._connects_done
        for a in self._accounts:
            denials.update(a.denials)
            notifications += a.notifications
            connects += a.connects
        if self._monitor is not None:
            self._monitor.drain_now()
            syscalls = self._monitor.syscalls_for(self._monitor_sid)
        else:
            syscalls = self._syscalls_final
        mem = self._memory_figures()
        return SandboxStatistics(
            processes_started=self._started, processes_running=len(self._procs),
            denials=dict(denials), denials_total=sum(denials.values()), notifications=notifications,
            connects=connects, timeouts=self._timeouts, bytes_stdin=self._bytes["stdin"],
            bytes_stdout=self._bytes["stdout"], bytes_stderr=self._bytes["stderr"],
            cpu_s=self._cpu, peak_rss=self._peak_rss, spawn_s_total=self._spawn_s,
            degraded=self._degraded, syscalls=syscalls,
            memory_limit=mem[0], memory_peak=mem[1], memory_oom_kills=mem[2],
            disk_limit=self.policy.fs.disk if self._disk_mounted or self._disk_final is not None else None,
            disk_used=_disk.used(self.workdir)[0] if self._disk_mounted else self._disk_final,
        )

    def _memory_figures(self) -> tuple[int | None, int | None, int]:
        cg = self._cgroup
        if cg is None:
            return self._memory_final
        return cg.limit, cg.peak(), cg.oom_kills()

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
        procs = list(self._procs)
        if self._zygote is not None:
            self._zygote.kill()  # pid 1: every run dies with it
        for p in procs:
            p.kill()
        for p in procs:
            if p._status is None:
                await p.wait()
            p._close_streams()
        if self._zygote is not None:
            z, self._zygote = self._zygote, None
            await anyio.wait_readable(z.pidfd.fd)
            anyio.notify_closing(z.pidfd.fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(z.pid, 0)
            z.close()
        if self._zygote_done is not None:
            # its listener hangs up now that no task of its filter is left
            with anyio.move_on_after(1.0):
                await self._zygote_done.wait()
        self._events.close()
        if self._devnull is not None:
            self._devnull.close()


def _check_workdir_reachable(path: str, uid: int) -> None:
    """The sandbox runs as `uid` on the host: it must be able to reach and
    write its workdir (a root caller's sandboxes run as nobody)."""
    # Its parents need not be reachable: the stage binds the workdir into the
    # sandbox's root while it still holds the caller's identity.
    st = os.stat(path)
    if uid != st.st_uid and not st.st_mode & 0o002:
        raise PolicyError("workdir", path, f"a directory the sandbox's host uid {uid} can write "
                          f"(zviz runs a root caller's sandboxes as nobody): chown {uid} {path}, or let zviz "
                          "create a fresh workdir")


@contextlib.asynccontextmanager
async def open_sandbox(policy: Policy | None = None, *, workdir: str | os.PathLike | None = None,
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
    owns = workdir is None
    _disk.check(policy.fs.disk, owns_workdir=owns, keep_workdir=keep_workdir)
    if owns:
        # the real path: the stage binds it following no symlink
        path = os.path.realpath(tempfile.mkdtemp(prefix="zviz-"))
    else:
        path = os.path.realpath(os.fspath(workdir))
        if not os.path.isdir(path):
            raise PolicyError("workdir", os.fspath(workdir), "an existing directory")
        if os.geteuid() == 0:
            _check_workdir_reachable(path, _plan.NOBODY)
    sb = Sandbox(policy, path, owns, features)
    sb._zygote_allowed = bool(_zygote)
    if _trace is not None:
        sb._trace = _trace
        sb._trace_record = _trace.record
    # The caller's exception is carried past our task group and re-raised as
    # itself: a body that raises ValueError raises ValueError, not a group.
    body_exc: BaseException | None = None
    try:
        sb._prepare()
        async with contextlib.AsyncExitStack() as stack:
            if monitor:
                from .ebpf import _attach_monitor

                await stack.enter_async_context(_attach_monitor(sb, monitor))
            endpoints = sb._resolve_endpoints()
            async with anyio.create_task_group() as tg:
                # The supervisor serves each spawn's listener in a task of this
                # group; it is live as soon as the group is.
                sup = Supervisor(allowed_endpoints=endpoints, net_allow=policy.net.mode == "allow",
                                 on_event=sb._add_event, task_group=tg,
                                 learner=_trace.learn if _trace is not None and _trace.learning else None,
                                 on_done=sb._fold_account)
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
        sb._closed = True
        with anyio.CancelScope(shield=True):
            await _release_host_resources(sb)
        if owns and not keep_workdir:
            _rmtree(path)


async def _release_host_resources(sb: Sandbox) -> None:
    """After every process of the sandbox is dead: its memory cgroup and its
    size-capped workdir's tmpfs (the files in it go with the mount)."""
    if sb._cgroup is not None:
        sb._memory_final = sb._memory_figures()
        cg, sb._cgroup = sb._cgroup, None
        await cg.remove()
    if sb._disk_mounted:
        sb._disk_final = _disk.used(sb.workdir)[0]
        sb._disk_mounted = False
        _disk.unmount(sb.workdir)


def _cpu_limit(status: int, used: float, limit: float | None) -> str | None:
    # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later.
    if limit is None or not os.WIFSIGNALED(status):
        return None
    sig = os.WTERMSIG(status)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and used >= limit - 0.05):
        return "cpu_s"
    return None


def _rmtree(path: str) -> None:
    """Remove a workdir the sandbox may have made hostile (read-only dirs...)."""
    def onerror(func, p, exc):  # type: ignore[no-untyped-def]
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700) if not os.path.islink(p) else None
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
