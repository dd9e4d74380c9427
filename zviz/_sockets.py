"""The sockets of a sandbox in the blank network namespace, made by its
supervisor (zviz/_netns.py).

Such a sandbox's filter makes no socket in-kernel: socket() and socketpair()
are notified. What the policy lets it make (`_argrules.MADE_SOCKETS`: what
the filter would allow in-kernel with a namespace of its own) is made here,
in the sandbox's own network namespace, made at its first socket, and
installed in the calling task (SECCOMP_IOCTL_NOTIF_ADDFD); any other call
goes to the decision table (refused and reported, as before). Nothing is
CONTINUEd and nothing read from the sandbox decides anything: the call's
registers say what to make, and a socketpair's two numbers are *written* to
the caller's memory.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence

from . import _argrules, _kernel, _netns, _stage
from ._kernel import OwnedFd

_PAIR = struct.Struct("=ii")
# At most this many live sockets in a sandbox's own namespace (the pump's cap too, zviz/_pump.h): made by
# the host, their kernel memory is charged to the host's memory cgroup, not the sandbox's (~2.3 KB each).
MAX_LIVE: int = _stage.MAX_LIVE_SOCKETS
TOO_MANY = (f"the blank network namespace: zviz makes at most {MAX_LIVE} live sockets per sandbox (their "
            "memory is the host's): close some, or use Namespaces(lazy_net=False) (docs/policy.md)")


class TooMany(OSError):
    """Over MAX_LIVE: refused with ENOBUFS, and an event that says why."""


def _int(v: int) -> int:
    """A register as the kernel's `int` parameter reads it (its low 32 bits, signed)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


class Sockets:
    """One sandbox's: `allowed` is which of socket and socketpair its policy allows."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self._rules = {k: v for k, v in _argrules.MADE_SOCKETS.items() if k in allowed}
        self._netns: OwnedFd | None = None
        self.made = 0  # sockets made (a pair counts two)
        self._live = 0  # at least how many live sockets its namespace holds (recounted near the cap)
        # a pump makes them (zviz/_pump.c): what reaches Python then is over the pump's count, or made
        # past Python's: count afresh each time
        self.pumped = False

    def wants(self, name: str, args: Sequence[int]) -> bool:
        rule = self._rules.get(name)
        return rule is not None and _argrules.holds(rule, args)

    @property
    def netns(self) -> int:
        """The sandbox's own namespace (made at its first socket), or -1."""
        return -1 if self._netns is None else self._netns.fd

    @property
    def pump_allow(self) -> int:
        """For the pump (zviz/_pump.c), which makes them from then on: 1 socket, 2 socketpair."""
        return ("socket" in self._rules) | ("socketpair" in self._rules) << 1

    def make(self, name: str, args: Sequence[int]) -> tuple[int, ...]:
        """The host's fds of the socket or pair that the call asks for (the
        caller closes them once installed). Raises OSError with the errno to
        answer (the kernel's, for a bad type or protocol)."""
        if self._netns is None:
            self._netns = OwnedFd(_netns.private(), "sandbox-netns")
        family, kind, protocol = _int(args[0]), _int(args[1]), _int(args[2])
        need = 1 if name == "socket" else 2
        if self.pumped or self._live + need > MAX_LIVE:
            self._live = _stage.count_sockets_in(self._netns.fd)
            if self._live + need > MAX_LIVE:
                raise TooMany(errno.ENOBUFS, TOO_MANY)
        self._live += need
        if name == "socket":
            out: tuple[int, ...] = (_netns.socket_in(self._netns.fd, family, kind, protocol),)
        else:
            out = _netns.socketpair_in(self._netns.fd, family, kind, protocol)
        self.made += len(out)
        return out

    def close(self) -> None:
        if self._netns is not None:
            self._netns.close()


def install(listener: OwnedFd, nid: int, fd: int, *, cloexec: bool) -> int | None:
    """A socket() call's answer: the number `fd` got in the caller, an OSError
    for its own limits, None when the caller is gone."""
    return _kernel.notif_addfd_new(listener, nid, fd, cloexec=cloexec)


def install_pair(listener: OwnedFd, nid: int, tid: int, fds: tuple[int, ...], addr: int, *,
                 cloexec: bool) -> int | None:
    """A socketpair() call's, in a worker thread (writing to the caller's
    memory may wait on its locks): 0 once both are installed and their numbers
    written at `addr`, else the errno to answer; None when the caller is gone.
    /proc/TID/mem is opened first and the notification checked pending after:
    the file is then the caller's memory, never a process that took its tid
    since. The address is tried (with -1s) before anything is installed, so a
    bad one costs the caller nothing (EFAULT, as from the kernel). Closes
    `fds` (the host's copies) whatever happens."""
    try:
        return _install_pair(listener, nid, tid, fds, addr, cloexec=cloexec)
    finally:
        for fd in fds:
            os.close(fd)


def _install_pair(listener: OwnedFd, nid: int, tid: int, fds: tuple[int, ...], addr: int, *,
                  cloexec: bool) -> int | None:
    try:
        mem = os.open(f"/proc/{tid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return None if not _kernel.notif_id_valid(listener, nid) else errno.EFAULT
    try:
        try:
            maps = open(f"/proc/{tid}/maps", "rb")  # noqa: SIM115 - closed below
        except OSError:  # (its thread is gone since mem was opened: another thread ended its process)
            return None if not _kernel.notif_id_valid(listener, nid) else errno.EFAULT
        with maps:
            if not _kernel.notif_id_valid(listener, nid):
                return None
            try:
                text = maps.read()
            except OSError:  # (ESRCH: gone since; answered EFAULT, which nobody may be left to read)
                text = b""
            # /proc/PID/mem writes what the task could not (a read-only private page, copied on
            # write): the kernel's socketpair would fail there, so does this
            if not _writable(text, addr, _PAIR.size) or not _write(mem, _PAIR.pack(-1, -1), addr):
                return errno.EFAULT
        nums = []
        for fd in fds:
            try:
                num = install(listener, nid, fd, cloexec=cloexec)
            except OSError as e:  # (EMFILE on the second: the first stays the caller's, as a dup would)
                return e.errno or errno.EMFILE
            if num is None:
                return None
            nums.append(num)
        # (another thread of the caller could unmap it meanwhile: its two fds are then its own to find)
        return 0 if _write(mem, _PAIR.pack(*nums), addr) else errno.EFAULT
    finally:
        os.close(mem)


def _writable(maps: bytes, addr: int, size: int) -> bool:
    """Whether [addr, addr+size) lies in writable mappings of this /proc/PID/maps text."""
    end = addr + size
    for line in maps.splitlines():
        span, perms = line.split(b" ", 2)[:2]
        lo, hi = (int(x, 16) for x in span.split(b"-"))
        if lo <= addr < hi:
            if perms[1:2] != b"w":
                return False
            if end <= hi:
                return True
            addr = hi  # (the rest must be in the next mapping, adjacent)
    return False


def _write(mem: int, data: bytes, addr: int) -> bool:
    try:
        return os.pwrite(mem, data, addr) == len(data)
    except (OSError, OverflowError, ValueError):
        return False
