"""A listener's notifications, received by a C thread (zviz/_pump.c).

Under `net.mode = "allow"` the thread performs the connects the allowlist
grants itself (~0.05 ms each, against ~0.8 ms through the Python path: the
sockaddr read in a worker thread, a task, a dozen calls) and hands every
other notification to the supervisor unchanged, as a record on a
SOCK_SEQPACKET socket the supervisor's epoll set waits on. The supervisor
(zviz/_supervisor.py) stays the one place that refuses, writes events and
handles the rare cases; the thread performs exactly what
`_decide.decide_connect` would, for the table it is given here.

Direct egress (net.mode = "domains", docs/network.md): the table maps the
sandbox's addresses for allowed names (its DNS answers) to their checked
addresses (`direct_table`); such a connect comes back as a GATED record with
the socket and the capture pair whose first flight `_egressdirect` checks;
any other connect is made inside the sandbox's own network namespace.
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

NOTIF, CONNECTED, INPROGRESS, HUP, FAILED, GATED, GATE_FAILED, CHECKED, CHECK_CUT, DNS = range(1, 11)
ALLOWED, INSIDE = -1, -2  # a CONNECTED record's name: allow mode's, or inside the sandbox's namespace
# kind, err, fd, cloexec, name, port, the gate's key, struct seccomp_notif (_stage.LAYOUTS["pump_record"])
_RECORD = struct.Struct("=iiiiii48s80s")
_ENTRY = struct.Struct("=16s2s16s2si")
_FDS = {INPROGRESS: 2, GATED: 3, CHECKED: 1, CHECK_CUT: 1}  # the fds each kind carries (SCM_RIGHTS)
_DNS_EXTRA = 28 + 513  # a DNS record is followed by its sender's sockaddr and the datagram
_NAME = struct.Struct("=256s4siq")  # zviz/_pump.h: the name, the sandbox's address for it, its id, until (ns)


@attrs.frozen
class Record:
    kind: int
    err: int
    fd: int  # the child's fd of the connect
    cloexec: bool
    notif: _kernel.Notification | None
    name: int = ALLOWED  # direct egress: the name's id (GATED, a gated INPROGRESS), or ALLOWED / INSIDE
    port: int = 0  # the port the sandbox connected to
    key: bytes = b""  # GATED: the gate's key
    # INPROGRESS: our socket, connecting, and the notifying task's pidfd; GATED: the socket and the
    # capture pair; CHECKED, CHECK_CUT: the socket (all the caller's to close)
    fds: tuple[OwnedFd, ...] = ()
    payload: bytes = b""  # DNS: the sender's sockaddr (28 bytes), then the datagram


def available() -> bool:
    """The extension has the pump and the kernel's notification record is
    the size the thread was built for."""
    if not hasattr(_stage, "pump_start"):
        return False
    try:
        return _stage.notif_sizes()[0] == _RECORD.size - 72
    except OSError:
        return False


def mapped(ip: str) -> bytes:
    """The 16 bytes the thread compares: IPv6, or IPv4 mapped into it."""
    a = ipaddress.ip_address(ip)
    return (a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address("::ffff:" + ip)).packed


def direct_table(entries: Iterable[tuple[str, int, str, int, int]]) -> bytes:
    """The thread's table for direct egress: (the sandbox's address, port,
    the checked address, its port, the name's id) each."""
    return b"".join(_ENTRY.pack(mapped(ip), port.to_bytes(2, "big"), mapped(to), to_port.to_bytes(2, "big"), name)
                    for ip, port, to, to_port, name in entries)


def names_table(entries: Iterable[tuple[str, str, int, float]]) -> bytes:
    """The thread's names for direct egress: (name, the sandbox's IPv4
    address for it, its id, until when: time.monotonic()) each."""
    return b"".join(_NAME.pack(name.encode("ascii"), ipaddress.IPv4Address(fake).packed, ident, int(until * 1e9))
                    for name, fake, ident, until in entries)


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
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            continue
        packed = mapped(host)
        out.append(_ENTRY.pack(packed, port.to_bytes(2, "big"), packed, port.to_bytes(2, "big"), ALLOWED))
    return b"".join(out)


class Pump:
    """The thread for one listener; `fd` is what to wait on, `records()`
    what it said. close() ends the thread (it holds its own duplicates)."""

    def __init__(self, listener: OwnedFd, entries: bytes, *, netns: int = -1, gate: int = -1,
                 budget: int = -1, dns: tuple[int, int] = (-1, -1), sockets: tuple[int, int] = (-1, 0)) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self._pump: object | None = _stage.pump_start(listener.fd, theirs.fileno(), self._stop, netns, gate,
                                                          *dns, *sockets)
        except BaseException:
            ours.close()
            os.close(self._stop)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.fd = ours.fileno()
        self.set_table(entries, budget)

    def set_table(self, entries: bytes, budget: int = -1) -> None:
        """Replace its table (`table()` or `direct_table()`), and with `budget`
        >= 0 the number of gated connects it may make from now."""
        if self._pump is not None:
            _stage.pump_set_table(self._pump, entries, budget)

    def set_names(self, blob: bytes) -> None:
        if self._pump is not None:
            _stage.pump_set_names(self._pump, blob)

    def give_back(self, n: int = 1) -> None:
        """`n` gated connects ended (or were never made)."""
        if self._pump is not None:
            _stage.pump_give_back(self._pump, n)

    def records(self) -> list[Record]:
        """What the thread has said so far (empty when nothing is waiting)."""
        out: list[Record] = []
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _RECORD.size + _DNS_EXTRA, 3)
            except BlockingIOError:
                return out
            except InterruptedError:
                continue
            owned = tuple(OwnedFd(fd, "pump-handoff") for fd in fds)
            kind = _RECORD.unpack_from(data)[0] if len(data) >= _RECORD.size else FAILED
            sized = len(data) == _RECORD.size or (kind == DNS and _RECORD.size + 28 <= len(data))
            if not sized or len(owned) != _FDS.get(kind, 0):
                for o in owned:
                    o.close()
                return [*out, Record(FAILED, errno.EPROTO, -1, False, None)]
            kind, err, fd, cloexec, name, port, key, raw = _RECORD.unpack_from(data)
            notif = _kernel.notif_decode(raw) if kind not in (HUP, FAILED, DNS) else None
            out.append(Record(kind, err, fd, bool(cloexec), notif, name, port, key, owned, data[_RECORD.size:]))

    def close(self) -> None:
        """End the thread (idempotent). A thread waiting on a sandbox's
        memory ends once that read returns; it frees what it holds then."""
        if self._pump is None:
            return
        os.eventfd_write(self._stop, 1)
        os.close(self._stop)
        self._sock.close()
        self._pump = None  # the capsule lets go of our reference
