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
3. Dangerous syscalls (ptrace, mount, bpf, ...): `Deny(EPERM)`, recorded as an
   event with decoded arguments.
4. Anything else that reached us is outside the allowlist: `Deny(ENOSYS)`, so
   programs take their "kernel too old" fallback; recorded too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence

import attrs

from . import _syscalls
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


def syscall_name(nr: int) -> str:
    return BY_NUMBER.get(nr, f"syscall_{nr}")


_PTRACE_REQ = {0: "TRACEME", 16: "ATTACH", 0x4206: "SEIZE", 4: "POKETEXT", 5: "POKEDATA"}
_CLONE_FLAGS = {0x10000000: "CLONE_NEWUSER", 0x20000000: "CLONE_NEWPID", 0x00020000: "CLONE_NEWNS",
                0x40000000: "CLONE_NEWNET", 0x08000000: "CLONE_NEWIPC", 0x04000000: "CLONE_NEWUTS",
                0x02000000: "CLONE_NEWCGROUP", 0x80: "CLONE_NEWTIME"}
_AF = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET", 3: "AF_AX25",
       4: "AF_IPX", 5: "AF_APPLETALK", 38: "AF_ALG", 40: "AF_VSOCK", 44: "AF_XDP"}


def _flags(value: int, names: dict[int, str]) -> str:
    got = [n for bit, n in names.items() if value & bit]
    return "|".join(got) if got else hex(value)


def decode(nr: int, args: Sequence[int], strings: dict[int, str] | None = None) -> Decoded:
    """Name the syscall and render its arguments. `strings` holds C strings
    already read from the child (arg index -> text), for path arguments."""
    name = syscall_name(nr)
    args = tuple(a & 0xFFFFFFFFFFFFFFFF for a in args)
    s = strings or {}
    if name == "ptrace":
        detail = f"request={_PTRACE_REQ.get(args[0], args[0])}, pid={_s32(args[1])}"
    elif name in ("unshare", "clone", "setns"):
        detail = f"flags={_flags(args[0] if name != 'setns' else args[1], _CLONE_FLAGS)}"
    elif name == "socket":
        detail = f"family={_AF.get(args[0] & 0xFFFFFFFF, args[0])}, type={args[1] & 0xF}"
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
    return Decoded(name=name, nr=nr, args=args, detail=detail)


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
    if name in _syscalls.DANGEROUS:
        return Deny(errno.EPERM)
    if name == "socket":
        return Deny(errno.EACCES)  # a family the network policy does not grant
    if name in _NETWORK:
        return Deny(errno.EACCES)
    return Deny(errno.ENOSYS)


_NETWORK = frozenset({"connect", "bind", "sendto", "sendmsg", "sendmmsg"})


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


def decide_connect(fd: int, sockaddr: bytes, allowed: frozenset[tuple[str, int]]) -> Answer:
    """Second half for connect: `allowed` holds (ip, port) pairs, hosts already
    resolved by the supervisor when the sandbox opened."""
    parsed = parse_sockaddr(sockaddr)
    if parsed is None:
        # AF_UNIX and friends under an allowlist: the path would be resolved in
        # the supervisor's view of the filesystem, outside Landlock. Refuse.
        return Deny(errno.EACCES)
    family, host, port = parsed
    if (host, port) in allowed:
        return PerformConnect(fd=fd, family=family, host=host, port=port)
    return Deny(errno.ECONNREFUSED if port == 0 else errno.EACCES)
