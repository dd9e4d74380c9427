"""The egress proxy of a sandbox in net.mode = "domains": the trio/anyio shell
over `_egressproto` (which holds every rule and parser).

Why this module is long: one connection's life (three protocols' heads, the
checks, the tunnel's TLS check, the relay, the event) shares the
connection's state and its refusals; the splice relay is the part to move
out next.

How a connection reaches it. The sandbox's processes live in a network
namespace of their own, with nothing in it but its loopback. Two ways:
- inside (a host process that may setns, i.e. CAP_SYS_ADMIN; a zygote: `listen_inside`):
  before a zygote runs anything, the host enters its network namespace
  (setns on its pidfd, in a thread of its own) and makes this proxy's
  listening sockets there, on 127.0.0.1:3128 and [::1]:3128 (the
  HTTP(S)_PROXY the sandbox is given). The sandbox's connects are then
  plain in-kernel connects (its seccomp filter lets connect through: no
  notification, no supervisor on the way): they can reach only what is in
  its namespace, where every destination is its loopback: any other one is
  refused at once (ECONNREFUSED) and the host's watchers see the kernel's
  reset and record a denial naming the fix (`_egresswatch`). Nothing on the
  host can connect to these sockets: they are not in the host's namespace;
- supervised (otherwise): every connect is a seccomp notification (as in
  net.mode = "allow"). A connect to the proxy's address is performed by the
  supervisor to this proxy's listening socket on the host's loopback, and
  that socket is installed in place of the program's (ADDFD): the proxy
  then accepts only connections whose source port the supervisor announced
  (`expect`) just before, so nothing else on the host can borrow a
  sandbox's rules. Every other connect is refused (EACCES) with an event
  naming the fix.
Either way nothing hangs, and nothing leaves except through here.

What the proxy does for one connection (one task each, in the proxy's own
task group; at most `max_connections` at once per sandbox):
1. read the request head within `head_timeout` (slowloris) and at most the
   parser's caps (flood): HTTP CONNECT, a plain-HTTP request in absolute
   form, or SOCKS5 (its first byte is 5) with the name resolved here;
2. check the name (`Rules.check`), resolve it on the host (or take its pin),
   check every address, and connect to the address it checked (no second
   lookup: no DNS rebinding);
3. tunnels (CONNECT, SOCKS5) must carry TLS: the ClientHello is read and its
   SNI must be the tunnel's name (no domain fronting; no ECH); plain HTTP is
   forwarded one request per connection (origin form, `Connection: close`:
   a pipelined second request cannot switch hosts on an open connection);
4. relay the bytes with os.splice through a pipe (no copy through Python),
   counting them against the sandbox's byte budget;
5. record one `EgressEvent` (domain, port, allowed or why not, bytes each way).
Closing the sandbox cancels the task group: every proxied connection is
closed on both sides.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import attrs

from . import _capacity, _egressproto as proto
from ._egressproto import NEED_MORE, BadRequest, Refused, Rules
from ._errors import SandboxSetupError

HEAD_TIMEOUT = 10.0  # s for a request head, a SOCKS5 request or a ClientHello to arrive
CONNECT_TIMEOUT = 10.0  # s to connect upstream (each address)
EXPECT_S = 30.0  # s an announced connection may take to be accepted
# Name lookups at once per sandbox. Each is a worker thread that runs until the host's resolver answers,
# even past the proxy's timeout: with a limiter of its own a sandbox that asks for slow names waits for its
# own lookups, never for the process's shared worker threads (the file API, other sandboxes' lookups).
MAX_LOOKUPS = 8
SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_SPLICE_F_MOVE, _SPLICE_F_NONBLOCK = 1, 2
_IP_FREEBIND = 15
_MAX_DOMAINS = 1024  # per-domain statistics kept (past it: one "(other)" bucket)


@attrs.frozen(kw_only=True)
class EgressEvent:
    """One connection attempt through the egress proxy (net.mode = "domains"),
    in `Sandbox.events()`: recorded when it is refused, or when it ends."""

    time: float  # time.time() at the attempt
    protocol: str  # "connect" (HTTP CONNECT), "http" (plain HTTP forwarding) or "socks5"
    domain: str  # the name asked for (normalised), or what was sent when it is not one
    port: int
    address: str | None  # the address connected to
    allowed: bool
    code: str  # "ok", or why not: not-allowed, denied, ip, private-address, sni, ...
    reason: str
    bytes_up: int = 0  # sandbox -> remote
    bytes_down: int = 0
    duration_s: float = 0.0

    def __str__(self) -> str:
        verdict = "allowed" if self.allowed else f"denied ({self.code})"
        tail = f", {self.bytes_up} B up, {self.bytes_down} B down" if self.allowed else f": {self.reason}"
        return f"egress {self.protocol} {self.domain}:{self.port} {verdict}{tail}"


@attrs.frozen(kw_only=True)
class DomainStatistics:
    allowed: int = 0
    denied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@attrs.frozen(kw_only=True)
class EgressStatistics:
    """The egress proxy's figures (`SandboxStatistics.egress`)."""

    connections: int  # attempts
    allowed: int
    denied: int
    active: int
    bytes_up: int
    bytes_down: int
    denied_by_code: Mapping[str, int]
    domains: Mapping[str, DomainStatistics]
    strangers: int  # connections to the proxy's host socket that no sandbox connect announced (dropped)


class _Conn:
    def __init__(self, client: socket.socket, protocol: str = "?") -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.protocol = protocol
        self.domain = ""
        self.port = 0
        self.address: str | None = None
        self.up = 0
        self.down = 0
        self.t0 = time.time()
        self.m0 = time.monotonic()
        self.fds = 0  # taken from the process's ledger (_capacity), given back when it ends


class _Denied(Exception):
    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.reason)
        self.refused = refused


@functools.cache
def _connect_nr() -> int:
    from ._syscall_table import BY_NUMBER

    return next(nr for nr, name in BY_NUMBER.items() if name == "connect")


class EgressProxy:
    """One sandbox's proxy: its listening socket on the host's loopback, its
    rules (replaced by `set_network`), its connections and their figures."""

    def __init__(self, network: Any, on_event: Callable[[Any], None],
                 on_denial: Callable[[str], str] | None = None) -> None:
        self._on_event = on_event
        # a direct connect seen inside: counted (in the run it can be told to be, else the
        # sandbox's totals); answers that run's command, or ""
        self._on_denial = on_denial
        self.head_timeout = HEAD_TIMEOUT
        self.connect_timeout = CONNECT_TIMEOUT
        self.rules = Rules.build((), (), (), {})
        self.max_connections: int = 64
        self.max_bytes: int | None = None
        self.set_network(network)
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self._listen.bind(("127.0.0.1", 0))
            self._listen.listen(512)
        except BaseException:
            self._listen.close()
            raise
        self.address: tuple[str, int] = self._listen.getsockname()
        self._expected: dict[int, float] = {}
        self._lookups: anyio.CapacityLimiter | None = None  # (made on the event loop, at the first lookup)
        self._conns: set[_Conn] = set()
        self._inside: list[socket.socket] = []  # listening in the sandbox's network namespace (listen_inside)
        self._watch: list[socket.socket] = []  # its refused connects' resets (listen_inside, _egresswatch)
        self.direct_reads = 0  # packets read from those (only refused connects' resets pass their filter)
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._closed = False
        self._stopped = anyio.Event()
        self.attempts = self.allowed = self.denied = self.strangers = 0
        self.bytes_up = self.bytes_down = 0
        self._by_code: dict[str, int] = {}
        self._domains: dict[str, list[int]] = {}
        self.direct: Any = None  # net.way = "direct": its DNS and connects out (_egressdirect.DirectEgress)

    # ---- the rules (replaceable while running: new connections follow them)

    def set_network(self, network: Any) -> None:
        self.rules = Rules.build(network.allow_domains, network.deny_domains, network.ports, dict(network.hosts))
        self.max_connections = network.max_connections
        self.max_bytes = network.max_bytes
        if getattr(self, "direct", None) is not None:  # (its DNS answers and connects follow at once)
            self.direct.refresh()

    # ---- the supervisor's side (_supervisor._EgressHook)

    def route(self) -> tuple[frozenset[tuple[str, int]], tuple[str, int]]:
        return frozenset({("127.0.0.1", proto.PROXY_PORT), ("::1", proto.PROXY_PORT)}), self.address

    def expect(self, local_port: int) -> None:
        now = time.monotonic()
        if len(self._expected) > 4096:
            self._expected = {p: t for p, t in self._expected.items() if t > now}
        self._expected[local_port] = now + EXPECT_S

    def hint(self, address: tuple[str, int] | None = None) -> str:
        """A denial's detail for a program that went around the proxy (to `address`, when it connected)."""
        if self.direct is not None:
            return proto.name_hint(address)
        return proto.direct_hint(address)

    # ---- serving

    async def run(self) -> None:
        """Accept and serve until `aclose()` (start it in the sandbox's task group)."""
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope  # aclose() ends the accept loops and every connection
                self._tg = tg
                if self._closed:
                    tg.cancel_scope.cancel()
                for lst in self._inside:
                    tg.start_soon(self._accept_loop, lst, False)
                for w in self._watch:
                    tg.start_soon(self._watch_loop, w)
                if self.direct is not None:
                    tg.start_soon(self.direct.run)
                await self._accept_loop(self._listen, True)
        finally:
            self._tg = None
            for conn in list(self._conns):
                _close(conn)
            self._stopped.set()

    async def _accept_loop(self, listener: socket.socket, announced: bool) -> None:
        """Accept from one listening socket until it is closed. `announced`:
        the host's loopback socket, where only the connections the supervisor
        made (and announced with `expect`) are served; a socket inside the
        sandbox's network namespace is reachable from the sandbox alone."""
        while listener.fileno() >= 0:
            try:
                await anyio.wait_readable(listener)
            except (anyio.ClosedResourceError, OSError):
                return  # replaced (the zygote's netns died with it) or closed
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await anyio.sleep(0.05)  # the host is short: the backlog waits
                    continue
                if listener.fileno() < 0:
                    return
                raise
            if announced:
                deadline = self._expected.pop(peer[1], None)
                if deadline is None or deadline < time.monotonic() or peer[0] != "127.0.0.1":
                    self.strangers += 1  # not a connection a sandbox's connect made
                    sock.close()
                    continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the proxy writes what it has, at once
            conn = _Conn(sock)
            if len(self._conns) >= self.max_connections:
                self._refuse(conn, Refused("connections", f"{self.max_connections} connections of this "
                                           "sandbox are open (net.max_connections)"))
                _reset(sock)
                continue
            if not _capacity.GATE.take_fds(_capacity.FDS_PER_CONNECTION):  # (the process's fds, every sandbox's)
                self._refuse(conn, Refused("connections", "the host process has no file descriptors to spare for "
                                           f"another proxied connection ({len(self._conns)} of this sandbox are "
                                           "open; the egress proxies of the process may hold half of its "
                                           "RLIMIT_NOFILE): raise that limit, or lower net.max_connections"))
                _reset(sock)
                continue
            conn.fds = _capacity.FDS_PER_CONNECTION
            self._conns.add(conn)
            assert self._tg is not None
            self._tg.start_soon(self._serve, conn)

    def listen_inside(self, pidfd: Any) -> None:
        """Listen on 127.0.0.1:3128 and [::1]:3128 inside the network namespace
        of the process behind `pidfd` (the sandbox's zygote, before it runs
        any command): the sandbox's connects to the proxy are then plain
        in-kernel connects (no seccomp notification, no supervisor), which
        reach nothing else: its namespace holds only its loopback. Replaces
        the sockets of an earlier zygote (its namespace died with it)."""
        from . import _egresswatch, _kernel

        def make() -> list[socket.socket]:
            made: list[socket.socket] = []
            try:
                # Every destination is the namespace's own: a direct connect is refused at once (RST), and
                # the watchers see that reset (an event naming the fix); only the proxy listens there.
                made.extend(_egresswatch.refusal_watchers(_egresswatch.route_everything_local()))
                for s in bound_pair(socket.SOCK_STREAM, ("127.0.0.1", "::1"), proto.PROXY_PORT, freebind=True):
                    made.append(s)
                    with contextlib.suppress(OSError):  # woken when the request has come, not before
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
                    s.listen(512)
            except BaseException:
                for s in made:
                    s.close()
                raise
            return made

        try:
            made = _kernel.sockets_in_netns(pidfd, make)
        except OSError as e:
            raise SandboxSetupError("egress-proxy", e.errno or errno.EIO, None,
                                    f"the egress proxy's socket in the sandbox's network namespace: {e}") from e
        watch = [s for s in made if s.type == socket.SOCK_RAW]
        old = self._inside + self._watch
        self._inside, self._watch = [s for s in made if s.type != socket.SOCK_RAW], watch
        for s in old:
            _close_socket(s)
        if self._closed:
            self._close_inside()
            return
        if self._tg is not None:
            for s in self._inside:
                self._tg.start_soon(self._accept_loop, s, False)
            for s in watch:
                self._tg.start_soon(self._watch_loop, s)

    def enter_direct(self, pidfd: Any) -> None:
        """A new zygote of a direct-egress sandbox: the proxy's sockets and
        watchers in its namespace (`listen_inside`), then its DNS (_egressdirect)."""
        self.listen_inside(pidfd)
        assert self.direct is not None
        try:
            self.direct.enter(pidfd)
        except OSError as e:
            raise SandboxSetupError("egress-dns", e.errno or errno.EIO, None,
                                    f"the DNS socket in the sandbox's network namespace: {e}") from e

    def _close_inside(self) -> None:
        old = self._inside + self._watch
        self._inside, self._watch = [], []
        for s in old:
            _close_socket(s)

    async def _watch_loop(self, watcher: socket.socket) -> None:
        """Record a denial for each direct connect the watcher saw (refused
        by the kernel at once: its reset), until it is closed. At most 64 a wake-up: a flood waits in (and overflows)
        the socket's small buffer, never the loop."""
        while watcher.fileno() >= 0:
            try:
                await anyio.wait_readable(watcher)
            except (anyio.ClosedResourceError, OSError):
                return
            self._read_refusals(watcher, 64)
            await anyio.lowlevel.checkpoint()

    def drain_refusals(self) -> None:
        """Record now what the watchers hold (a run's end: the kernel queued
        the reset of its refused connect before the connect returned, so its
        denial is counted in that run even if the loop has not woken for it;
        the direct way's checks likewise tell the loop before they cut)."""
        if self.direct is not None:
            self.direct.drain_outbox()
        for watcher in self._watch:
            self._read_refusals(watcher, 4096)

    def _read_refusals(self, watcher: socket.socket, at_most: int) -> None:
        from . import _egresswatch
        from ._supervisor import DenialEvent

        for _ in range(at_most):
            try:
                seen = _egresswatch.read_refusal(watcher)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # (closed meanwhile, or an error the next read reports again)
                return
            self.direct_reads += 1
            if seen is None:
                continue
            command = self._on_denial("connect") if self._on_denial is not None else ""
            self._on_event(DenialEvent(time=time.time(), pid=0, command=command, syscall="connect",
                                       nr=_connect_nr(), args=(), errno=errno.ECONNREFUSED, source="netns",
                                       detail=self.hint(seen)))

    async def aclose(self) -> None:
        """Close every proxied connection (both sides) and the listening socket."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._stopped.wait()
        self.close_now()

    def close_now(self) -> None:
        self._closed = True
        if self.direct is not None:
            self.direct.close_now()
        for conn in list(self._conns):
            _close(conn)
        self._close_inside()
        _close_socket(self._listen)

    # ---- one connection

    async def _serve(self, conn: _Conn) -> None:
        try:
            try:
                await self._handle(conn)
            except _Denied as d:
                self._refuse(conn, d.refused)
            except BadRequest as e:
                if isinstance(e, proto.NotHttp):
                    await _send_quietly(conn.client, e.reply)
                elif conn.protocol == "http" and not isinstance(e, proto.SocksRefusal):
                    await _send_quietly(conn.client, proto.http_error(400, e.reason))
                elif conn.protocol == "socks5" and not isinstance(e, proto.SocksRefusal):
                    await _send_quietly(conn.client, proto.socks_reply(proto.SOCKS_FAILURE))
                self._refuse(conn, Refused("bad-request", e.reason))
            except (ConnectionError, BrokenPipeError):
                if conn.address is None:
                    self._refuse(conn, Refused("closed", "the client closed the connection before its request"))
                else:
                    self._done(conn)
            except OSError as e:
                self._refuse(conn, Refused("error", f"{os.strerror(e.errno or 0)}"))
            except Exception as e:  # noqa: BLE001 - one connection's failure must not end the proxy
                self._refuse(conn, Refused("error", f"{type(e).__name__}: {e}"[:300]))
            else:
                self._done(conn)
        except BaseException:
            # Cancelled: the sandbox is closing. A connection that was relaying
            # is recorded with what it moved; one still in its checks is not.
            if conn.upstream is not None and conn.address is not None:
                self._done(conn)
            raise
        finally:
            self._conns.discard(conn)
            _close(conn)

    async def _handle(self, conn: _Conn) -> None:
        # The request is usually here already (the listener wakes on data):
        # then it is parsed with no timer to set up (~30 us each).
        buf = _recv_ready(conn.client, 4096)
        if buf and buf[:1] != b"\x05":
            conn.protocol = "http"
            early = proto.parse_http_head(buf)
        else:
            early = NEED_MORE
        if isinstance(early, proto.HttpRequest):
            req: proto.HttpRequest | None = early
            conn.protocol = "connect" if early.connect else "http"
            host, port, is_connect = early.host, early.port, early.connect
            buf = buf[early.consumed:]
        else:
            host, port, is_connect, req, buf = await self._read_head(conn, buf)
        rules = self.rules  # one set of rules for the whole connection (set_network may replace them meanwhile)
        name, refused = rules.check(host, port)
        conn.domain, conn.port = name, port
        try:
            if refused is not None:
                raise _Denied(refused)
            if self._room() == 0:
                raise self._spent()
            addresses = await self._addresses(rules, name, port)
            if not is_connect:
                await self._connect_upstream(conn, name, port, addresses)
        except _Denied as d:
            await self._answer_refusal(conn, d.refused)
            raise
        if is_connect:
            # The tunnel's first bytes are checked before anything reaches the
            # remote end: the answer comes first, the connect after the SNI check.
            if conn.protocol == "socks5":
                await _send_all(conn.client, proto.socks_reply(proto.SOCKS_OK))
            else:
                await _send_all(conn.client, b"HTTP/1.1 200 Connection established\r\n\r\n")
            with anyio.move_on_after(self.head_timeout) as timer:
                while True:
                    if buf and not proto.looks_like_tls(buf):
                        raise _Denied(Refused("not-tls", "a tunnel must carry TLS for the name it was opened for "
                                              "(send plain HTTP as a proxy request, through HTTP_PROXY)"))
                    hello = proto.parse_client_hello(buf) if buf else NEED_MORE
                    if hello is not NEED_MORE:
                        break
                    if len(buf) > proto.MAX_CLIENT_HELLO + 64:
                        raise BadRequest("a ClientHello larger than the proxy reads")
                    buf += await _recv(conn.client, 65536)
            if timer.cancelled_caught:
                raise _Denied(Refused("timeout", f"no TLS ClientHello within {self.head_timeout:g} s"))
            assert isinstance(hello, proto.ClientHello)
            why = proto.sni_refusal(hello, name)
            if why is not None:
                raise _Denied(why)
            await self._connect_upstream(conn, name, port, addresses)
            await self._send_up(conn, buf)
            await self._relay(conn, None)
        else:
            assert req is not None and conn.upstream is not None
            body = buf[:req.body_length]
            await self._send_up(conn, req.head + body)
            await self._relay(conn, req.body_length - len(body))

    async def _read_head(self, conn: _Conn, buf: bytes) -> tuple[str, int, bool, proto.HttpRequest | None, bytes]:
        """(host, port, is it a tunnel, the HTTP request, what follows it)
        within `head_timeout` (slowloris), `buf` being what has come so far."""
        with anyio.move_on_after(self.head_timeout) as timer:
            if not buf:
                buf = await _recv(conn.client, 4096)
            if buf[:1] == b"\x05":
                conn.protocol = "socks5"
                host, port, buf = await self._socks_head(conn, buf)
                return host, port, True, None, buf
            conn.protocol = "http"
            while True:
                parsed = proto.parse_http_head(buf)
                if parsed is not NEED_MORE:
                    break
                buf += await _recv(conn.client, proto.MAX_HEAD + 4 - len(buf) + 1)
            assert isinstance(parsed, proto.HttpRequest)
            conn.protocol = "connect" if parsed.connect else "http"
            return parsed.host, parsed.port, parsed.connect, parsed, buf[parsed.consumed:]
        assert timer.cancelled_caught
        conn.domain = conn.domain or "?"
        await _send_quietly(conn.client, proto.http_error(408, "the request did not arrive in time")
                            if conn.protocol == "http" else b"")
        raise _Denied(Refused("timeout", f"the request did not arrive within {self.head_timeout:g} s"))

    async def _socks_head(self, conn: _Conn, buf: bytes) -> tuple[str, int, bytes]:
        while True:
            g = proto.parse_socks_greeting(buf)
            if g is not NEED_MORE:
                break
            buf += await _recv(conn.client, proto.MAX_SOCKS)
        assert isinstance(g, proto.SocksGreeting)
        if not g.no_auth:
            await _send_all(conn.client, b"\x05\xff")
            raise proto.SocksRefusal(proto.SOCKS_FAILURE, "the SOCKS5 client offers no method without authentication")
        await _send_all(conn.client, b"\x05\x00")
        buf = buf[g.consumed:]
        while True:
            try:
                r = proto.parse_socks_request(buf)
            except proto.SocksRefusal as e:
                await _send_quietly(conn.client, proto.socks_reply(e.code))
                raise
            if r is not NEED_MORE:
                break
            if len(buf) > proto.MAX_SOCKS:
                raise BadRequest("a SOCKS5 request larger than the proxy reads")
            buf += await _recv(conn.client, proto.MAX_SOCKS)
        assert isinstance(r, proto.SocksRequest)
        return r.host, r.port, buf[r.consumed:]

    async def _answer_refusal(self, conn: _Conn, refused: Refused) -> None:
        if conn.protocol == "socks5":
            code = {"not-allowed": proto.SOCKS_NOT_ALLOWED, "denied": proto.SOCKS_NOT_ALLOWED,
                    "ip": proto.SOCKS_NOT_ALLOWED, "private-address": proto.SOCKS_NOT_ALLOWED,
                    "resolve": proto.SOCKS_HOST_UNREACHABLE, "upstream": proto.SOCKS_REFUSED}.get(
                        refused.code, proto.SOCKS_FAILURE)
            await _send_quietly(conn.client, proto.socks_reply(code))
        else:
            status = 502 if refused.code in ("resolve", "upstream") else 403
            await _send_quietly(conn.client, proto.http_error(status, refused.reason))

    async def _addresses(self, rules: Rules, name: str, port: int) -> list[str]:
        """The checked addresses of `name`: its pin, or the host's resolver's
        answer, every address of which must be public."""
        pins = rules.pinned(name)
        if pins is not None:
            candidates = list(pins)
        else:
            candidates = []
            with anyio.move_on_after(self.connect_timeout):  # a resolver that does not answer
                if self._lookups is None:
                    self._lookups = anyio.CapacityLimiter(MAX_LOOKUPS)
                try:
                    candidates = await resolve(name, port, self._lookups)
                except (OSError, UnicodeError) as e:
                    raise _Denied(Refused("resolve", f"{name} does not resolve ({e})")) from None
            if not candidates:
                raise _Denied(Refused("resolve", f"{name}: no answer from the host's resolver within "
                                      f"{self.connect_timeout:g} s"))
        addresses, refused = proto.check_addresses(name, candidates, pinned=pins is not None)
        if refused is not None:
            raise _Denied(refused)
        return addresses

    async def _connect_upstream(self, conn: _Conn, name: str, port: int, addresses: list[str]) -> None:
        last = ""
        for addr in addresses:  # connect to the address checked: no second lookup
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                err = sock.connect_ex((addr, port))
                if err == errno.EINPROGRESS and _peer(sock):
                    err = 0  # (a loopback or LAN peer has often answered already: no loop round trip)
                if err == errno.EINPROGRESS:
                    with anyio.move_on_after(self.connect_timeout):
                        await anyio.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or (0 if _peer(sock) else
                                                                                   errno.ETIMEDOUT)
            except BaseException:
                sock.close()
                raise
            if err == 0:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.upstream, conn.address = sock, addr
                return
            sock.close()
            last = f"{addr}: {os.strerror(err)}"
        raise _Denied(Refused("upstream", f"cannot connect to {name}:{port} ({last})"))

    async def _send_up(self, conn: _Conn, data: bytes) -> None:
        if data:
            assert conn.upstream is not None
            room = self._room()
            if room is not None and len(data) > room:
                raise self._spent()
            self._count(conn, len(data), up=True)  # (counted first: what is sent is spent, whoever waits)
            await _send_all(conn.upstream, data)

    def _room(self) -> int | None:
        """Bytes the sandbox may still move (None: no budget)."""
        if self.max_bytes is None:
            return None
        return max(0, self.max_bytes - self.bytes_up - self.bytes_down)

    def _spent(self) -> _Denied:
        return _Denied(Refused("bytes", f"the sandbox's byte budget ({self.max_bytes}) is spent (net.max_bytes)"))

    def _count(self, conn: _Conn, n: int, *, up: bool) -> None:
        if up:
            conn.up += n
            self.bytes_up += n
        else:
            conn.down += n
            self.bytes_down += n

    async def _relay(self, conn: _Conn, up_limit: int | None) -> None:
        """Both directions until both have ended. `up_limit`: bytes the client
        may still send (plain HTTP: the rest of the body; then it is not read)."""
        assert conn.upstream is not None
        if up_limit == 0:  # (plain HTTP without a body: one direction, no task group)
            await self._pump(conn, conn.upstream, conn.client, False, None)
            return
        failures: list[BaseException] = []

        async def pump(src: socket.socket, dst: socket.socket, up: bool, limit: int | None,
                       scope: anyio.CancelScope) -> None:
            try:
                await self._pump(conn, src, dst, up, limit)
            except (OSError, _Denied) as e:
                failures.append(e)  # kept out of the task group: it would come out as an ExceptionGroup
                scope.cancel()

        async with anyio.create_task_group() as tg:
            if up_limit is None or up_limit > 0:
                tg.start_soon(pump, conn.client, conn.upstream, True, up_limit, tg.cancel_scope)
            await pump(conn.upstream, conn.client, False, None, tg.cancel_scope)
            if up_limit is not None:
                tg.cancel_scope.cancel()  # the response is complete: what the client still sends is not read
        if failures:
            raise failures[0]

    async def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, up: bool, limit: int | None) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_CHUNK)
            flags = _SPLICE_F_MOVE | _SPLICE_F_NONBLOCK
            sfd, dfd = src.fileno(), dst.fileno()
            rounds = 0
            while limit is None or limit > 0:
                want = SPLICE_CHUNK if limit is None else min(SPLICE_CHUNK, limit)
                room = self._room()  # the budget is shared by every connection of the sandbox: take no more
                if room is not None and room < want:  # than is left, and count it before anything waits
                    if room == 0:
                        await anyio.wait_readable(src)
                        if _at_eof(src):
                            break
                        raise self._spent()
                    want = room
                try:
                    n = os.splice(sfd, w, want, flags=flags)
                except BlockingIOError:
                    await anyio.wait_readable(src)
                    continue
                if n == 0:
                    break
                self._count(conn, n, up=up)
                left = n
                while left:
                    try:
                        left -= os.splice(r, dfd, left, flags=flags)
                    except BlockingIOError:
                        await anyio.wait_writable(dst)
                if limit is not None:
                    limit -= n
                rounds += 1
                if rounds % 16 == 0:
                    await anyio.lowlevel.checkpoint()  # a fast pair may not keep the loop to itself
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        finally:
            os.close(r)
            os.close(w)

    # ---- events and figures

    def _tally(self, domain: str, allowed: bool, up: int, down: int) -> None:
        key = domain if domain in self._domains or len(self._domains) < _MAX_DOMAINS else "(other)"
        d = self._domains.setdefault(key, [0, 0, 0, 0])
        d[0 if allowed else 1] += 1
        d[2] += up
        d[3] += down

    def _refuse(self, conn: _Conn, refused: Refused) -> None:
        self.attempts += 1
        self.denied += 1
        self._by_code[refused.code] = self._by_code.get(refused.code, 0) + 1
        self._tally(conn.domain or "?", False, conn.up, conn.down)
        self._on_event(EgressEvent(time=conn.t0, protocol=conn.protocol, domain=conn.domain or "?", port=conn.port,
                                   address=conn.address, allowed=False, code=refused.code, reason=refused.reason,
                                   bytes_up=conn.up, bytes_down=conn.down,
                                   duration_s=time.monotonic() - conn.m0))

    def _done(self, conn: _Conn) -> None:
        self.attempts += 1
        self.allowed += 1
        self._tally(conn.domain, True, conn.up, conn.down)
        self._on_event(EgressEvent(time=conn.t0, protocol=conn.protocol, domain=conn.domain, port=conn.port,
                                   address=conn.address, allowed=True, code="ok", reason="allowed",
                                   bytes_up=conn.up, bytes_down=conn.down, duration_s=time.monotonic() - conn.m0))

    def statistics(self) -> EgressStatistics:
        return EgressStatistics(
            connections=self.attempts, allowed=self.allowed, denied=self.denied, active=len(self._conns),
            bytes_up=self.bytes_up, bytes_down=self.bytes_down, denied_by_code=dict(self._by_code),
            domains={k: DomainStatistics(allowed=v[0], denied=v[1], bytes_up=v[2], bytes_down=v[3])
                     for k, v in self._domains.items()},
            strangers=self.strangers)


# ---------------------------------------------------------------- socket helpers


def bound_pair(kind: int, hosts: tuple[str, str], port: int, *, freebind: bool = False) -> list[socket.socket]:
    """Sockets of `kind` bound to (IPv4 host, port) and (IPv6 host, port),
    non-blocking; the IPv6 one IPv6 only, and left out where the host or the
    namespace has no IPv6 (nothing could reach it there either)."""
    made: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, hosts[0]), (socket.AF_INET6, hosts[1])):
            try:
                s = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            made.append(s)
            if freebind:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)  # (::1 may still be coming up)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if family == socket.AF_INET6 and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    made.pop().close()
                    continue
                raise
    except BaseException:
        for s in made:
            s.close()
        raise
    return made


async def resolve(name: str, port: int, limiter: anyio.CapacityLimiter | None = None) -> list[str]:
    """The host resolver's addresses for `name`, in a worker thread that
    `limiter` counts until it ends (a cancelled lookup's thread runs on until
    the resolver answers, and keeps its token); tests replace it."""
    infos = await anyio.to_thread.run_sync(functools.partial(socket.getaddrinfo, name, port, type=socket.SOCK_STREAM),
                                           abandon_on_cancel=True, limiter=limiter)
    return [str(info[4][0]) for info in infos]


async def _recv(sock: socket.socket, n: int) -> bytes:
    while True:
        try:
            data = sock.recv(max(1, n))
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "closed")
        return data


def _recv_ready(sock: socket.socket, n: int) -> bytes:
    """What has arrived already (b"" if nothing yet); ConnectionResetError at
    EOF, as `_recv`."""
    try:
        data = sock.recv(n)
    except BlockingIOError:
        return b""
    if not data:
        raise ConnectionResetError(errno.ECONNRESET, "closed")
    return data


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def _send_quietly(sock: socket.socket, data: bytes) -> None:
    if not data:
        return
    with anyio.move_on_after(1.0), contextlib.suppress(OSError):
        await _send_all(sock, data)


def _at_eof(sock: socket.socket) -> bool:
    """The peer has closed its side and nothing is left to read (a socket that is readable)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _peer(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _close_socket(s: socket.socket) -> None:
    if s.fileno() >= 0:
        with contextlib.suppress(Exception):
            anyio.notify_closing(s)
        s.close()


def _close(conn: _Conn) -> None:
    for s in (conn.client, conn.upstream):
        if s is not None:
            _close_socket(s)
    if conn.fds:  # (its pipes are closed by its pump, which has ended or is being cancelled)
        _capacity.GATE.give_fds(conn.fds)
        conn.fds = 0
