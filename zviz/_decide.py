"""The user-notification decision table. Pure: no I/O, no trio, no ctypes.

Rules, in order (the table is `decide()`; the answers are data):
1. A notification from another architecture cannot reach us (the filter kills
   it in-kernel); if one ever does, it is denied (EPERM).
2. `connect` under a host:port allowlist: the supervisor reads the sockaddr,
   and if the endpoint is listed it **performs** the connect itself on a
   duplicate of the socket (`PerformConnect`) and returns that result. A
   decision that read the child's memory is never answered with CONTINUE: a
   thread of the child could rewrite the sockaddr between our read and the
   kernel's. There is no `Continue` answer in this module at all.
3. Allowed syscalls refused for an argument (set-id modes, MSG_OOB, leases...,
   see `_argrules.py`): the errno that rule names; socket families the
   network policy does not grant: EACCES.
   Dangerous syscalls (ptrace, mount, bpf, ...): `Deny(EPERM)`, recorded as an
   event with decoded arguments.
4. Anything else that reached us is outside the allowlist: `Deny(ENOSYS)`, so
   programs take their "kernel too old" fallback; recorded too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Mapping, Sequence

import attrs

from . import _argrules, _syscalls
from ._syscall_table import BY_NUMBER

AUDIT_ARCH_X86_64 = 0xC000003E


@attrs.frozen
class Deny:
    errno: int


@attrs.frozen
class PerformConnect:
    """Connect a duplicate of the child's socket `fd` to (family, host, port)."""

    fd: int
    family: int
    host: str
    port: int
    proxied: bool = False  # to the egress proxy (net.mode = "domains"): the address is the proxy's own


@attrs.frozen
class ReadSockaddr:
    """Needs the sockaddr at `addr` (`size` bytes) from the child's memory."""

    addr: int
    size: int


Answer = Deny | PerformConnect


@attrs.frozen
class Decoded:
    """A notification, named and with its arguments decoded (for events)."""

    name: str
    nr: int
    args: tuple[int, ...]
    detail: str


UNKNOWN = "syscall_unknown"
DETAIL_MAX = 512  # characters of an event's detail: per-sandbox tables stay bounded


COUNTER_KEYS_MAX = 1024  # above the table's ~470 names: a backstop, never reached by names from the table


def counter_key(counter: Mapping[str, int], name: str) -> str:
    """The key to count `name` under in a per-sandbox table: itself, or the
    unknown bucket once the table holds COUNTER_KEYS_MAX keys."""
    return name if name in counter or len(counter) < COUNTER_KEYS_MAX else UNKNOWN


def syscall_name(nr: int) -> str:
    """The name, or one bucket for every number outside the x86_64 table: a
    sandbox can make 2**30 distinct numbers, and each name is a counter key
    (the number itself stays in the event)."""
    return BY_NUMBER.get(nr, UNKNOWN)


_PTRACE_REQ = {0: "TRACEME", 16: "ATTACH", 0x4206: "SEIZE", 4: "POKETEXT", 5: "POKEDATA"}
_CLONE_FLAGS = {0x10000000: "CLONE_NEWUSER", 0x20000000: "CLONE_NEWPID", 0x00020000: "CLONE_NEWNS",
                0x40000000: "CLONE_NEWNET", 0x08000000: "CLONE_NEWIPC", 0x04000000: "CLONE_NEWUTS",
                0x02000000: "CLONE_NEWCGROUP", 0x80: "CLONE_NEWTIME"}
_MSG = {0x1: "MSG_OOB", 0x2: "MSG_PEEK", 0x40: "MSG_DONTWAIT", 0x20000000: "MSG_FASTOPEN"}
_FCNTL = {_argrules.F_SETLEASE: "F_SETLEASE", _argrules.F_NOTIFY: "F_NOTIFY"}
_IOCTL = {_argrules.PAGEMAP_SCAN: "PAGEMAP_SCAN", _argrules.PROCMAP_QUERY: "PROCMAP_QUERY"}
_SCHED = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE", 6: "SCHED_DEADLINE"}


def _fd(v: int) -> str:
    return str(_s32(v))


# name -> (label, argument index, how to show it) for the calls whose
# arguments are refused by value (what the event shows; the rules are _argrules')
_ARGS = {
    **dict.fromkeys(("chmod", "creat", "mknod"), (("mode", 1, oct),)),
    "fchmod": (("fd", 0, _fd), ("mode", 1, oct)),
    **dict.fromkeys(("fchmodat", "fchmodat2", "mknodat"), (("mode", 2, oct),)),
    "open": (("flags", 1, oct), ("mode", 2, oct)),
    "openat": (("flags", 2, oct), ("mode", 3, oct)),
    **{n: (("fd", 0, _fd), ("flags", 3, lambda v: _flags(v, _MSG))) for n in ("sendto", "recvfrom", "sendmmsg",
                                                                             "recvmmsg")},
    **{n: (("fd", 0, _fd), ("flags", 2, lambda v: _flags(v, _MSG))) for n in ("sendmsg", "recvmsg")},
    "pipe2": (("flags", 1, oct),),
    "fcntl": (("fd", 0, _fd), ("cmd", 1, lambda v: _FCNTL.get(v, hex(v)))),
    "ioctl": (("fd", 0, _fd), ("request", 1, lambda v: _IOCTL.get(v & 0xFFFFFFFF, hex(v)))),
    "sched_setscheduler": (("pid", 0, lambda v: hex(v) if v >> 32 else str(v)),
                           ("policy", 1, lambda v: _SCHED.get(v, hex(v)))),
}
_AF = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET", 3: "AF_AX25",
       4: "AF_IPX", 5: "AF_APPLETALK", 38: "AF_ALG", 40: "AF_VSOCK", 44: "AF_XDP"}


def _flags(value: int, names: dict[int, str]) -> str:
    got = [n for bit, n in names.items() if value & bit]
    return "|".join(got) if got else hex(value)


def decode(nr: int, args: Sequence[int], strings: Mapping[int, str | None] | None = None) -> Decoded:
    """Name the syscall and render its arguments. `strings` holds C strings
    already read from the child (arg index -> text), for path arguments."""
    name = syscall_name(nr)
    args = tuple(a & 0xFFFFFFFFFFFFFFFF for a in args)
    s = strings or {}
    if name == "ptrace":
        detail = f"request={_PTRACE_REQ.get(args[0], args[0])}, pid={_s32(args[1])}"
    elif name in ("unshare", "clone", "setns"):
        detail = f"flags={_flags(args[0] if name != 'setns' else args[1], _CLONE_FLAGS)}"
    elif name in ("socket", "socketpair"):
        detail = f"family={_AF.get(args[0] & 0xFFFFFFFF, args[0])}, type={args[1] & 0xF}"
    elif name in _ARGS:
        detail = ", ".join(f"{label}={show(args[i])}" for label, i, show in _ARGS[name])
    elif name == UNKNOWN:
        detail = f"nr={nr}, " + ", ".join(hex(a) for a in args[:3])
    elif name == "mount":
        detail = f"source={s.get(0)!r}, target={s.get(1)!r}, fstype={s.get(2)!r}"
    elif name in ("chroot", "umount2", "pivot_root", "swapon", "acct"):
        detail = f"path={s.get(0)!r}"
    elif name in ("kill", "tkill"):
        detail = f"pid={_s32(args[0])}, sig={args[1]}"
    elif name == "bpf":
        detail = f"cmd={args[0]}"
    elif name == "personality":
        detail = f"persona={hex(args[0])}"
    elif name == "perf_event_open":
        detail = f"pid={_s32(args[1])}, cpu={_s32(args[2])}"
    elif name in ("process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp"):
        detail = f"pid={_s32(args[0])}"
    elif name == "keyctl":
        detail = f"op={args[0]}"
    elif name == "connect":
        detail = f"fd={_s32(args[0])}"
    else:
        detail = ", ".join(hex(a) for a in args[:3])
    return Decoded(name=name, nr=nr, args=args, detail=detail[:DETAIL_MAX])


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def decide(nr: int, arch: int, args: Sequence[int], *, net_allow: bool) -> Answer | ReadSockaddr:
    """First half of a decision: either a final answer, or a request to read
    the sockaddr (then call `decide_connect`)."""
    if arch != AUDIT_ARCH_X86_64:
        return Deny(errno.EPERM)
    name = syscall_name(nr)
    if name == "connect" and net_allow:
        addrlen = args[2] & 0xFFFFFFFF
        if addrlen < 2 or addrlen > 128:
            return Deny(errno.EINVAL)
        return ReadSockaddr(addr=args[1], size=addrlen)
    check = _argrules.refusal(name, args)
    if check is not None:
        return Deny(check.errno)
    if net_allow and name == "ioctl" and (args[1] & 0xFFFF) in _argrules.NET_DEVICE_IOCTLS:
        return Deny(_argrules.NET_DEVICE_IOCTL.errno)
    if name in _syscalls.DANGEROUS:
        return Deny(errno.EPERM)
    if name in ("socket", "socketpair"):
        return Deny(errno.EACCES)  # a family the network policy does not grant
    if name in _NETWORK:
        return Deny(errno.EACCES)
    return Deny(errno.ENOSYS)


_NETWORK = frozenset({"connect", "bind", "listen", "sendto", "sendmsg", "sendmmsg", "setsockopt"})


def parse_sockaddr(data: bytes) -> tuple[int, str, int] | None:
    """(family, host, port) for AF_INET/AF_INET6, None for anything else."""
    if len(data) < 2:
        return None
    family = struct.unpack_from("=H", data)[0]
    if family == socket.AF_INET and len(data) >= 8:
        port = struct.unpack_from("!H", data, 2)[0]
        return family, str(ipaddress.IPv4Address(data[4:8])), port
    if family == socket.AF_INET6 and len(data) >= 24:
        port = struct.unpack_from("!H", data, 2)[0]
        addr = ipaddress.IPv6Address(data[8:24])
        host = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
        return family, host, port
    return None


def decide_connect(fd: int, sockaddr: bytes, allowed: frozenset[tuple[str, int]],
                   proxy: tuple[frozenset[tuple[str, int]], tuple[str, int]] | None = None) -> Answer:
    """Second half for connect: `allowed` holds (ip, port) pairs, hosts already
    resolved by the supervisor when the sandbox opened. `proxy` (net.mode =
    "domains"): (the addresses the sandbox knows the egress proxy by, the
    proxy's real address): a connect to one of the former is performed to
    the latter; every other connect is refused."""
    parsed = parse_sockaddr(sockaddr)
    if parsed is None:
        # AF_UNIX and friends under an allowlist: the path would be resolved in
        # the supervisor's view of the filesystem, outside Landlock. Refuse.
        return Deny(errno.EACCES)
    family, host, port = parsed
    if proxy is not None:
        inside, (real_host, real_port) = proxy
        if (host, port) in inside:
            return PerformConnect(fd=fd, family=family, host=real_host, port=real_port, proxied=True)
        return Deny(errno.EACCES)
    if (host, port) in allowed:
        return PerformConnect(fd=fd, family=family, host=host, port=port)
    return Deny(errno.ECONNREFUSED if port == 0 else errno.EACCES)
