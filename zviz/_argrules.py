"""Argument rules: which allowed syscalls pass only with certain register values (pure data).

The filter (`_bpf.py`) compiles these; the decision table (`_decide.py`) uses
them to answer and report a call the filter refused. No I/O, no libseccomp.

seccomp sees the six argument registers as 64-bit values, never memory. The
kernel then truncates most arguments to their C type (an `int` keeps the low
32 bits, a `umode_t` the low 16) whatever the high bits hold, so a check on
the full register can be fooled: `fcntl(fd, 0x1_00000400)` is F_SETLEASE to
the kernel but not equal to 1024 to a 64-bit comparison. Every rule here is
one of two shapes, written so that garbage in bits the kernel drops can never
turn a refused call into an allowed one:

- *bits clear*: `(arg & mask) == 0` with `mask` inside the bits the kernel
  reads (MSG_OOB, the set-id mode bits...): the high bits are ignored, as the
  kernel ignores them;
- *any value but these*: libseccomp 2.5 cannot compare one argument twice in
  one rule (EINVAL), cannot negate a masked comparison, and an unconditional
  allow swallows any refusal added beside it (measured: the conditional
  ERRNO rule is dropped). So the complement is spelled out as a union of
  masked equalities ("cubes") over the bits the kernel reads; the bits above
  them are either ignored (the value is refused whatever they hold) or must be
  zero (fail closed: no program passes garbage there; a refusal is reported).

A rule is a tuple of alternatives (the call passes if any holds); an
alternative is a tuple of conditions `(arg, mask, value)`, all of which must
hold: `(args[arg] & mask) == value`, on distinct arguments.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable, Sequence

import attrs

from . import _linux

Cond = tuple[int, int, int]  # (argument index, mask, value): (args[i] & mask) == value
Alternative = tuple[Cond, ...]
FULL = 0xFFFFFFFFFFFFFFFF

# uapi values (x86_64), checked on the kernel the tests run on
SETID_BITS = 0o6000  # S_ISUID | S_ISGID
S_IFMT, S_IFREG, S_IFIFO = 0o170000, 0o100000, 0o010000
O_CREAT, O_TMPFILE_BIT = 0o100, 0o20000000  # __O_TMPFILE: the mode is used with either
O_NOTIFICATION_PIPE = 0o200  # == O_EXCL, meaningful to pipe2 only
MSG_OOB, MSG_FASTOPEN = 0x1, 0x20000000
F_SETLEASE, F_NOTIFY = 1024, 1026
PAGEMAP_SCAN, PROCMAP_QUERY = 0xC0606610, 0xC0686611  # _IOWR('f', 16/17, ...) on /proc/PID/{pagemap,maps}
SCHED_OTHER, SCHED_BATCH, SCHED_IDLE = 0, 3, 5
PID_BITS = 22  # PID_MAX_LIMIT is 4M on 64-bit: no task id is wider


@attrs.frozen
class Check:
    """One refusal: `syscall` passes only if one of `allow` holds; otherwise
    the supervisor answers `errno` and reports `why`."""

    syscall: str
    allow: tuple[Alternative, ...]
    errno: int
    why: str


def bits_clear(arg: int, mask: int) -> tuple[Alternative, ...]:
    return (((arg, mask, 0),),)


def values_except(arg: int, refused: Iterable[int], bits: int, *, high_zero: bool) -> tuple[Alternative, ...]:
    """Cubes covering every value of the low `bits` bits except `refused`.
    Above them: ignored (`high_zero=False`: refused whatever they hold) or
    required zero (`high_zero=True`)."""
    low = (1 << bits) - 1
    high = (FULL & ~low) if high_zero else 0
    out: list[Alternative] = []

    def cover(points: frozenset[int], free: int, mask: int, value: int) -> None:
        if not points:
            out.append(((arg, mask | high, value),))
            return
        if len(points) == 1 << free.bit_count():
            return  # the whole sub-cube is refused
        p0 = next(iter(points))
        agree = [1 << b for b in range(bits - 1, -1, -1)
                 if free & (1 << b) and all((p & (1 << b)) == (p0 & (1 << b)) for p in points)]
        for b in agree:  # the points all share this bit: the other half is allowed
            out.append(((arg, mask | b | high, value | (~p0 & b)),))
        for b in agree:
            mask, value, free = mask | b, value | (p0 & b), free & ~b
        if free and len(points) > 1:
            b = 1 << (free.bit_length() - 1)
            for side in (0, b):
                cover(frozenset(p for p in points if p & b == side), free & ~b, mask | b, value | side)

    cover(frozenset(v & low for v in refused), low, 0, 0)
    return tuple(out)


def equals(arg: int, values: Iterable[int]) -> tuple[Alternative, ...]:
    """The full 64-bit register equals one of `values` (garbage high bits fail closed)."""
    return tuple(((arg, FULL, v),) for v in values)


def conjoin(*rules: tuple[Alternative, ...]) -> tuple[Alternative, ...]:
    """All of `rules` hold: the product of their alternatives, conditions on one
    argument merged into one cube (contradictory pairs dropped)."""
    out: list[Alternative] = []
    for combo in itertools.product(*rules):
        merged: dict[int, tuple[int, int]] = {}
        ok = True
        for arg, mask, value in itertools.chain.from_iterable(combo):
            if arg in merged:
                m, v = merged[arg]
                if (v & mask) != (value & m):
                    ok = False
                    break
                merged[arg] = (m | mask, v | value)
            else:
                merged[arg] = (mask, value)
        if ok:
            out.append(tuple((a, m, v) for a, (m, v) in sorted(merged.items())))
    return tuple(out)


def holds(alternatives: Sequence[Alternative], args: Sequence[int]) -> bool:
    return any(all((args[a] & m) == v for a, m, v in alt) for alt in alternatives)


_SETID = "set-uid/set-gid bits (inert inside, not on the host)"
_NO_SETID_CREATE = (((1, O_CREAT | O_TMPFILE_BIT, 0),), ((2, SETID_BITS, 0),))
_MKNOD_TYPES = tuple(((1, S_IFMT | SETID_BITS, t),) for t in (0, S_IFREG, S_IFIFO))

# Refusals that hold in every sandbox, whatever its network mode.
HARDENING: tuple[Check, ...] = (
    # set-id bits on a file the host can see (the workdir): by mode change...
    Check("chmod", bits_clear(1, SETID_BITS), errno.EPERM, _SETID),
    Check("fchmod", bits_clear(1, SETID_BITS), errno.EPERM, _SETID),
    Check("fchmodat", bits_clear(2, SETID_BITS), errno.EPERM, _SETID),
    Check("fchmodat2", bits_clear(2, SETID_BITS), errno.EPERM, _SETID),
    # ... or at creation: the kernel keeps S_ISUID/S_ISGID of open(O_CREAT)'s
    # mode (umask clears 0777 bits only; S_ISGID is stripped only in a set-gid
    # directory for a non-member). The mode is read only with O_CREAT or
    # O_TMPFILE: other opens pass on their flags.
    Check("open", _NO_SETID_CREATE, errno.EPERM, _SETID),
    Check("openat", tuple(tuple((a + 1, m, v) for a, m, v in alt) for alt in _NO_SETID_CREATE), errno.EPERM, _SETID),
    Check("creat", bits_clear(1, SETID_BITS), errno.EPERM, _SETID),
    # mknod: regular files and FIFOs (make's jobserver, mkfifo), no set-id
    # bits; no socket inodes (bind() makes real ones), devices (the kernel
    # refuses them anyway: no CAP_MKNOD)
    Check("mknod", _MKNOD_TYPES, errno.EPERM, "file type or set-id bits"),
    Check("mknodat", tuple(((2, m, v),) for ((_, m, v),) in _MKNOD_TYPES), errno.EPERM, "file type or set-id bits"),
    # MSG_OOB: unix-socket out-of-band data (CVE-2025-38236, a use-after-free
    # used to escape a browser sandbox); answered like a kernel built without it
    *(Check(name, bits_clear(arg, MSG_OOB), errno.EOPNOTSUPP, "MSG_OOB")
      for name, arg in (("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3),
                        ("recvfrom", 3), ("recvmsg", 2), ("recvmmsg", 3))),
    # notification pipes (watch_queue); answered like a kernel without them
    Check("pipe2", bits_clear(1, O_NOTIFICATION_PIPE), errno.ENOPKG, "O_NOTIFICATION_PIPE"),
    # leases (a lease on a workdir file blocks the host's reads) and dnotify
    # (fsnotify while inotify is not offered); cmd is an unsigned int < 2048
    Check("fcntl", values_except(1, (F_SETLEASE, F_NOTIFY), 11, high_zero=True), errno.EINVAL,
          "F_SETLEASE/F_NOTIFY"),
    # procfs page-table walkers, by number (seccomp cannot see the fd's type):
    # 'f' 16 and 17 in every direction and size (also ext4's admin-only
    # RESIZE_FS and SWAP_BOOT, which the sandbox cannot use anyway)
    Check("ioctl", values_except(1, (PAGEMAP_SCAN, PROCMAP_QUERY), 16, high_zero=False), errno.ENOTTY,
          "PAGEMAP_SCAN/PROCMAP_QUERY"),
)
_BY_NAME: dict[str, tuple[Check, ...]] = {}
for _c in HARDENING:
    _BY_NAME[_c.syscall] = (*_BY_NAME.get(_c.syscall, ()), _c)

# Calls that may act on another process, allowed only on the caller itself
# (sched_setscheduler: and only to a policy that needs no privilege):
# every process of a sandbox has the same uid, so the kernel's owner checks
# would let a command lower the limits, the priority or the scheduling class
# of the sandbox's zygote (pid 1) and of its other commands. setpriority:
# which == PRIO_PROCESS and who == 0 (PRIO_PGRP and PRIO_USER with who 0 reach
# the zygote's group and uid); ioprio_set: IOPRIO_WHO_PROCESS and 0.
# sched_setaffinity stays open (pthread_setaffinity_np passes thread ids):
# zviz-init resets the affinity it hands on instead.
SELF_ONLY: dict[str, tuple[Alternative, ...]] = {
    "prlimit64": equals(0, (0,)),
    "setpriority": (((0, FULL, 0), (1, FULL, 0)),),
    "sched_setscheduler": conjoin(equals(0, (0,)), equals(1, (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE))),
    "sched_setparam": equals(0, (0,)),
    "sched_setattr": equals(0, (0,)),
    "ioprio_set": (((0, FULL, 1), (1, FULL, 0)),),
}

# pthread_setschedparam(thread, policy, param) is sched_setscheduler(tid, ...)
# (libzmq calls it on its own threads with SCHED_OTHER). seccomp cannot tell a
# thread of the caller from another task of the same uid, so in a sandbox with
# its own pid namespace this lets any task other than pid 1 (the zygote) be
# given a policy that needs no privilege: SCHED_OTHER, SCHED_BATCH, SCHED_IDLE
# (their only priority is 0: the kernel refuses any other, so the sched_param
# in memory needs no check). What remains: a command can demote another
# command of its own sandbox to SCHED_BATCH/IDLE (same uid; Landlock does not
# scope scheduling). Without a pid namespace the ids are the host's: self only.
OTHER_TASK_SCHED: tuple[Alternative, ...] = conjoin(
    values_except(0, (0, 1), PID_BITS, high_zero=True), equals(1, (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE)))


# net.mode = "allow": the sandbox's connected sockets are the supervisor's,
# made in the host's network namespace. Options that route a connection's
# packets elsewhere are refused on every socket: IP_OPTIONS (LSRR/SSRR source
# routes) and the IPv6 routing, hop-by-hop and destination option headers
# (IPV6_RTHDR is settable without privilege: a segment-routing header sent
# the SYN to an address of the sandbox's choosing). Levels SOL_SOCKET and TCP
# pass whole; any other level is refused. Level and name are ints: only
# their low 32 bits are compared (the kernel ignores the rest).
SOL_SOCKET, IPPROTO_IP, IPPROTO_TCP, IPPROTO_IPV6 = 1, 0, 6, 41
IP_OPTIONS = 4
# IPV6_2292HOPOPTS, _2292DSTOPTS, _2292RTHDR, _2292PKTOPTIONS, IPV6_HOPOPTS,
# IPV6_RTHDRDSTOPTS, IPV6_RTHDR, IPV6_DSTOPTS
IPV6_ROUTING = (3, 4, 5, 6, 54, 55, 57, 59)
_U32 = 0xFFFFFFFF
ROUTING_OPTIONS: tuple[Alternative, ...] = (
    ((1, _U32, SOL_SOCKET),),
    ((1, _U32, IPPROTO_TCP),),
    *conjoin((((1, _U32, IPPROTO_IP),),), values_except(2, (IP_OPTIONS,), 32, high_zero=False)),
    *conjoin((((1, _U32, IPPROTO_IPV6),),), values_except(2, IPV6_ROUTING, 32, high_zero=False)),
)

# Where the sandbox holds sockets of the host's network (net.mode = "allow",
# the supervised way of "domains", and "direct"): network device ioctls on
# such a socket (SIOCGIFCONF, SIOCGIFNAME, SIOCGIFHWADDR, ethtool, ...: 0x8910
# to 0x8fff) would describe the host's interfaces, addresses and hardware. They
# are refused on every socket there (seccomp cannot see which fd is the host's;
# getifaddrs() asks netlink, which sees the sandbox's own namespace). Compared
# on the low 16 bits, as the page-table ioctls are (stricter than the kernel).
NET_DEVICE_IOCTLS = range(0x8910, 0x9000)
NET_DEVICE_IOCTL = Check("ioctl", values_except(1, (PAGEMAP_SCAN, PROCMAP_QUERY, *NET_DEVICE_IOCTLS), 16,
                                                high_zero=False), errno.EACCES,
                         "a network device ioctl, refused where the sandbox holds sockets of the host's network (they "
                         "would describe the host's interfaces); getifaddrs() (netlink) shows the sandbox's own")

# net.mode = "domains", way "direct": connect() is the kernel's unless its
# addrlen (a socklen_t: the low 32 bits) is that of sockaddr_in (16) or
# sockaddr_in6 (28), which the pump performs (zviz/_pump.c). A TCP connect
# spelled with another length meets Landlock, which grants the sandbox no TCP
# connect of its own (a host socket it was handed cannot be pointed elsewhere).
DIRECT_CONNECT_IN_KERNEL: tuple[Alternative, ...] = values_except(2, (16, 28), 32, high_zero=False)

# socket(AF_NETLINK, SOCK_RAW or SOCK_DGRAM, NETLINK_ROUTE), only in a sandbox
# with a network namespace of its own (`_bpf.FilterSpec.netns`): getifaddrs()
# and if_nameindex() ask rtnetlink for the interfaces (libzmq aborts without
# them). In that namespace there is only `lo`, and every RTM_NEW*/RTM_DEL*/
# RTM_SET* request needs CAP_NET_ADMIN over the user namespace that owns it:
# the sandbox's own (or the host's, for root without one), where its uid has
# no capability (it execs as a non-root uid, with no_new_privs). What is left
# is reading its own loopback's state and its events. Without a namespace of
# its own it would read the host's interfaces, addresses and routes: refused.
# Other netlink protocols (sock_diag, audit, uevents, xfrm, ...) and netlink
# socketpairs stay refused. The type may carry SOCK_NONBLOCK/SOCK_CLOEXEC (the
# kernel refuses any other flag) and nothing above its 32 bits (fail closed);
# family and protocol are compared whole.
AF_NETLINK, NETLINK_ROUTE = 16, 0
SOCK_DGRAM, SOCK_RAW = 2, 3
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
ROUTE_SOCKET: tuple[Alternative, ...] = conjoin(
    equals(0, (AF_NETLINK,)),
    tuple(((1, FULL & ~(SOCK_NONBLOCK | SOCK_CLOEXEC), t),) for t in (SOCK_DGRAM, SOCK_RAW)),
    equals(2, (NETLINK_ROUTE,)))

# The blank network namespace (zviz/_netns.py): the filter makes no socket
# in-kernel, and the supervisor makes exactly what the rules above let a
# sandbox with a namespace of its own make (_bpf.compile_filter): a unix
# socket or pair of any type (the kernel checks the type when it makes it),
# a NETLINK_ROUTE socket; the family compared whole.
AF_UNIX = 1
UNIX_SOCKET: tuple[Alternative, ...] = equals(0, (AF_UNIX,))
MADE_SOCKETS: dict[str, tuple[Alternative, ...]] = {"socket": UNIX_SOCKET + ROUTE_SOCKET, "socketpair": UNIX_SOCKET}


# zviz-init enters each command's own Landlock domain from the ruleset the
# stage left on COMMAND_RULESET_FD: that call exactly, with a zygote only
# (_bpf.ZYGOTE_NEEDS). Landlock only ever restricts the caller; any other use
# is refused and reported as before (docs/security-model.md).
COMMAND_DOMAIN: tuple[Alternative, ...] = conjoin(equals(0, (_linux.COMMAND_RULESET_FD,)), equals(1, (0,)))


def rules(*, net_mode: str, pid_ns: bool) -> dict[str, tuple[Alternative, ...]]:
    """syscall -> the alternatives under which it passes, for the calls that
    carry argument conditions (other than socket, socketpair, clone and
    connect, which `_bpf` spells by network mode)."""
    out: dict[str, tuple[Alternative, ...]] = dict(SELF_ONLY)
    out["landlock_restrict_self"] = COMMAND_DOMAIN
    if pid_ns:
        out["sched_setscheduler"] = out["sched_setscheduler"] + OTHER_TASK_SCHED
    for name, checks in _BY_NAME.items():
        out[name] = conjoin(*(c.allow for c in checks))
    if net_mode in ("allow", "domains", "direct"):  # TCP Fast Open connects inside sendto/sendmsg: keep it away
        for name, arg in (("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)):
            out[name] = conjoin(out[name], bits_clear(arg, MSG_FASTOPEN))
        out["setsockopt"] = ROUTING_OPTIONS
    if net_mode in ("allow", "direct"):  # (its host sockets: no device ioctls; the page-table ones stay refused)
        out["ioctl"] = NET_DEVICE_IOCTL.allow
    return out


# A call on another task (or sched_setscheduler to a privileged policy) that
# reached the supervisor: "not permitted", as the kernel says to a task
# without the privilege. The caller's own limits stay ENOSYS when the call is
# not allowed at all (glibc falls back from prlimit64 on ENOSYS only).
OTHER_TASK = Check("*", (), errno.EPERM, "another task, or a privileged scheduling policy")


def refusal(name: str, args: Sequence[int]) -> Check | None:
    """The check `args` fail, if any (the supervisor's answer)."""
    for check in _BY_NAME.get(name, ()):
        if not holds(check.allow, args):
            return check
    if name in SELF_ONLY and not holds(SELF_ONLY[name], args):
        return OTHER_TASK
    return None
