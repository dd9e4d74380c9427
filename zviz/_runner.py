"""How a sandbox's commands are spawned: the stage spec it was planned with
(`_planmemo`), and the zygote that forks every command once it is up.

A `Runner` owns the sandbox's /dev/null, the current zygote (spawned at the
first command where the layers allow it: a pid namespace with its /proc; a
zygote that died, e.g. to the OOM killer, is replaced once), the account of
calls that belong to no run, and the mapping from a notifying task to the run
it belongs to. Without a zygote every command is one full spawn of the stage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import anyio
import attrs

from . import _kernel, _plan, _spec, _zygote
from ._errors import SandboxClosedError, SandboxSetupError
from ._kernel import OwnedFd
from ._records import Tally
from ._spec import StageSpec
from ._supervisor import RunAccount, Supervisor

if TYPE_CHECKING:
    from . import _warm

_PENDING = 0x80000000  # eBPF monitor (zviz/ebpf/_program.c): not counted until exec
_SKIP_EXEC = 0x40000000  # ... and that exec (zviz-init's own) does not count


@attrs.frozen
class Command:
    """One command, ready to spawn: a zygote request, or what a full spawn of
    the stage execs (its `_spec.Command` is made at spawn, with the fds)."""

    request: bytes | None
    exe: bytes
    argv: tuple[bytes, ...]
    envp: tuple[bytes, ...]
    warm: tuple[_warm.Server, int] | None = None  # a warm snippet (_warm.py): its server and its input's fd

    @property
    def zrun(self) -> bool:
        return self.request is not None


_MAX_PROVISIONAL = 64  # sessions held apart while requests are in flight


class Runner:
    def __init__(self, *, plan: _plan.SandboxPlan, stage: StageSpec, zygote_stage: StageSpec | None,
                 packed: bytes, init_fd: int, cgroup_fd: int, use_zygote: bool, tally: Tally) -> None:
        self._plan = plan
        self._stage = stage
        # Packed once per sandbox (_planmemo), and only the stage it spawns
        # with: the zygote's (then a full spawn, e.g. after the zygote is gone
        # for good, packs its own when first needed) or the full one.
        self._zygote_stage = zygote_stage if use_zygote else None
        self._zygote_packed = packed if use_zygote else None
        self._stage_packed: bytes | None = None if use_zygote else packed
        self._init_fd = init_fd
        self._cgroup_fd = cgroup_fd  # the memory cgroup's cgroup.procs (-1: none)
        self._base_env = dict(plan.env)
        self._base_envp = tuple(f"{k}={v}".encode() for k, v in plan.env)
        self._run_rlimits: list[tuple[int, int, int]] = list(stage.rlimits)
        self._track = (-1, 0)  # the eBPF monitor's map and this sandbox's value in it
        self.use_zygote = use_zygote
        self._tally = tally
        self._devnull = _kernel.open_devnull()
        self.zygote: _zygote.Zygote | None = None
        # called with each new zygote's pidfd before it is asked to run anything (the egress proxy's
        # listener in its network namespace, _egress.EgressProxy.listen_inside)
        self.on_zygote: Callable[[_kernel.OwnedFd], None] | None = None
        self.egress_inside = False  # its filter lets connects through in-kernel, to the proxy in its netns
        # The zygote's mount namespace, held from here so that its end (the
        # unmount of the sandbox's whole mount table, and the RCU grace period
        # that waits for) is not part of the zygote's exit, which close waits
        # for, but of aclose(), after. Nothing can enter it: no process is
        # left in it by then, and only this fd (ours, close-on-exec) names it.
        self._mnt_ns: OwnedFd | None = None
        self._zygote_done: anyio.Event | None = None
        self._stray: RunAccount | None = None  # the zygote's calls, and a run's that could not be told
        self._runs_by_pid: dict[int, RunAccount] = {}  # live runs of the zygote, by their run-init's host pid
        # Denials from a session that is not a known run while a request to
        # the zygote is in flight: most likely the run being started (its
        # program can be denied before the reply reaches us). Held apart and
        # merged into that run when it is registered; capped.
        self._inflight = 0
        self._provisional: dict[int, RunAccount] = {}  # by session id inside the sandbox
        self._closing = False
        # Stage children between clone and exec (_kernel.start_spawn): the loop
        # goes on while they set up; kill() kills them, reap() waits for them.
        self._pending: set[_kernel.PendingSpawn] = set()
        self._pending_gone: anyio.Event | None = None
        self._zygote_starting: anyio.Event | None = None  # set when a zygote's spawn has ended either way
        # a zygote spawn begun before the sandbox's tasks run (begin_zygote), and our end of its socket
        self._zygote_begun: tuple[_kernel.PendingSpawn, socket.socket] | None = None
        self._dropping: anyio.Event | None = None  # set while drop_zygote reaps a zygote (reap() waits for it)

    @property
    def devnull_fd(self) -> int:
        return self._devnull.fd

    # ---- the monitor's tracking (zviz.ebpf): every spawn from now on is
    # tracked from its first instruction (the stage writes the pid into the
    # monitor's map before the child is let go)

    def track(self, map_fd: int, sid: int) -> None:
        self._track = (map_fd, sid | _PENDING)  # PENDING until exec (_program.c)

    def untrack(self) -> None:
        self._track = (-1, 0)

    # ---- spawning

    def command(self, argv: tuple[str, ...], exe: str, env: Mapping[str, str] | None) -> Command:
        exe_b = exe.encode()
        envp = self._base_envp
        if env:
            full = dict(self._base_env)
            full.update(env)
            envp = tuple(f"{k}={v}".encode() for k, v in sorted(full.items()))
        argv_b = tuple(a.encode() for a in argv)
        request = _zygote.encode_request(exe_b, argv_b, envp, self._run_rlimits) if self.use_zygote else None
        return Command(request, exe_b, argv_b, envp)

    async def spawn(self, cmd: Command, stdio: Sequence[int], status_fd: int,
                    supervisor: Supervisor) -> _kernel.Spawned:
        """Start `cmd` with `stdio` on its fds 0-2 and zviz-init's status pipe."""
        if cmd.request is not None:
            return await self._zygote_run(cmd.request, [*stdio, status_fd], supervisor)
        if cmd.warm is not None:  # a fork of the server, not an exec: the snippet comes through its own pipe
            server, input_fd = cmd.warm
            spawn = _plan.command_spec(self._plan, exe=cmd.exe, argv=(cmd.exe,), envp=(),
                                       stdio=(stdio[0], stdio[1], stdio[2]), status_fd=status_fd, init_fd=-1,
                                       cgroup_fd=self._cgroup_fd)
            if self._stage_packed is None:
                self._stage_packed = self._stage.pack()
            return await server.spawn(self._stage, self._stage_packed, spawn, input_fd)
        spawn = _plan.command_spec(self._plan, exe=cmd.exe, argv=cmd.argv, envp=cmd.envp,
                                   stdio=(stdio[0], stdio[1], stdio[2]), status_fd=status_fd, init_fd=self._init_fd,
                                   track=self._track, cgroup_fd=self._cgroup_fd)
        if self._stage_packed is None:
            self._stage_packed = self._stage.pack()
        return await self._spawn_stage(self._stage, self._stage_packed, spawn)

    async def _spawn_stage(self, stage: StageSpec, packed: bytes, cmd: _spec.Command) -> _kernel.Spawned:
        """One spawn of the stage, the loop free while its child sets up. A
        close meanwhile kills it (kill()); it is then reaped here, not returned."""
        return await self._finish_stage(self._start_stage(stage, packed, cmd))

    def _start_stage(self, stage: StageSpec, packed: bytes, cmd: _spec.Command) -> _kernel.PendingSpawn:
        if self._closing:
            raise SandboxClosedError("the sandbox was closed while a command was being started in it")
        pending = _kernel.start_spawn(stage, packed, cmd)
        self._pending.add(pending)
        return pending

    async def _finish_stage(self, pending: _kernel.PendingSpawn) -> _kernel.Spawned:
        try:
            spawned = await pending.wait()
        except SandboxSetupError:
            if self.closing():  # killed by kill() before its exec: no listener came, say, not a set-up failure
                raise SandboxClosedError("the sandbox was closed while a command was being started in it") \
                    from None
            raise
        finally:
            self._pending.discard(pending)
            if not self._pending and self._pending_gone is not None:
                self._pending_gone.set()
        if self.closing():  # (kill() came while it set up)
            await _kill_and_reap(spawned)
            raise SandboxClosedError("the sandbox was closed while a command was being started in it")
        return spawned

    def discard(self, spawned: _kernel.Spawned, not_ours: bool) -> None:
        """A started command that must not outlive a failed start: kill, reap
        (not if `not_ours`: the zygote's run-init, a warm snippet's pid 1), close."""
        _kernel.pidfd_kill(spawned.pidfd)
        if not not_ours:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spawned.pid, 0)
        for owned in (spawned.pidfd, spawned.listener):
            if owned is not None:
                owned.close()

    def add_run(self, pid: int, ns_pid: int, account: RunAccount) -> None:
        """A zygote's run, by its run-init's host pid (the id of its session;
        -1 when it is gone already) and its pid inside. What its program was
        denied before this moment joins its account."""
        if pid > 0:
            self._runs_by_pid[pid] = account
        early = self._provisional.pop(ns_pid, None) if ns_pid > 0 else None
        if early is not None:
            self._tally.drop_account(early)
            account.denials.update(early.denials)
            account.notifications += early.notifications
            account.connects += early.connects
        if self._inflight == 0:
            self._settle_provisional()

    def _settle_provisional(self) -> None:
        """No request is in flight: sessions still unknown belong to no run
        (a process that left its run's session); their figures stay in the
        sandbox's totals."""
        for early in self._provisional.values():
            self._tally.fold(early)
        self._provisional.clear()

    def sole_run(self) -> RunAccount | None:
        """The run a denial the kernel made without saying who (a direct connect
        refused in the sandbox's own namespace, _egress) can be told to be: the
        only live one, with no other starting; else None (the sandbox's totals)."""
        if len(self._runs_by_pid) != 1 or self._inflight:
            return None
        return next(iter(self._runs_by_pid.values()))

    def end_run(self, pid: int, account: RunAccount) -> None:
        if self._runs_by_pid.get(pid) is account:
            del self._runs_by_pid[pid]

    async def _zygote_run(self, request: bytes, fds: list[int], supervisor: Supervisor) -> _kernel.Spawned:
        """One run through the zygote (spawned on first use; a zygote that
        died, e.g. to the OOM killer, is replaced once)."""
        for attempt in (0, 1):
            if self._closing:  # (the zygote died to the close, not to its own doing: no new one)
                raise SandboxClosedError("the sandbox was closed while a command was being started in it")
            if self.zygote is None:
                await self._spawn_zygote(supervisor)
                if self.zygote is None:  # (another task spawned it, and the sandbox closed meanwhile)
                    raise SandboxClosedError("the sandbox was closed while a command was being started in it")
            self._inflight += 1
            try:
                pidfd, ns_pid = await self.zygote.request(request, fds)
            except _zygote.ZygoteGone:
                if self._closing:  # the teardown reaps it (waiting for it there is what aclose() returns at)
                    raise SandboxClosedError("the sandbox was closed while a command was being started in it") \
                        from None
                await self.drop_zygote()
                if attempt:
                    raise SandboxSetupError("zygote", errno.EPIPE, None,
                                            "the sandbox's zviz-init died twice in a row") from None
                continue
            finally:
                self._inflight -= 1
            return _kernel.Spawned(pid=-1, pidfd=pidfd, listener=None, ns_pid=ns_pid)
        raise AssertionError("unreachable")

    async def _spawn_zygote(self, supervisor: Supervisor) -> None:
        """Spawn the zygote; a task that comes while another spawns it waits for
        that one (and tries itself if that one failed or was cancelled)."""
        while self._zygote_starting is not None:
            await self._zygote_starting.wait()
            if self.zygote is not None or self._closing:
                return
        self._zygote_starting = starting = anyio.Event()
        try:
            await self._spawn_zygote_now(supervisor)
        finally:
            self._zygote_starting = None
            starting.set()

    def begin_zygote(self) -> None:
        """Start the zygote's spawn now, before the sandbox's tasks run (its
        child sets itself up meanwhile: ~1.2 ms); the first `_spawn_zygote`
        finishes it. A failure here is left to that one, which spawns again."""
        if not self.use_zygote or self.zygote is not None or self._zygote_begun is not None or self._closing:
            return
        with contextlib.suppress(Exception):
            self._zygote_begun = self._start_zygote()

    def _start_zygote(self) -> tuple[_kernel.PendingSpawn, socket.socket]:
        ours, theirs = _zygote.control_pair()
        try:
            stage = self._zygote_stage if self._zygote_stage is not None else _plan.zygote_stage_spec(self._stage)
            packed = self._zygote_packed if self._zygote_packed is not None else stage.pack()
            map_fd, value = self._track
            track = (map_fd, value | _SKIP_EXEC) if map_fd >= 0 else self._track  # counted from the program's exec
            cmd = _plan.zygote_command(self._plan, stage, ctrl_fd=theirs.fd, devnull=self._devnull.fd,
                                       init_fd=self._init_fd, track=track, cgroup_fd=self._cgroup_fd)
            return self._start_stage(stage, packed, cmd), ours
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # (the child has its copy, from the clone)

    async def _spawn_zygote_now(self, supervisor: Supervisor) -> None:
        begun, self._zygote_begun = self._zygote_begun, None
        pending, ours = begun if begun is not None else self._start_zygote()
        try:
            spawned = await self._finish_stage(pending)
        except BaseException:
            ours.close()
            raise
        self.zygote = _zygote.Zygote(spawned.pid, spawned.pidfd, ours)
        if self.on_zygote is not None:  # before any command runs in its namespaces
            try:
                self.on_zygote(spawned.pidfd)
            except BaseException:
                self.zygote = None
                await _kill_and_reap(spawned)
                ours.close()
                raise
        self._drop_mnt_ns()  # (a zygote that died and is replaced: its namespace goes now)
        with contextlib.suppress(OSError):  # (without it the zygote's exit unmounts: slower, as correct)
            self._mnt_ns = OwnedFd(os.open(f"/proc/{spawned.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC),
                                   "zygote-mnt-ns")
        if spawned.listener is not None:
            self._stray = RunAccount(command="(sandbox)")
            self._tally.add_account(self._stray)
            self._zygote_done = supervisor.attach(spawned.listener, spawned.pidfd, self._stray,
                                                  resolve=self.account_for)

    async def ensure_zygote(self, supervisor: Supervisor) -> _zygote.Zygote | None:
        """The zygote, spawned now if the sandbox uses one (the file API looks
        into the sandbox's root through it); None without one."""
        if self.use_zygote and self.zygote is None and not self._closing:
            await self._spawn_zygote(supervisor)
        return self.zygote

    async def barrier(self) -> None:
        """Return once the zygote has killed what its dead runs left."""
        z = self.zygote
        if z is None or self._closing:
            return  # closing: the zygote's death takes everything
        try:
            await z.barrier()
        except _zygote.ZygoteGone:
            if not self._closing:  # (closing: the teardown reaps it)
                await self.drop_zygote()  # its death took the orphans with it

    async def drop_zygote(self) -> None:
        """Kill and reap a zygote (every run of it dies with it). Its death
        waits for every process of its pid namespace to die: a checkpoint,
        not a blocking waitpid."""
        z, self.zygote = self.zygote, None
        if z is None:
            return
        self._dropping = dropping = anyio.Event()
        try:
            z.kill()
            with anyio.CancelScope(shield=True):
                await anyio.wait_readable(z.pidfd.fd)
            anyio.notify_closing(z.pidfd.fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(z.pid, 0)  # noqa: ASYNC222 - its pidfd said it is dead: no wait
            z.close()
            self._drop_mnt_ns()
        finally:
            self._dropping = None
            dropping.set()

    def account_for(self, pid: int) -> RunAccount:
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
        account = self._runs_by_pid.get(sid)
        if account is not None:
            return account
        if self._inflight and sid != self.zygote_pid():
            # Keyed by the session id inside the sandbox, which the zygote's
            # reply names even when the run has ended before it is read.
            ns_sid = _zygote.ns_session(pid)
            early = self._provisional.get(ns_sid) if ns_sid > 0 else None
            if early is None and ns_sid > 0 and len(self._provisional) < _MAX_PROVISIONAL:
                early = self._provisional[ns_sid] = RunAccount(command="(starting)")
                self._tally.add_account(early)
            if early is not None:
                return early
        return self._stray

    def closing(self) -> bool:
        """kill() was called: the sandbox is being closed."""
        return self._closing

    def zygote_pid(self) -> int:
        return self.zygote.pid if self.zygote is not None else -1

    # ---- teardown

    def kill(self) -> None:
        """SIGKILL the zygote, pid 1: every run dies with it."""
        self._closing = True
        if self.zygote is not None:
            self.zygote.kill()
        for pending in tuple(self._pending):  # (a copy: a finalizer calls this from any thread, as tasks change it)
            pending.kill()

    async def reap(self) -> None:
        """After kill(): wait until the zygote is dead and reap it. The kernel
        reports the death of a pid namespace's init only once it has killed
        and reaped every other task of the namespace (zap_pid_ns_processes):
        when this returns, no process of the sandbox exists any more."""
        self._closing = True
        self._drop_begun()  # (not finished by a task: nobody would reap it)
        while self._pending:  # killed by kill(): their spawning tasks reap them
            self._pending_gone = anyio.Event()
            await self._pending_gone.wait()
        if self._dropping is not None:  # a zygote that died on its own is being reaped by a command's task
            await self._dropping.wait()
        if self.zygote is not None:
            z, self.zygote = self.zygote, None
            await anyio.wait_readable(z.pidfd.fd)
            anyio.notify_closing(z.pidfd.fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(z.pid, 0)  # noqa: ASYNC222 - its pidfd said it is dead: no wait
            z.close()

    async def aclose(self) -> None:
        """After kill() and every run reaped: reap the zygote, let its
        listener drain, close /dev/null."""
        await self.reap()
        self._drop_mnt_ns()
        if self._zygote_done is not None:
            # its listener hangs up now that no task of its filter is left
            with anyio.move_on_after(1.0):
                await self._zygote_done.wait()
        self._settle_provisional()
        self._devnull.close()

    def _drop_begun(self) -> None:
        """A zygote spawn that begin_zygote began and no task took on (the
        sandbox closed first): killed (kill() did) and reaped here."""
        begun, self._zygote_begun = self._zygote_begun, None
        if begun is not None:
            self._pending.discard(begun[0])
            begun[0].abort()
            begun[1].close()
            if not self._pending and self._pending_gone is not None:
                self._pending_gone.set()

    def _drop_mnt_ns(self) -> None:
        if self._mnt_ns is not None:
            ns, self._mnt_ns = self._mnt_ns, None
            # the last reference: the kernel unmounts the sandbox's mount table then, in the closing
            # thread, with a grace period (~0.3 ms): off the caller's path, as nothing is in it any more
            _kernel.close_later(ns)

    def close(self) -> None:
        """The sandbox failed before it ran anything (or, idempotent, the
        last step of any teardown)."""
        self._drop_begun()
        self._drop_mnt_ns()
        self._devnull.close()


async def _kill_and_reap(spawned: _kernel.Spawned) -> None:
    """A spawned stage child that must not run: SIGKILL, reap (a checkpoint:
    its pidfd says when), close what we hold of it."""
    _kernel.pidfd_kill(spawned.pidfd)
    with anyio.CancelScope(shield=True):
        await anyio.wait_readable(spawned.pidfd.fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(spawned.pid, 0)  # noqa: ASYNC222 - its pidfd said it is dead: no wait
    for owned in (spawned.pidfd, spawned.listener):
        if owned is not None:
            owned.close()
