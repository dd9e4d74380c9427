"""`zviz trace`: run a command under a permissive, observed policy and write
the smallest policy that lets the same run pass.

Two ways to observe, chosen automatically (`--learn` forces the second):
- eBPF (root, bcc): every syscall is allowed in the kernel but the dangerous
  ones, counted by the monitor; paths and connect addresses come from a
  sys_enter probe. Fast: nothing is notified but the dangerous calls.
- learning mode (anyone): the seccomp filter notifies every syscall; the
  supervisor records it (and the path or address it names) and lets it run
  (SECCOMP_USER_NOTIF_FLAG_CONTINUE). This is NOT a security boundary: run
  only code you would run anyway. Dangerous syscalls are still refused.
Either way the command sees the host's filesystem read-only (plus its
workdir), no private network namespace, and its output passes through.
"""

from __future__ import annotations

import warnings
from typing import Any

import attrs

from . import _bpf, _decide, _kernel, _probe, _syscalls
from ._errors import FeatureUnavailable, ZvizWarning
from ._generate import Peaks, TraceRecord, generate, permissive_names
from ._policy import Filesystem, Network, Policy, Syscalls

_PATH_CALLS = {"open": 0, "openat": 1, "execve": 0, "execveat": 1, "mkdir": 0, "mkdirat": 1, "unlink": 0,
               "unlinkat": 1, "rename": 0, "renameat2": 1, "creat": 0}
_FLAGS_ARG = {"open": 1, "openat": 2, "creat": -1}


@attrs.define
class TraceSettings:
    """Handed to open_sandbox (privately): how the traced sandbox is filtered."""

    learning: bool
    record: TraceRecord = attrs.field(factory=TraceRecord)

    def filter_spec(self, notify: bool) -> _bpf.FilterSpec:
        if self.learning:
            if not notify:
                raise FeatureUnavailable("zviz trace (learning mode)", "this kernel has no seccomp user notification",
                                         "kernel >= 5.5, or run as root with bcc for the eBPF mode")
            return _bpf.FilterSpec(allow=frozenset(), net_mode="any", notify=True, learning=True)
        return _bpf.FilterSpec(allow=permissive_names(), net_mode="any", notify=notify)

    def learn(self, n: _kernel.Notification) -> bool:
        """Record the call; True lets it run. Dangerous ones are refused even
        while learning (then decided and reported like any denial)."""
        name = _decide.syscall_name(n.nr)
        self.record.syscalls[name] += 1
        if name in _syscalls.DANGEROUS:
            return False
        if name == "clone" and n.args[0] & _bpf.CLONE_NS_FLAGS:
            return False  # no namespaces, even while learning
        if name in _PATH_CALLS:
            path = _kernel.read_child_string(n.pid, n.args[_PATH_CALLS[name]], 4096) or ""
            fa = _FLAGS_ARG.get(name)
            flags = 0o101 if fa == -1 else (n.args[fa] if fa is not None else 0)
            self.record.path(name, path, flags)
        elif name == "connect":
            try:
                self.record.sockaddr(_kernel.read_child_memory(n.pid, n.args[1], min(n.args[2] & 0xFFFF, 28)))
            except (OSError, ValueError, OverflowError):
                pass
        return True


def trace_policy(base: Policy) -> Policy:
    """The policy a traced command runs under (paths, env, namespaces)."""
    return attrs.evolve(
        base,
        name="trace",
        syscalls=Syscalls(allow=("@python",)),  # replaced by the trace filter
        fs=Filesystem(read_only=("/",), read_write=base.fs.read_write, tmp_size=base.fs.tmp_size),
        net=Network(mode="none"),
        # the traced program's connections are observed in the host's network
        namespaces=attrs.evolve(base.namespaces, net=False),
        limits=attrs.evolve(base.limits, output=None),
    )


@attrs.frozen(kw_only=True)
class TraceResult:
    mode: str
    argv: tuple[str, ...]
    status: int
    policy: Policy
    notes: tuple[str, ...]
    syscalls: dict[str, int]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    endpoints: tuple[str, ...]
    denials: dict[str, int]
    wall_s: float
    peak_rss: int
    stdout: bytes
    stderr: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "argv": list(self.argv), "status": self.status,
            "syscalls": dict(sorted(self.syscalls.items(), key=lambda kv: -kv[1])),
            "reads": list(self.reads), "writes": list(self.writes), "endpoints": list(self.endpoints),
            "denials": self.denials, "wall_s": round(self.wall_s, 4), "peak_rss": self.peak_rss,
            "notes": list(self.notes), "policy": self.policy.to_dict(),
        }


async def trace(argv: list[str], *, base: Policy, learn: bool | None = None, timeout: float = 60.0,
                stdin: bytes = b"") -> TraceResult:
    from ._sandbox import _open_sandbox

    use_ebpf = False
    if learn is not True:
        ok, why = _probe.bcc_status()
        use_ebpf = ok
        if learn is False and not ok:
            raise FeatureUnavailable("zviz trace (eBPF)", why, "run as root with bcc, or use --learn")
    settings = TraceSettings(learning=not use_ebpf)
    policy = trace_policy(base)
    with warnings.catch_warnings():
        # the trace policy reads the whole host on purpose: not worth a warning
        warnings.filterwarnings("ignore", message=".*whole host filesystem.*", category=ZvizWarning)
        sb_cm = _open_sandbox(policy, monitor=use_ebpf, trace=settings)
        sb = await sb_cm.__aenter__()
    try:
        if use_ebpf:
            sb._monitor.set_trace(True)
        try:
            r = await sb.run(argv, timeout=timeout, stdin=stdin)
        finally:
            if use_ebpf:
                sb._monitor.drain_now()
                sb._monitor.set_trace(False)
        stats = sb.statistics()
        if use_ebpf and stats.syscalls:
            settings.record.syscalls.update(stats.syscalls)
        workdir = sb.workdir
    except BaseException as e:
        if not await sb_cm.__aexit__(type(e), e, e.__traceback__):
            raise
    else:
        await sb_cm.__aexit__(None, None, None)
    rec = settings.record
    peaks = Peaks(wall_s=r.wall_s, peak_rss=r.peak_rss, output=max(len(r.stdout), len(r.stderr)))
    new_policy, notes = generate(rec, base=base, workdir=workdir, cwd=workdir, peaks=peaks)
    if r.timed_out:
        notes.append(f"the traced run timed out after {timeout:g} s: the policy may miss what came later")
    if r.status != 0:
        notes.append(f"the traced run exited with status {r.status}")
    return TraceResult(
        mode="ebpf" if use_ebpf else "learning", argv=tuple(argv), status=r.status, policy=new_policy,
        notes=tuple(notes), syscalls=dict(rec.syscalls), reads=tuple(sorted(rec.reads)),
        writes=tuple(sorted(rec.writes)), endpoints=tuple(f"{h}:{p}" for h, p in sorted(rec.endpoints)),
        denials=dict(r.denials), wall_s=r.wall_s, peak_rss=r.peak_rss, stdout=r.stdout, stderr=r.stderr,
    )


def summary(t: TraceResult) -> str:
    lines = [f"zviz trace ({t.mode} mode{'; NOT a security boundary' if t.mode == 'learning' else ''}): "
             f"{' '.join(t.argv)} -> status {t.status}, {t.wall_s * 1e3:.0f} ms, peak RSS {t.peak_rss >> 20} MiB",
             "", f"{'syscall':<22} {'calls':>8}"]
    for name, n in sorted(t.syscalls.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<22} {n:>8}")
    if t.denials:
        lines += ["", "denied: " + ", ".join(f"{k} x{v}" for k, v in t.denials.items())]
    lines += ["", f"files read: {len(t.reads)}, written: {len(t.writes)}",
              "endpoints: " + (", ".join(t.endpoints) or "none")]
    lines += [f"note: {n}" for n in t.notes]
    lines += ["", f"policy: {len(t.policy.syscalls.allow)} syscalls, read-only {list(t.policy.fs.read_only)}, "
              f"read-write {list(t.policy.fs.read_write)}, net {t.policy.net.mode}"]
    return "\n".join(lines)
