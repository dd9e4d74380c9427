"""A listener's notifications, received by a C thread (zviz/_pump.c).

Under `net.mode = "allow"` the thread performs the connects the allowlist
grants itself (~0.05 ms each, against ~0.8 ms through the Python path: the
sockaddr read in a worker thread, a task, a dozen calls) and hands every
other notification to the supervisor unchanged, as a record on a
SOCK_SEQPACKET socket the supervisor's epoll set waits on. The supervisor
(zviz/_supervisor.py) stays the one place that refuses, writes events and
handles the rare cases; the thread performs exactly what
`_decide.decide_connect` would, for the table it is given here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable

import attrs

from . import _kernel, _stage
from ._kernel import OwnedFd

NOTIF, CONNECTED, INPROGRESS, HUP, FAILED = 1, 2, 3, 4, 5
_RECORD = struct.Struct("=iiii80s")  # kind, err, fd, cloexec, struct seccomp_notif (_stage.LAYOUTS["pump_record"])
_ENTRY = struct.Struct("=16s2s")
_INPROGRESS_TAG = struct.pack("=i", INPROGRESS)


@attrs.frozen
class Record:
    kind: int
    err: int
    fd: int  # the child's fd of the connect
    cloexec: bool
    notif: _kernel.Notification | None
    # INPROGRESS: our socket, connecting, and the notifying task's pidfd (the caller's to close)
    sock: OwnedFd | None = None
    pidfd: OwnedFd | None = None


def available() -> bool:
    """The extension has the pump and the kernel's notification record is
    the size the thread was built for."""
    if not hasattr(_stage, "pump_start"):
        return False
    try:
        return _stage.notif_sizes()[0] == _RECORD.size - 16
    except OSError:
        return False


def table(endpoints: Iterable[tuple[str, int]]) -> bytes:
    """The thread's allow table for `endpoints` ((ip, port) pairs as the
    supervisor holds them). An entry goes in only if Python's own comparison
    (`_decide.parse_sockaddr`'s canonical text) can match it, so the thread
    never performs a connect Python would refuse: a non-canonical or
    IPv4-mapped spelling, or a name, is left to Python (which refuses it)."""
    out = []
    for host, port in sorted(endpoints):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if str(ip) != host or not 0 < port < 65536:
            continue
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                continue
            packed = ip.packed
        else:
            packed = ipaddress.IPv6Address("::ffff:" + host).packed
        out.append(_ENTRY.pack(packed, port.to_bytes(2, "big")))
    return b"".join(out)


class Pump:
    """The thread for one listener; `fd` is what to wait on, `records()`
    what it said. close() ends the thread (it holds its own duplicates)."""

    def __init__(self, listener: OwnedFd, endpoints: Iterable[tuple[str, int]]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self._pump: object | None = _stage.pump_start(listener.fd, theirs.fileno(), self._stop)
        except BaseException:
            ours.close()
            os.close(self._stop)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.fd = ours.fileno()
        self.set_table(endpoints)

    def set_table(self, endpoints: Iterable[tuple[str, int]]) -> None:
        if self._pump is not None:
            _stage.pump_set_table(self._pump, table(endpoints))

    def records(self) -> list[Record]:
        """What the thread has said so far (empty when nothing is waiting)."""
        out: list[Record] = []
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _RECORD.size, 2)
            except BlockingIOError:
                return out
            except InterruptedError:
                continue
            owned = [OwnedFd(fd, "pump-handoff") for fd in fds]
            if len(data) != _RECORD.size or (len(owned) != 2) != (data[:4] != _INPROGRESS_TAG):
                for fd in owned:
                    fd.close()
                return [*out, Record(FAILED, errno.EPROTO, -1, False, None)]
            kind, err, fd, cloexec, raw = _RECORD.unpack(data)
            notif = _kernel.notif_decode(raw) if kind in (NOTIF, CONNECTED, INPROGRESS) else None
            sock, pidfd = owned if owned else (None, None)
            out.append(Record(kind, err, fd, bool(cloexec), notif, sock, pidfd))

    def close(self) -> None:
        """End the thread (idempotent). A thread waiting on a sandbox's
        memory ends once that read returns; it frees what it holds then."""
        if self._pump is None:
            return
        os.eventfd_write(self._stop, 1)
        os.close(self._stop)
        self._sock.close()
        self._pump = None  # the capsule lets go of our reference
