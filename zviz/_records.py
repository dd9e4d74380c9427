"""The frozen records a sandbox hands out (`RunResult`, `SandboxStatistics`),
and the `Tally` that counts what goes into them. Values only: no I/O."""

from __future__ import annotations

import os
import signal
import types
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ._egress import EgressStatistics
    from ._supervisor import RunAccount


def _frozen_mapping(value: Mapping[str, int]) -> Mapping[str, int]:
    return types.MappingProxyType(dict(sorted(value.items())))


def _frozen_or_none(value: Mapping[str, int] | None) -> Mapping[str, int] | None:
    return None if value is None else _frozen_mapping(value)


def _items(value: Mapping[str, int] | None) -> tuple[tuple[str, int], ...] | None:
    """The key a mapping field compares and hashes by (a mappingproxy has no hash)."""
    return None if value is None else tuple(sorted(value.items()))


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
    denials: Mapping[str, int] = attrs.field(converter=_frozen_mapping, eq=_items)

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

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv), "exit_code": self.exit_code, "signal": self.signal,
            "status": self.status,
            "stdout": self.stdout.decode("utf-8", "replace"), "stderr": self.stderr.decode("utf-8", "replace"),
            "timed_out": self.timed_out, "truncated": self.truncated, "limit": self.limit,
            "wall_s": round(self.wall_s, 6),
            "cpu_s": round(self.cpu_s, 6), "peak_rss": self.peak_rss, "denials": dict(self.denials),
        }


@attrs.frozen(kw_only=True)
class SandboxStatistics:
    """A snapshot of one sandbox (`Sandbox.statistics()`)."""

    processes_started: int
    processes_running: int
    denials: Mapping[str, int] = attrs.field(converter=_frozen_mapping, eq=_items)
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
    syscalls: Mapping[str, int] | None = attrs.field(default=None, converter=_frozen_or_none,
                                                     eq=_items)  # eBPF monitor only
    egress: EgressStatistics | None = None  # net.mode = "domains": the egress proxy's figures


def cpu_limit(status: int, used: float, limit: float | None) -> str | None:
    """"cpu_s" when a wait status says the command ran into RLIMIT_CPU."""
    # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later.
    if limit is None or not os.WIFSIGNALED(status):
        return None
    sig = os.WTERMSIG(status)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and used >= limit - 0.05):
        return "cpu_s"
    return None


class Tally:
    """What one sandbox counted so far; `snapshot()` makes the frozen record.

    Accounts of runs whose listener is live are kept; finished ones are
    folded into the totals (memory and statistics() cost stay flat over runs).
    """

    def __init__(self) -> None:
        self.started = 0
        self.timeouts = 0
        self.bytes: Counter[str] = Counter()
        self.cpu = 0.0
        self.peak_rss = 0
        self.spawn_s = 0.0
        self._accounts: set[RunAccount] = set()
        self._denials_done: Counter[str] = Counter()
        self._notifications_done = 0
        self._connects_done = 0

    def add_account(self, account: RunAccount) -> None:
        self._accounts.add(account)

    def drop_account(self, account: RunAccount) -> None:
        """Forget an account whose figures were moved into another one."""
        self._accounts.discard(account)

    def count_denial(self, name: str) -> None:
        """A denial seen outside any run's listener (a direct connect the
        egress proxy's watchers saw inside the sandbox's namespace)."""
        self._denials_done[name] += 1

    def fold(self, account: RunAccount) -> None:
        """The run's listener is done: its figures join the totals."""
        if account in self._accounts:
            self._accounts.discard(account)
            self._denials_done.update(account.denials)
            self._notifications_done += account.notifications
            self._connects_done += account.connects

    def process_ended(self, cpu_s: float, peak_rss: int, timed_out: bool) -> None:
        self.cpu += cpu_s
        self.peak_rss = max(self.peak_rss, peak_rss)
        if timed_out:
            self.timeouts += 1

    def snapshot(self, *, running: int, degraded: tuple[str, ...], syscalls: Mapping[str, int] | None,
                 memory: tuple[int | None, int | None, int], disk: tuple[int | None, int | None]) -> SandboxStatistics:
        denials: Counter[str] = Counter(self._denials_done)
        notifications, connects = self._notifications_done, self._connects_done
        for a in self._accounts:
            denials.update(a.denials)
            notifications += a.notifications
            connects += a.connects
        return SandboxStatistics(
            processes_started=self.started, processes_running=running,
            denials=dict(denials), denials_total=sum(denials.values()), notifications=notifications,
            connects=connects, timeouts=self.timeouts, bytes_stdin=self.bytes["stdin"],
            bytes_stdout=self.bytes["stdout"], bytes_stderr=self.bytes["stderr"],
            cpu_s=self.cpu, peak_rss=self.peak_rss, spawn_s_total=self.spawn_s,
            degraded=degraded, syscalls=syscalls,
            memory_limit=memory[0], memory_peak=memory[1], memory_oom_kills=memory[2],
            disk_limit=disk[0], disk_used=disk[1],
        )
