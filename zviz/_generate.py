"""What a traced run did -> the smallest policy that lets the same run pass.
Pure: a `TraceRecord` in, a `Policy` out; no kernel, no bcc.

- syscalls: every one the run made, minus the dangerous ones (reported, left
  denied: a policy that needs ptrace says so by hand), as names;
- paths: what it opened outside the base preset's paths, the workdir, /proc,
  /dev and its private /tmp; a file read becomes its directory read-only, a
  file written (or a directory made or removed) its directory read-write;
  siblings collapse to their common parent when three or more share it;
- network: the IP:port pairs it connected to (none: no network);
- limits: observed peaks with headroom (wall x3 + 1 s; memory: the base
  policy's address-space limit, or 4x the peak RSS if that is more; output x4
  and at least 1 MiB).
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import struct
from collections import Counter

import attrs

from . import _syscalls
from ._policy import Endpoint, Filesystem, Limits, Network, Policy, Syscalls

O_ACCMODE = 3
O_CREAT = 0o100
WRITE_CALLS = {"mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat", "renameat2"}
SKIP = ("/proc", "/dev", "/sys")  # given to every sandbox (its own /proc, a few devices) or never


@attrs.define
class TraceRecord:
    """Filled by the monitor (eBPF) or the learning supervisor."""

    syscalls: Counter[str] = attrs.field(factory=Counter)
    reads: set[str] = attrs.field(factory=set)
    writes: set[str] = attrs.field(factory=set)
    execs: set[str] = attrs.field(factory=set)
    endpoints: set[tuple[str, int]] = attrs.field(factory=set)

    def path(self, call: str, path: str, flags: int) -> None:
        if not path:
            return
        if call in ("execve", "execveat"):
            self.execs.add(path)
        elif call in WRITE_CALLS or (flags & O_ACCMODE) or flags & O_CREAT:
            self.writes.add(path)
        else:
            self.reads.add(path)

    def sockaddr(self, data: bytes) -> None:
        if len(data) < 8:
            return
        family = struct.unpack_from("=H", data)[0]
        if family == socket.AF_INET:
            self.endpoints.add((str(ipaddress.IPv4Address(data[4:8])), struct.unpack_from("!H", data, 2)[0]))
        elif family == socket.AF_INET6 and len(data) >= 24:
            addr = ipaddress.IPv6Address(data[8:24])
            host = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
            self.endpoints.add((host, struct.unpack_from("!H", data, 2)[0]))


def _covered(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _collapse(dirs: set[str]) -> list[str]:
    """Drop dirs below another; three or more siblings become their parent."""
    out = set(dirs)
    changed = True
    while changed:
        changed = False
        parents = Counter(os.path.dirname(d) for d in out if d != "/")
        for parent, n in parents.items():
            if n >= 3 and parent not in ("/", ""):
                out = {d for d in out if os.path.dirname(d) != parent} | {parent}
                changed = True
                break
    return sorted(d for d in out if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in out))


@attrs.frozen(kw_only=True)
class Peaks:
    wall_s: float
    peak_rss: int
    output: int


def generate(rec: TraceRecord, *, base: Policy, workdir: str, cwd: str, peaks: Peaks) -> tuple[Policy, list[str]]:
    """(policy, notes). Notes say what was left out and why."""
    notes = []
    used = {n for n in rec.syscalls if n in _syscalls.X86_64_NAMES}
    dangerous = sorted(used & _syscalls.DANGEROUS)
    if dangerous:
        notes.append("used but left denied (escape-relevant; allow by hand if you must): " + ", ".join(dangerous))
    allow = tuple(sorted(used - _syscalls.DANGEROUS))

    base_paths = base.fs.read_only + base.fs.read_write + (workdir,)

    def absolute(p: str) -> str:
        p = p if p.startswith("/") else os.path.join(cwd, p)
        return os.path.normpath(p)

    def wanted(p: str) -> bool:
        return not _covered(p, base_paths) and not _covered(p, SKIP)

    rw_dirs = set()
    for p in map(absolute, rec.writes):
        if wanted(p) and not _covered(p, ("/tmp", "/dev/shm")):  # written there: the private /tmp serves
            rw_dirs.add(os.path.dirname(p) if not os.path.isdir(p) else p)
    ro_dirs = set()
    for p in map(absolute, rec.reads | rec.execs):
        if wanted(p) and os.path.exists(p) and not _covered(p, tuple(rw_dirs)):
            ro_dirs.add(p if os.path.isdir(p) else os.path.dirname(p))
    rw = _collapse({d for d in rw_dirs if os.path.isdir(d)})
    ro = [d for d in _collapse(ro_dirs) if not _covered(d, tuple(rw))]
    missing = sorted(p for p in map(absolute, rec.reads) if wanted(p) and not os.path.exists(p))
    if missing:
        notes.append(f"{len(missing)} path(s) it looked for did not exist and are not granted (e.g. {missing[0]})")

    if rec.endpoints:
        net = Network(mode="allow", allow=[str(Endpoint(host=h, port=p)) for h, p in sorted(rec.endpoints)])
    else:
        net = Network(mode="none")

    wall = math.ceil(peaks.wall_s * 3 + 1)
    # RLIMIT_AS counts address space (thread stacks, arenas), not RSS: keep the
    # base policy's limit unless the observed peak calls for more.
    mem = max(base.limits.memory or 0, 256 * 1024**2,
              math.ceil(peaks.peak_rss * 4 / (64 * 1024**2)) * 64 * 1024**2)
    limits = attrs.evolve(base.limits, wall_s=wall, memory=mem, output=max(1024**2, peaks.output * 4))
    policy = attrs.evolve(
        base,
        name="traced",
        syscalls=Syscalls(allow=allow),
        fs=Filesystem(read_only=base.fs.read_only + tuple(ro), read_write=base.fs.read_write + tuple(rw),
                      tmp_size=base.fs.tmp_size),
        net=net,
        limits=limits,
    )
    return policy, notes


def permissive_names() -> frozenset[str]:
    """Everything a traced program may call: all known syscalls but the
    dangerous ones (which stay denied, and reported, even while tracing)."""
    from ._syscall_table import LIBSECCOMP_MAX_KNOWN, X86_64

    return frozenset(n for n, nr in X86_64.items() if nr <= LIBSECCOMP_MAX_KNOWN) - _syscalls.DANGEROUS


_ = Limits  # re-exported for readers: the limits part of a generated policy is a zviz.Limits
