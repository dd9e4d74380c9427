"""Direct egress: a domains-mode sandbox whose programs resolve allowed names
and connect straight out (net.way = "direct", docs/network.md).

Why this module is long: one sandbox's direct egress (the DNS misses, the
first flights Python checks, the connections' ends, their events) shares
its names and its live connections; the first-flight thread is the part to
move out next.

Why: through the proxy every byte crosses a second TCP connection and a
third busy party; on a small host that halves bulk throughput. Here the
sandbox's connect gets a socket of the host's own, connected to the checked
address, and nothing relays: its bytes go as fast as no sandbox's.

How one connection goes:
1. the program asks its resolver for a name: the DNS socket zviz made in the
   sandbox's network namespace (port 53 of every address there) answers.
   The name is checked (`Rules.check`), resolved on the host (or its pin
   taken) and every address checked (`check_addresses`), as the proxy does;
   an allowed name gets an address of the sandbox's own, from 198.18.0.0/15,
   and the pump's table maps it, for each allowed port, to the first checked
   address. A name that may not be reached gets NXDOMAIN (REFUSED when the
   host could not check it), and an event;
2. the program connects to that address: the pump (zviz/_pump.c) makes the
   host's socket, connects it to the checked address, puts it in the gate
   (zviz/_gate.c) and installs it at the program's fd; then
3. what the program sends first waits in the gate's capture socket: here it
   is read (within `head_timeout`) and must be a TLS ClientHello whose server
   name is the name (`sni_refusal`: no fronting, no ECH) or an HTTP request
   in origin form whose one Host is the name (`origin_request_refusal`).
   Then it is sent on (our own sends pass the gate) and the socket leaves the
   gate: from then on it is a plain socket. Refused: the connection is shut
   down, with an event;
4. when the socket is freed, the kernel's sock_diag destroy message (by the
   socket's cookie) gives its byte counts: the connection's event.
Any other connect (an address that is not one of its names) stays inside the
sandbox's namespace, where every destination is its own loopback: refused
at once, and seen (`_egresswatch`), as with the proxy.

Where it runs: the common case never reaches Python. The pump's thread
(zviz/_pump.c) answers DNS for the names already checked and checks a first
flight that comes whole and plain (zviz/_flight.c: it only ever says "yes,
plainly", tests/test_flight.py holds Python to agreeing); a Python round
trip per step cost ~0.5 ms a connection. The rest comes here: a name to
look up (the loop), a first flight that is not plain or not there within
0.1 s (a thread of the sandbox's own, a selector over the capture sockets,
with the full head timeout), the events and the connections' ends (the loop).

What it cannot see: inside TLS (the inner Host, HTTP/2's :authority), and
after the first request of a plain-HTTP connection (keep-alive requests to
another name on the same server). The proxy (way "proxy") forwards one
request per connection; this way trades that for speed (docs/network.md).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import ipaddress
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from . import _dns, _egressproto as proto, _pump, _stage
from ._egressproto import NEED_MORE, BadRequest, Refused

FAKE_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544: nothing real answers there
CHECKED_S = 30.0  # s a name's checked addresses are reused before it is resolved again
DNS_TTL = 5
# Names one sandbox is given addresses for, over its life (each one rebuilds the pump's tables: a
# sandbox asking for names without end would cost the host's loop quadratic time). Past it: REFUSED.
MAX_NAMES = 1024
MAX_WAITING = 256  # DNS queries waiting for lookups, all names together (past it: REFUSED at once)
DNS_PORT = 53
GATE_SOCKET = 0  # zviz/_gate.h: a key's kind (the connection's socket; 1: its capture socket)
OWN_NAMES = frozenset({"zviz", "localhost"})  # the sandbox's hostname (_plan) and localhost: its own loopback
SO_COOKIE = 57
# sock_diag: the destroy messages of TCP sockets (IPv4, IPv6), and where tcp_info's counters sit
NETLINK_SOCK_DIAG = 4
SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY = 1, 3
INET_DIAG_INFO = 2
_DIAG_MSG = struct.Struct("=BBBBHH16s16sIII")  # family, state, timer, retrans, sport, dport, src, dst, if, cookie
_TCPI_BYTES_RECEIVED, _TCPI_BYTES_SENT, _TCPI_BYTES_RETRANS = 128, 200, 208


def unavailable(*, enter_netns: bool, zygote: bool) -> str | None:
    """Why this host cannot give a sandbox direct egress (None: it can)."""
    from . import _kernel

    if not zygote:
        return "a zygote (a pid namespace and its /proc)"
    if not enter_netns:
        return "a host process that may enter the sandbox's network namespace (CAP_SYS_ADMIN: run as root)"
    if not _pump.available():
        return "the extension's connect pump (rebuild zviz)"
    if _kernel.landlock_abi() < 4:
        return "Landlock's TCP rules (ABI 4, Linux 6.7)"
    try:
        Gate.shared()
    except OSError as e:
        return f"the gate's BPF program (CAP_BPF and CAP_NET_ADMIN: run as root): {e.strerror or e}"
    return None


class Gate:
    """The process's gate (one map and program for every sandbox)."""

    _shared: Gate | None = None

    def __init__(self) -> None:
        self.map_fd, self.prog_fd = _stage.gate_open(os.getpid())
        self._check()

    @classmethod
    def shared(cls) -> Gate:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def _check(self) -> None:
        """Our own sends must pass and another process's must wait: the
        program compares tgids as the root pid namespace numbers them, so a
        process in a pid namespace of its own cannot use it."""
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            with socket.create_connection(srv.getsockname()) as up:
                peer, _ = srv.accept()
                k0, k1 = socket.socketpair()
                with peer, k0, k1:
                    key = _stage.gate_add(self.map_fd, up.fileno(), k0.fileno())
                    try:
                        up.send(b"z")
                        peer.settimeout(1.0)
                        if peer.recv(1) != b"z":
                            raise OSError(errno.EPERM, "the gate held the host's own send")
                    except TimeoutError:
                        raise OSError(errno.EPERM, "the gate held the host's own send (this process is in a pid "
                                      "namespace of its own)") from None
                    finally:
                        _stage.gate_remove(self.map_fd, key)


class _Conn:
    __slots__ = ("address", "cookie", "m0", "name", "port", "pump", "t0")

    def __init__(self, name: str, port: int, address: str, pump: _pump.Pump | None) -> None:
        self.name, self.port, self.address = name, port, address
        self.t0, self.m0 = time.time(), time.monotonic()
        self.cookie = 0
        self.pump = pump


class _Check:
    """A connection whose first flight the thread is reading."""

    __slots__ = ("buf", "capture", "conn", "deadline", "key", "sock", "spare")

    def __init__(self, conn: _Conn, sock: socket.socket, capture: socket.socket, spare: Any, key: bytes,
                 deadline: float) -> None:
        self.conn, self.sock, self.capture, self.spare, self.key = conn, sock, capture, spare, key
        self.buf = b""
        self.deadline = deadline


class DirectEgress:
    """One sandbox's direct egress: its DNS, the pump's table, the first
    flights its gate holds, its connections' ends. The proxy (`_egress`)
    keeps the rules, the name lookups, the events and the figures."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.gate = Gate.shared()
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._checked: dict[str, tuple[float, str]] = {}  # name -> (until, the address connects go to)
        self.pumps: list[_pump.Pump] = []
        self._dns: list[socket.socket | None] = [None, None]  # IPv4, IPv6: the pump reads them, Python answers misses
        self.netns: int = -1  # the sandbox's network namespace (an fd), once its zygote is up
        self._live: dict[int, _Conn] = {}  # by socket cookie: allowed, awaiting their end
        self._checking = 0
        self._diag: socket.socket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self.queries = 0
        self._entries: dict[str, tuple[bytes, bytes]] = {}  # name -> its packed entries (_tables)
        self._packed_for: Any = None  # the rules they were packed for
        self._waiting: dict[str, list[tuple[socket.socket, _dns.Query, Any]]] = {}  # lookups in flight
        # the thread (DNS answers from the cache, first flights) and the loop tell each other things
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()  # to the thread
        self._outbox: collections.deque[Callable[[], None]] = collections.deque()  # to the loop
        self._to_thread_r, self._to_thread_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._to_loop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    # ---- set-up, in the zygote's network namespace

    def enter(self, pidfd: Any) -> None:
        """Its DNS sockets (UDP port 53 of every address in the sandbox's
        namespace: the `local` routes `listen_inside` made) and an fd of that
        namespace, for the pump's sockets inside."""
        from . import _kernel

        ns: list[int] = []

        def make() -> list[socket.socket]:
            from ._egress import bound_pair

            ns.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
            return bound_pair(socket.SOCK_DGRAM, ("0.0.0.0", "::"), DNS_PORT)

        try:
            made = _kernel.sockets_in_netns(pidfd, make)
        except BaseException:
            for fd in ns:
                os.close(fd)
            raise
        if self.netns >= 0:
            os.close(self.netns)
        self.netns = ns[0]
        old, self._dns = self._dns, [next((m for m in made if m.family == f), None)
                                     for f in (socket.AF_INET, socket.AF_INET6)]
        for sock in old:
            if sock is not None:
                sock.close()

    def pump_args(self) -> dict[str, Any]:
        """What `_pump.Pump` takes for this sandbox's listener."""
        return {"netns": self.netns, "gate": self.gate.map_fd, "budget": self._budget(),
                "dns": tuple(s.fileno() if s is not None else -1 for s in self._dns)}

    def adopt(self, pump: _pump.Pump) -> None:
        self.pumps.append(pump)
        table, names = self._tables()
        pump.set_table(table)
        pump.set_names(names)

    def forget(self, pump: _pump.Pump) -> None:
        if pump in self.pumps:
            self.pumps.remove(pump)

    def _budget(self) -> int:
        return max(0, int(self.proxy.max_connections) - len(self._live) - self._checking)

    def _pack(self, name: str, until: float, address: str) -> tuple[bytes, bytes]:
        """A name's entries in the pump's tables: its connects (one per allowed port) and its DNS answer."""
        ports = self.proxy.rules.ports
        fake, ident = self._fake(name), self._ids[name]
        return (_pump.direct_table((fake, port, address, port, ident) for port in ports),
                _pump.names_table([(name, fake, ident, until)]))

    def _tables(self) -> tuple[bytes, bytes]:
        """The pump's tables: the names checked, still allowed and not expired. Each name's entries are
        packed once (a rebuild per name asked for would cost the host's loop quadratic time); new
        rules pack them again, once."""
        rules = self.proxy.rules
        if rules is not self._packed_for:
            self._packed_for = rules
            self._entries = {name: self._pack(name, until, address)
                             for name, (until, address) in self._checked.items()
                             if rules.check(name, min(rules.ports))[1] is None}
        now = time.monotonic()
        live = [e for name, e in self._entries.items() if self._checked[name][0] > now]
        return b"".join(e[0] for e in live), b"".join(e[1] for e in live)

    def refresh(self) -> None:
        """The rules changed (set_network) or a name was checked: the pumps' tables follow."""
        table, names = self._tables()
        for p in self.pumps:
            p.set_table(table)
            p.set_names(names)

    def _fake(self, name: str) -> str:
        return str(FAKE_NET.network_address + 1 + self._ids[name])

    # ---- running

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self._closed:
                    tg.cancel_scope.cancel()
                self._thread = threading.Thread(target=self._serve, name="zviz direct egress", daemon=True)
                self._thread.start()
                with contextlib.suppress(OSError):
                    self._diag = _destroy_listener()
                if self._diag is not None:
                    tg.start_soon(self._diag_loop, self._diag)
                await self._outbox_loop()
        finally:
            self._tg = None
            self.close_now()

    def close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tell_thread(("stop",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        else:  # (never started: what it would have closed)
            for item in self._inbox:
                _discard(item)
        for sock in self._dns:
            if sock is not None:
                sock.close()
        self._dns = [None, None]
        if self._diag is not None:
            _close(self._diag)
            self._diag = None
        if self.netns >= 0:
            os.close(self.netns)
            self.netns = -1
        for conn in list(self._live.values()):  # (their sockets went with the sandbox's processes)
            self._ended(conn, 0, 0)
        self._live.clear()
        for fd in (self._to_thread_r, self._to_thread_w, self._to_loop):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _tell_thread(self, item: tuple[Any, ...]) -> None:
        self._inbox.append(item)
        with contextlib.suppress(OSError):
            os.write(self._to_thread_w, b"!")

    def _tell_loop(self, fn: Callable[[], None]) -> None:
        self._outbox.append(fn)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._to_loop, 1)

    def drain_outbox(self) -> None:
        """(the loop) Do now what the thread has told the loop so far: a run's
        end (Life.process_ended), so that a refusal its program saw is
        counted in it even if the loop has not woken for the eventfd yet."""
        while self._outbox:
            self._outbox.popleft()()

    async def _outbox_loop(self) -> None:
        while True:
            try:
                await anyio.wait_readable(self._to_loop)
            except (anyio.ClosedResourceError, OSError):
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._to_loop)
            self.drain_outbox()

    # ---- the thread

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        checks: dict[int, _Check] = {}
        sel.register(self._to_thread_r, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                timeout = min((c.deadline for c in checks.values()), default=now + 3600.0) - now
                for key, _ in sel.select(max(0.0, timeout)):
                    if key.fd == self._to_thread_r:
                        with contextlib.suppress(OSError):
                            os.read(self._to_thread_r, 4096)
                        while self._inbox:
                            item = self._inbox.popleft()
                            if item[0] == "stop":
                                return
                            if item[0] == "check":
                                c = item[1]
                                checks[c.capture.fileno()] = c
                                sel.register(c.capture, selectors.EVENT_READ)
                                self._step(c, sel, checks)
                    elif key.fd in checks:
                        self._step(checks[key.fd], sel, checks)
                now = time.monotonic()
                for c in [c for c in checks.values() if c.deadline <= now]:
                    self._finish(c, Refused("timeout", f"nothing checkable sent within "
                                            f"{self.proxy.head_timeout:g} s (a TLS ClientHello or an HTTP request)"),
                                 sel, checks)
        finally:
            for c in list(checks.values()):
                sel.unregister(c.capture)
                self._release(c)
                if c.conn.pump is not None:
                    c.conn.pump.give_back()
            for item in self._inbox:
                _discard(item)
            sel.close()

    def dns_miss(self, r: _pump.Record) -> None:
        """(the loop) A datagram the pump did not answer: a name not checked
        yet (or expired), a refusal, anything malformed."""
        sock = self._dns[r.fd] if r.fd in (0, 1) else None
        if sock is None or self._closed:
            return
        raw, data = r.payload[:28], r.payload[28:28 + max(0, r.err)]
        peer = _sockaddr(raw)
        if peer is None:
            return
        self.queries += 1
        try:
            q = _dns.parse_query(data)
        except _dns.Malformed as e:
            if e.reply is not None:
                _sendto(sock, e.reply, peer)
            return
        reply = self._answer_now(q)
        if reply is not None:
            _sendto(sock, reply, peer)
        else:
            self._resolve_soon(sock, q, peer)

    def _resolve_soon(self, sock: socket.socket, q: _dns.Query, peer: Any) -> None:
        """One lookup per name at a time: a query for a name being looked up
        waits for that lookup; past MAX_WAITING queries waiting, REFUSED."""
        if self._tg is None:
            return
        rules = self.proxy.rules
        name, _ = rules.check(q.name, min(rules.ports))
        if sum(map(len, self._waiting.values())) >= MAX_WAITING:
            _sendto(sock, _dns.answer(q, _dns.REFUSED), peer)
            return
        waiting = self._waiting.get(name)
        if waiting is not None:
            waiting.append((sock, q, peer))
            return
        self._waiting[name] = [(sock, q, peer)]
        self._tg.start_soon(self._look_up, name)

    def _answer_now(self, q: _dns.Query) -> bytes | None:
        """The answer if it needs no lookup (None: `_resolve_soon`)."""
        if q.qclass != _dns.CLASS_IN:
            return _dns.answer(q, _dns.REFUSED)
        if q.name.endswith(".in-addr.arpa") or q.name.endswith(".ip6.arpa"):
            return _dns.answer(q, _dns.NXDOMAIN)
        if q.name in OWN_NAMES:  # (its own hostname, as /etc/hosts would have it: programs look it up)
            return _dns.answer(q, addresses=("127.0.0.1",), ttl=DNS_TTL)
        rules = self.proxy.rules
        name, refused = rules.check(q.name, min(rules.ports))
        if refused is not None:
            self._refused(name or q.name or "?", 0, refused)
            return _dns.answer(q, _dns.NXDOMAIN)
        checked = self._checked.get(name)
        if checked is not None and checked[0] > time.monotonic():
            return _dns.answer(q, addresses=(self._fake(name),), ttl=DNS_TTL)
        return None

    async def _look_up(self, name: str) -> None:
        """Check and resolve `name` (the proxy's way), give it an address of
        the sandbox's own, and answer every query that waited for it."""
        try:
            rcode, fake = await self._check_name(name)
        finally:
            waiting = self._waiting.pop(name, [])
        for sock, q, peer in waiting:
            _sendto(sock, _dns.answer(q, rcode, addresses=(fake,) if fake else (), ttl=DNS_TTL), peer)

    async def _check_name(self, name: str) -> tuple[int, str | None]:
        from ._egress import _Denied

        rules = self.proxy.rules
        try:
            addresses = await self.proxy._addresses(rules, name, min(rules.ports))
        except _Denied as d:
            self._refused(name, 0, d.refused)
            return (_dns.REFUSED if d.refused.code == "resolve" else _dns.NXDOMAIN), None
        if name not in self._ids:
            if len(self._names) >= MAX_NAMES:
                self._refused(name, 0, Refused("names", f"more than {MAX_NAMES} names asked for by one sandbox"))
                return _dns.REFUSED, None
            self._ids[name] = len(self._names)
            self._names.append(name)
        v4 = [a for a in addresses if ":" not in a]
        if not v4:  # (the sandbox's address for a name is IPv4: its connects are IPv4 ones)
            self._refused(name, 0, Refused("resolve", f"{name} has no IPv4 address ({', '.join(addresses[:3])}): "
                                           "direct egress reaches IPv4 addresses only; use way='proxy'"))
            return _dns.REFUSED, None
        until = time.monotonic() + CHECKED_S
        self._checked[name] = (until, v4[0])
        self._entries[name] = self._pack(name, until, v4[0])
        self.refresh()
        return _dns.NOERROR, self._fake(name)

    # ---- a connection the pump made: its first flight

    def gated(self, r: _pump.Record, pump: _pump.Pump | None) -> None:
        """A GATED record (or a gated connect Python finished): its first
        flight is the thread's to check."""
        sock_fd, k0, k1 = r.fds
        sock = socket.socket(fileno=sock_fd.detach())
        capture = socket.socket(fileno=k0.detach())
        capture.setblocking(False)
        name = self._names[r.name] if 0 <= r.name < len(self._names) else "?"
        conn = _Conn(name, r.port, _peer_address(sock), pump)
        c = _Check(conn, sock, capture, k1, r.key, time.monotonic() + self.proxy.head_timeout)
        self._checking += 1
        if self._closed:
            self._release(c)
            if pump is not None:
                pump.give_back()
            return
        self._tell_thread(("check", c))

    def _step(self, c: _Check, sel: selectors.BaseSelector, checks: dict[int, _Check]) -> None:
        """(the thread) Read what has come of a first flight; decide when it is whole."""
        while True:
            try:
                data = c.capture.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._finish(c, Refused("error", os.strerror(e.errno or 0)), sel, checks)
                return
            if not data:
                self._finish(c, Refused("closed", "the program closed the connection before sending"), sel, checks)
                return
            c.buf += data
            if len(c.buf) > max(proto.MAX_CLIENT_HELLO, proto.MAX_HEAD) + 64:
                self._finish(c, Refused("bad-request", "a first flight larger than zviz reads"), sel, checks)
                return
        refused, done = _first_flight(c.buf, c.conn.name, c.conn.port)
        if refused is not None or done:
            self._finish(c, refused, sel, checks)

    def _finish(self, c: _Check, refused: Refused | None, sel: selectors.BaseSelector,
                checks: dict[int, _Check]) -> None:
        """(the thread) Send the first flight on and let the connection out of
        the gate, or refuse it; either way the check is over."""
        sel.unregister(c.capture)
        del checks[c.capture.fileno()]
        lowat = None
        if refused is None:
            # The server's answer must not reach the program before the socket is out of the gate (its
            # next message, sent on that answer, would be held in the capture socket and lost): a receive
            # low-water mark keeps it from recv and poll until it is restored, which wakes them.
            with contextlib.suppress(OSError):
                lowat = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 0x7FFFFFFF)
            try:
                _send_now(c.sock, c.buf)
            except OSError as e:
                refused = Refused("error", f"sending the first flight: {os.strerror(e.errno or 0)}")
        # Out of the gate: the program's next sends go straight out. Anything it sent after its first
        # flight before this (a client that does not wait for the server) would arrive behind what
        # follows it: the connection is cut instead. (A program already blocked in recv() when it is
        # refused is woken with EAGAIN, not the end: a quirk of sockets in a sockmap, tcp_bpf_recvmsg;
        # its next call sees the end.)
        conn = c.conn
        told = refused
        if refused is not None:
            # the loop hears of it before the program can see the cut (and end: its run's end drains this
            # outbox, drain_outbox), then the cut, before it leaves the gate: a send from then on would reach
            # the server
            self._tell_loop(functools.partial(self._refused_check, conn, refused))
            _shut(c.sock)
        _stage.gate_remove(self.gate.map_fd, c.key, GATE_SOCKET)
        if refused is None and _pending(c.capture):
            refused = Refused("early-data", "the program sent more before the server answered its first "
                              "message (TLS early data): not supported by direct egress")
        _stage.gate_remove(self.gate.map_fd, c.key)  # (the capture socket's entry too)
        if lowat is not None:
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        if refused is not None:
            if told is None:  # (early data: found after the gate let it go)
                self._tell_loop(functools.partial(self._refused_check, conn, refused))
            _shut(c.sock)
            self._release(c)
            return
        with contextlib.suppress(OSError):
            conn.cookie = struct.unpack("=Q", c.sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        self._live[conn.cookie] = conn  # (before our socket closes: its end cannot come first)
        self._release(c)
        self._tell_loop(self._checked_one)

    def _release(self, c: _Check) -> None:
        for s in (c.capture, c.sock):
            s.close()  # (ours only: the program holds its own; its close ends the connection)
        c.spare.close()

    def _refused_check(self, conn: _Conn, refused: Refused) -> None:
        self._checking -= 1
        self._refused(conn.name, conn.port, refused, conn)
        if conn.pump is not None:
            conn.pump.give_back()

    def _checked_one(self) -> None:
        self._checking -= 1

    def checked(self, r: _pump.Record, pump: _pump.Pump | None) -> None:
        """(the loop) The pump checked a first flight and sent it on (CHECKED), or
        sent it on and cut the connection (CHECK_CUT: early data, a short send)."""
        (sock_fd,) = r.fds
        sock = socket.socket(fileno=sock_fd.detach())
        try:
            name = self._names[r.name] if 0 <= r.name < len(self._names) else "?"
            conn = _Conn(name, r.port, _peer_address(sock), pump)
            if r.kind == _pump.CHECK_CUT:
                why = (Refused("error", f"sending the first flight: {os.strerror(r.err)}") if r.err else
                       Refused("early-data", "the program sent more before the server answered its first message "
                               "(TLS early data): not supported by direct egress"))
                self._refused(name, r.port, why, conn)
                if pump is not None:
                    pump.give_back()
                return
            with contextlib.suppress(OSError):
                conn.cookie = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
            self._live[conn.cookie] = conn  # (before our socket closes: its end cannot come first)
        finally:
            sock.close()

    def gate_failed(self, r: _pump.Record) -> None:
        """A connect out refused (EAGAIN) because its socket could not be put in the gate."""
        name = self._names[r.name] if 0 <= r.name < len(self._names) else "?"
        self._refused(name, r.port, Refused("gate", f"the connection could not be held for its check "
                                            f"({os.strerror(r.err) if r.err else 'unknown'}): refused"))

    # ---- a connection's end

    async def _diag_loop(self, diag: socket.socket) -> None:
        while diag.fileno() >= 0:
            try:
                await anyio.wait_readable(diag)
            except (anyio.ClosedResourceError, OSError):
                return
            for _ in range(256):
                try:
                    data = diag.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:  # messages were lost: ask the kernel which sockets are left
                        self._reconcile()
                        continue
                    return
                for cookie, up, down in _destroyed(data):
                    conn = self._live.pop(cookie, None)
                    if conn is not None:
                        self._ended(conn, up, down)
                        if conn.pump is not None:
                            conn.pump.give_back()
            await anyio.lowlevel.checkpoint()

    def _reconcile(self) -> None:
        """After lost destroy messages: the connections whose sockets are gone
        end now (their byte counts are lost: 0), and give their places back."""
        try:
            present = _tcp_cookies()
        except OSError:
            return
        for cookie in [c for c in self._live if c not in present]:
            conn = self._live.pop(cookie)
            self._ended(conn, 0, 0)
            if conn.pump is not None:
                conn.pump.give_back()

    # ---- events and figures (the proxy's)

    def _refused(self, name: str, port: int, refused: Refused, conn: _Conn | None = None) -> None:
        from ._egress import _Conn as ProxyConn

        c = ProxyConn.__new__(ProxyConn)
        c.protocol, c.domain, c.port = "direct", name, port
        c.address = conn.address if conn is not None else None
        c.up = c.down = 0
        c.t0 = conn.t0 if conn is not None else time.time()
        c.m0 = conn.m0 if conn is not None else time.monotonic()
        self.proxy._refuse(c, refused)

    def _ended(self, conn: _Conn, up: int, down: int) -> None:
        from ._egress import _Conn as ProxyConn

        c = ProxyConn.__new__(ProxyConn)
        c.protocol, c.domain, c.port, c.address = "direct", conn.name, conn.port, conn.address
        c.up, c.down, c.t0, c.m0 = up, down, conn.t0, conn.m0
        self.proxy.bytes_up += up
        self.proxy.bytes_down += down
        self.proxy._done(c)


# ---------------------------------------------------------------- helpers


def _first_flight(buf: bytes, name: str, port: int) -> tuple[Refused | None, bool]:
    """(why not, or None; whether it is complete) for what the program sent first."""
    if not buf:
        return None, False
    try:
        if proto.looks_like_tls(buf):
            hello = proto.parse_client_hello(buf)
            if hello is NEED_MORE:
                return None, False
            assert isinstance(hello, proto.ClientHello)
            return proto.sni_refusal(hello, name), True
        why = proto.origin_request_refusal(buf, name, port)
    except BadRequest as e:
        return Refused("bad-request", f"neither a TLS ClientHello nor an HTTP request ({e.args[0]})"[:300]), True
    if why is NEED_MORE:
        return None, False
    return why if isinstance(why, Refused) else None, True


def _destroy_listener() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                      NETLINK_SOCK_DIAG)
    try:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: bursts of ends are not lost
        s.bind((0, (1 << (SKNLGRP_INET_TCP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_TCP_DESTROY - 1))))
    except BaseException:
        s.close()
        raise
    return s


def _destroyed(data: bytes) -> list[tuple[int, int, int]]:
    """(cookie, bytes sent, bytes received) of each destroy message in `data`."""
    out = []
    at = 0
    while at + 16 <= len(data):
        length, _type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, at)
        if length < 16 or at + length > len(data):
            break
        body = data[at + 16:at + length]
        at += (length + 3) & ~3
        if len(body) < 72:
            continue
        cookie = struct.unpack_from("=Q", body, 44)[0]
        up = down = 0
        pos = 72
        while pos + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, pos)
            if alen < 4:
                break
            if atype == INET_DIAG_INFO and alen - 4 >= _TCPI_BYTES_RETRANS + 8:
                info = body[pos + 4:pos + alen]
                sent, retrans = struct.unpack_from("=QQ", info, _TCPI_BYTES_SENT)
                down = struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]
                up = max(0, sent - retrans)
            pos += (alen + 3) & ~3
        out.append((cookie, up, down))
    return out


def _sockaddr(raw: bytes) -> tuple[Any, ...] | None:
    """A sender's address (as recvfrom gives it) from a sockaddr_in or sockaddr_in6."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        flow, scope = struct.unpack_from("!I", raw, 4)[0], struct.unpack_from("=I", raw, 24)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope
    return None


def _tcp_cookies() -> set[int]:
    """The cookies of every TCP socket of this network namespace (a sock_diag dump)."""
    out: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        s.settimeout(2.0)
        for family in (socket.AF_INET, socket.AF_INET6):
            states = 0xFFFFFFFF & ~(1 << 6)  # every state but TIME_WAIT (its full socket is gone: destroyed)
            req = struct.pack("=BBBBI48s", family, socket.IPPROTO_TCP, 0, 0, states, b"")
            s.send(struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req)  # SOCK_DIAG_BY_FAMILY, dump
            done = False
            while not done:
                data = s.recv(1 << 16)
                at = 0
                while at + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, at)
                    if length < 16 or kind in (2, 3):  # NLMSG_ERROR, NLMSG_DONE
                        done = True
                        break
                    if length >= 16 + 52:
                        out.add(struct.unpack_from("=Q", data, at + 16 + 44)[0])
                    at += (length + 3) & ~3
    return out


def _peer_address(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _pending(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False


def _send_now(sock: socket.socket, data: bytes) -> None:
    """All of `data` (a first flight: it fits an empty send buffer; a peer that
    takes none of it for 5 s fails it)."""
    view = memoryview(data)
    deadline = time.monotonic() + 5.0
    while view:
        try:
            view = view[sock.send(view, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT):]
        except (BlockingIOError, InterruptedError):
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "the server took none of it") from None
            import select

            select.select([], [sock], [], 0.05)


def _discard(item: tuple[Any, ...]) -> None:
    """Close what a message to the thread carried, never delivered."""
    if item[0] == "check":
        c = item[1]
        for s in (c.capture, c.sock):
            s.close()
        c.spare.close()


def _shut(sock: socket.socket) -> None:
    """End the connection for both ends (the program holds the same socket)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _sendto(sock: socket.socket, data: bytes, peer: Any) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(data, peer)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        anyio.notify_closing(s)
    s.close()
