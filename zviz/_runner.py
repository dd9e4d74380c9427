"""How a sandbox's commands are spawned: the base stage spec planned once per
sandbox, and the zygote that forks every command once it is up.

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
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import attrs

from . import _kernel, _linux, _zygote
from ._errors import SandboxSetupError
from ._records import Tally
from ._supervisor import RunAccount, Supervisor

_PENDING = 0x80000000  # eBPF monitor (zviz/ebpf/_program.c): not counted until exec
_SKIP_EXEC = 0x40000000  # ... and that exec (zviz-init's own) does not count


@attrs.frozen
class Command:
    """One command, ready to spawn: a zygote request, or a full stage spec."""

    request: bytes | None
    spec: dict[str, Any] | None

    @property
    def zrun(self) -> bool:
        return self.request is not None


class Runner:
    def __init__(self, *, base_spec: dict[str, Any], base_env: Mapping[str, str], error_paths: tuple[str, ...],
                 error_rlimits: tuple[str, ...], use_zygote: bool, tally: Tally) -> None:
        self._base_spec = base_spec
        self._base_env = dict(base_env)
        self._base_envp: list[bytes] = base_spec["envp"]
        self._error_paths = error_paths
        self._error_rlimits = error_rlimits
        self._run_rlimits: list[tuple[int, int, int]] = list(base_spec["rlimits"])
        self.use_zygote = use_zygote
        self._tally = tally
        self._devnull = _kernel.open_devnull()
        self.zygote: _zygote.Zygote | None = None
        self._zygote_done: anyio.Event | None = None
        self._stray: RunAccount | None = None  # the zygote's calls, and a run's that could not be told
        self._runs_by_pid: dict[int, RunAccount] = {}  # live runs of the zygote, by their run-init's host pid
        self._closing = False

    @property
    def devnull_fd(self) -> int:
        return self._devnull.fd

    # ---- the monitor's tracking (zviz.ebpf): every spawn from now on is
    # tracked from its first instruction (the stage writes the pid into the
    # monitor's map before the child is let go)

    def track(self, map_fd: int, sid: int) -> None:
        self._base_spec["track_map_fd"] = map_fd
        self._base_spec["track_value"] = sid | _PENDING  # PENDING until exec (_program.c)

    def untrack(self) -> None:
        self._base_spec.pop("track_map_fd", None)
        self._base_spec.pop("track_value", None)

    # ---- spawning

    def command(self, argv: tuple[str, ...], exe: str, env: Mapping[str, str] | None) -> Command:
        exe_b = exe.encode()
        envp = self._base_envp
        if env:
            full = dict(self._base_env)
            full.update(env)
            envp = [f"{k}={v}".encode() for k, v in sorted(full.items())]
        if self.use_zygote:
            return Command(_zygote.encode_request(exe_b, [a.encode() for a in argv], envp, self._run_rlimits), None)
        spec = dict(self._base_spec)
        spec["exe"] = exe_b
        spec["argv"] = [b"zviz-init", str(_linux.STATUS_FD).encode(), exe_b] + [a.encode() for a in argv]
        spec["envp"] = envp
        return Command(None, spec)

    async def spawn(self, cmd: Command, stdio: Sequence[int], status_fd: int,
                    supervisor: Supervisor) -> _kernel.Spawned:
        """Start `cmd` with `stdio` on its fds 0-2 and zviz-init's status pipe."""
        if cmd.request is not None:
            return await self._zygote_run(cmd.request, [*stdio, status_fd], supervisor)
        assert cmd.spec is not None
        spec = cmd.spec
        spec["stdin"], spec["stdout"], spec["stderr"] = stdio
        spec["status_fd"] = status_fd
        return _kernel.spawn(spec, paths=self._error_paths, rlimit_names=self._error_rlimits)

    def discard(self, spawned: _kernel.Spawned, zrun: bool) -> None:
        """A started command that must not outlive a failed start: kill, reap, close."""
        _kernel.pidfd_kill(spawned.pidfd)
        if not zrun:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spawned.pid, 0)
        for owned in (spawned.pidfd, spawned.listener):
            if owned is not None:
                owned.close()

    def add_run(self, pid: int, account: RunAccount) -> None:
        """A zygote's run, by its run-init's host pid (the id of its session)."""
        self._runs_by_pid[pid] = account

    def end_run(self, pid: int, account: RunAccount) -> None:
        if self._runs_by_pid.get(pid) is account:
            del self._runs_by_pid[pid]

    async def _zygote_run(self, request: bytes, fds: list[int], supervisor: Supervisor) -> _kernel.Spawned:
        """One run through the zygote (spawned on first use; a zygote that
        died, e.g. to the OOM killer, is replaced once)."""
        for attempt in (0, 1):
            if self.zygote is None:
                self._spawn_zygote(supervisor)
            assert self.zygote is not None
            try:
                pidfd = await self.zygote.request(request, fds)
            except _zygote.ZygoteGone:
                await self.drop_zygote()
                if attempt:
                    raise SandboxSetupError("zygote", errno.EPIPE, None,
                                            "the sandbox's zviz-init died twice in a row") from None
                continue
            return _kernel.Spawned(pid=-1, pidfd=pidfd, listener=None)
        raise AssertionError("unreachable")

    def _spawn_zygote(self, supervisor: Supervisor) -> None:
        ours, theirs = _zygote.control_pair()
        try:
            spec = dict(self._base_spec)
            spec["exe"] = b"zviz-init"
            # each command in a Landlock domain of its own (docs/security-model.md)
            ruleset = spec["landlock_abi"] > 0
            spec["command_ruleset"] = ruleset
            spec["argv"] = [b"zviz-init", b"--zygote", str(_linux.STATUS_FD).encode(),
                            str(_linux.COMMAND_RULESET_FD).encode() if ruleset else b"-"]
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
        self.zygote = _zygote.Zygote(spawned.pid, spawned.pidfd, ours)
        if spawned.listener is not None:
            self._stray = RunAccount(command="(sandbox)")
            self._tally.add_account(self._stray)
            self._zygote_done = supervisor.attach(spawned.listener, spawned.pidfd, self._stray,
                                                  resolve=self.account_for)

    async def barrier(self) -> None:
        """Return once the zygote has killed what its dead runs left."""
        z = self.zygote
        if z is None or self._closing:
            return  # closing: the zygote's death takes everything
        try:
            await z.barrier()
        except _zygote.ZygoteGone:
            await self.drop_zygote()  # its death took the orphans with it

    async def drop_zygote(self) -> None:
        """Kill and reap a zygote (every run of it dies with it). Its death
        waits for every process of its pid namespace to die: a checkpoint,
        not a blocking waitpid."""
        z, self.zygote = self.zygote, None
        if z is None:
            return
        z.kill()
        with anyio.CancelScope(shield=True):
            await anyio.wait_readable(z.pidfd.fd)
        anyio.notify_closing(z.pidfd.fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(z.pid, 0)  # noqa: ASYNC222 - its pidfd said it is dead: no wait
        z.close()

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
        return self._runs_by_pid.get(sid, self._stray)

    # ---- teardown

    def kill(self) -> None:
        """SIGKILL the zygote, pid 1: every run dies with it."""
        self._closing = True
        if self.zygote is not None:
            self.zygote.kill()

    async def aclose(self) -> None:
        """After kill() and every run reaped: reap the zygote, let its
        listener drain, close /dev/null."""
        self._closing = True
        if self.zygote is not None:
            z, self.zygote = self.zygote, None
            await anyio.wait_readable(z.pidfd.fd)
            anyio.notify_closing(z.pidfd.fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(z.pid, 0)  # noqa: ASYNC222 - its pidfd said it is dead: no wait
            z.close()
        if self._zygote_done is not None:
            # its listener hangs up now that no task of its filter is left
            with anyio.move_on_after(1.0):
                await self._zygote_done.wait()
        self._devnull.close()

    def close(self) -> None:
        """The sandbox failed before it ran anything."""
        self._devnull.close()
