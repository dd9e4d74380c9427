"""Attacks on the egress proxy (net.mode = "domains"). Each sends from inside
the sandbox what a hostile program would, and checks what the HOST saw: the
upstream servers' logs of requests, TLS handshakes and accepted connections,
the proxy's events and figures. Every server is on 127.0.0.1; the allowed
name `pkgs.test` is pinned to it."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest
import trio

import zviz
from zviz import _egress

from ..egress_servers import Server, TlsEcho, self_signed
from ..test_egressproto import client_hello

# A client run inside the sandbox: one raw exchange per argument set, the
# bytes it got back (or the error) printed as JSON.
CLIENT = r'''
import json, socket, sys, time
def xchg(send, wait=2.0, family=socket.AF_INET, host="127.0.0.1", port=3128, chunks=None):
    s = socket.socket(family)
    s.settimeout(wait)
    try:
        s.connect((host, port))
    except OSError as e:
        return {"connect_errno": e.errno}
    got = b""
    try:
        for part in (chunks or [send]):
            s.sendall(bytes.fromhex(part))
            if chunks:
                time.sleep(0.05)
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except OSError as e:
        return {"got": got.decode("latin-1"), "errno": e.errno}
    return {"got": got.decode("latin-1"), "eof": True}
print(json.dumps([xchg(**a) for a in json.loads(sys.argv[1])]))
'''


def _hex(b: bytes) -> str:
    return b.hex()


@pytest.fixture
def upstream():
    srv = Server({"/hello": ("text/plain", b"hello from pkgs.test\n")})
    yield srv
    srv.close()


def _policy(port: int, names=("pkgs.test",), **kw) -> zviz.Policy:
    net = zviz.Network.domains(list(names), ports=[port], hosts={"pkgs.test": "127.0.0.1"}, **kw)
    return zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))


async def _exchange(sb, calls: list[dict]) -> list[dict]:
    await sb.write_file("client.py", CLIENT)
    r = await sb.run(["python3", "client.py", json.dumps(calls)])
    assert r.status == 0, r.stderr.decode()
    return json.loads(r.stdout)


def _egress_events(sb):
    return [e for e in sb.events_so_far() if isinstance(e, zviz.EgressEvent)]


@pytest.mark.trio
async def test_names_addresses_and_request_tricks_are_refused(upstream, proxy_way):
    P = upstream.port
    tricks = [
        f"GET http://evil.test:{P}/hello HTTP/1.1\r\nHost: evil.test:{P}\r\n\r\n",  # not allowed
        f"GET http://127.0.0.1:{P}/hello HTTP/1.1\r\n\r\n",  # the allowed host's raw address
        f"GET http://2130706433:{P}/hello HTTP/1.1\r\n\r\n",  # the same, as an integer
        f"GET http://[::ffff:127.0.0.1]:{P}/hello HTTP/1.1\r\n\r\n",  # the same, IPv4-mapped
        f"CONNECT 127.0.0.1:{P} HTTP/1.1\r\n\r\n",
        f"GET http://pkgs.test:{P}@evil.test:{P}/hello HTTP/1.1\r\n\r\n",  # userinfo trick
        f"GET http://evil.test:{P}/hello HTTP/1.1\r\nHost: pkgs.test:{P}\r\n\r\n",  # Host differs from the target
        f"GET http://pkgs.test:{P}/hello HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        f"CONNECT pkgs.test:{P} HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
        f"GET http://pkgs.test:{P + 1 if P < 65535 else P - 1}/hello HTTP/1.1\r\n\r\n",  # a port not allowed
        "GET http://pkgs.test:99999/hello HTTP/1.1\r\n\r\n",
        f"GET http://pkgs.test.:{P}/hello HTTP/1.1\r\nX: \xff\r\n\r\n",  # invalid bytes
        f"GET http://pkgs.test:{P}/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        f"GET https://pkgs.test:{P}/hello HTTP/1.1\r\n\r\n",
    ]
    async with zviz.open_sandbox(_policy(P)) as sb:
        out = await _exchange(sb, [{"send": _hex(t.encode("latin-1"))} for t in tricks])
        for trick, res in zip(tricks, out, strict=True):
            assert res["got"].startswith(("HTTP/1.1 403", "HTTP/1.1 400")), (trick, res)
        codes = [e.code for e in _egress_events(sb)]
        assert codes == ["not-allowed", "ip", "ip", "ip", "ip", "bad-request", "bad-request", "bad-request",
                         "bad-request", "port", "bad-request", "bad-request", "bad-request", "bad-request"]
        assert all(not e.allowed for e in _egress_events(sb))
    assert upstream.requests == []  # nothing reached the server


@pytest.mark.trio
async def test_allowed_name_with_a_private_address_needs_a_pin(upstream):
    """`localhost` resolves (on the host) to a loopback address: allowed by
    name, refused by address; a name resolving to a mix of public and private
    addresses is refused whole (a rebinding answer)."""
    P = upstream.port
    pol = zviz.Policy.python(net=zviz.Network.domains(["localhost", "mixed.test"], ports=[P]))
    async with zviz.open_sandbox(pol) as sb:
        out = await _exchange(sb, [{"send": _hex(f"GET http://localhost:{P}/hello HTTP/1.1\r\n\r\n".encode())}])
        assert out[0]["got"].startswith("HTTP/1.1 403")
        (ev,) = _egress_events(sb)
        assert (ev.domain, ev.code) == ("localhost", "private-address") and "--add-host localhost:" in ev.reason
    assert upstream.requests == []


@pytest.mark.trio
async def test_a_rebinding_answer_is_refused_whole(upstream, monkeypatch):
    P = upstream.port
    calls = []

    async def fake_resolve(name: str, port: int, limiter=None) -> list[str]:
        calls.append(name)
        return ["93.184.216.34", "127.0.0.1"]

    monkeypatch.setattr(_egress, "resolve", fake_resolve)
    pol = zviz.Policy.python(net=zviz.Network.domains(["rebind.test"], ports=[P]))
    async with zviz.open_sandbox(pol) as sb:
        out = await _exchange(sb, [{"send": _hex(f"GET http://rebind.test:{P}/ HTTP/1.1\r\n\r\n".encode())}])
        assert out[0]["got"].startswith("HTTP/1.1 403")
        assert [e.code for e in _egress_events(sb)] == ["private-address"]
    assert calls == ["rebind.test"] and upstream.requests == []


@pytest.mark.trio
async def test_a_cloud_hosts_public_range_endpoint_is_refused(upstream, monkeypatch):
    """Azure's WireServer answers on 168.63.129.16 (a public-range address)
    from inside its VMs only, as 169.254.169.254 does elsewhere: an allowed
    name that resolves there is refused before any connect."""
    async def fake_resolve(name: str, port: int, limiter=None) -> list[str]:
        return ["168.63.129.16"]

    connects: list[str] = []
    real_connect = _egress.EgressProxy._connect_upstream

    async def spy(self, conn, name, port, addresses):
        connects.extend(addresses)
        await real_connect(self, conn, name, port, addresses)

    monkeypatch.setattr(_egress, "resolve", fake_resolve)
    monkeypatch.setattr(_egress.EgressProxy, "_connect_upstream", spy)
    pol = zviz.Policy.python(net=zviz.Network.domains(["wire.test"], ports=[80]))
    async with zviz.open_sandbox(pol) as sb:
        sb._life.egress.connect_timeout = 0.5
        out = await _exchange(sb, [{"send": _hex(b"GET http://wire.test/machine HTTP/1.1\r\n\r\n"), "wait": 5.0}])
        assert out[0]["got"].startswith("HTTP/1.1 403"), out
        assert [e.code for e in _egress_events(sb)] == ["private-address"]
    assert connects == []  # host side: the proxy never tried to connect there


class _Greedy:
    """A server that takes every byte a connection sends for 0.5 s (a
    server that would serve pipelined requests whatever `Connection` says),
    answering the first request; `seen` holds what each connection sent."""

    def __init__(self) -> None:
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(8)
        self.port = self.lst.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.lst.accept()
            except OSError:
                return
            got, answered, end = b"", False, time.monotonic() + 0.5
            c.settimeout(0.1)
            while time.monotonic() < end:
                try:
                    d = c.recv(65536)
                except TimeoutError:
                    d = None
                if d == b"":
                    break
                got += d or b""
                if not answered and b"\r\n\r\n" in got:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    answered = True
            self.seen.append(got)
            c.close()


@pytest.mark.trio
async def test_pipelined_requests_cannot_switch_hosts():
    srv = _Greedy()
    P = srv.port
    two = (f"GET http://pkgs.test:{P}/hello HTTP/1.1\r\nHost: pkgs.test:{P}\r\n\r\n"
           f"GET http://evil.test:{P}/hello HTTP/1.1\r\nHost: evil.test:{P}\r\n\r\n"
           f"GET /hello HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    first, rest = two.split("\r\n\r\n", 1)
    async with zviz.open_sandbox(_policy(P)) as sb:
        out = await _exchange(sb, [{"send": _hex(two.encode())},  # in one write
                                   {"send": "", "chunks": [_hex((first + "\r\n\r\n").encode()),  # in two
                                                           _hex(rest.encode())]}])
        for o in out:
            assert o["got"].count("HTTP/1.") == 1 and o["got"].endswith("ok"), o
        assert [(e.allowed, e.domain) for e in _egress_events(sb)] == [(True, "pkgs.test")] * 2
    srv.lst.close()
    # host side: one request per connection, for pkgs.test, with Connection: close; nothing of the others
    assert len(srv.seen) == 2, srv.seen
    for seen in srv.seen:
        assert seen.count(b"GET ") == 1 and b"evil" not in seen, seen
        assert seen.startswith(b"GET /hello HTTP/1.1\r\nHost: pkgs.test:") and b"Connection: close" in seen


@pytest.mark.trio
async def test_socks5_cannot_bypass_names_with_address_types(upstream, proxy_way):
    P = upstream.port
    port = struct.pack("!H", P)
    greet = b"\x05\x01\x00"
    frames = [
        greet + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port,  # IPv4
        greet + b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1") + port,  # IPv6
        greet + b"\x05\x01\x00\x03\x09127.0.0.1" + port,  # an address spelled as a name
        greet + b"\x05\x01\x00\x03\x09evil.test" + port,  # a name not allowed
        greet + b"\x05\x02\x00\x03\x09pkgs.test" + port,  # BIND
        greet + b"\x05\x03\x00\x03\x09pkgs.test" + port,  # UDP ASSOCIATE
        b"\x05\x01\x02",  # only username/password offered
    ]
    async with zviz.open_sandbox(_policy(P)) as sb:
        out = await _exchange(sb, [{"send": _hex(f)} for f in frames])
        replies = [bytes(res["got"], "latin-1") for res in out]
        assert [r[:2] for r in replies[:6]] == [b"\x05\x00"] * 6
        assert [r[3] for r in replies[:6]] == [2, 2, 2, 2, 7, 7]  # not allowed; command not supported
        assert replies[6] == b"\x05\xff"
        codes = [e.code for e in _egress_events(sb)]
        assert codes == ["ip", "ip", "ip", "not-allowed", "bad-request", "bad-request", "bad-request"]
        # and the allowed name works over SOCKS5 with TLS only: plain HTTP in a tunnel is refused
        out = await _exchange(sb, [{"send": _hex(greet + b"\x05\x01\x00\x03\x09pkgs.test" + port
                                                 + b"GET /hello HTTP/1.1\r\nHost: evil.test\r\n\r\n")}])
        assert bytes(out[0]["got"], "latin-1")[:6] == b"\x05\x00\x05\x00\x00\x01"
        assert _egress_events(sb)[-1].code == "not-tls"
    assert upstream.requests == []


@pytest.fixture
def tls(tmp_path):
    pair = self_signed(str(tmp_path), "pkgs.test")
    if pair is None:
        pytest.skip("openssl is not installed: the TLS server needs a certificate")
    srv = TlsEcho(*pair)
    yield srv
    srv.close()


@pytest.mark.trio
async def test_sni_must_match_the_tunnel_name(tls, proxy_way):
    P = tls.port
    connect = f"CONNECT pkgs.test:{P} HTTP/1.1\r\nHost: pkgs.test:{P}\r\n\r\n".encode()
    hellos = {
        "sni": client_hello("evil.test"),
        "no-sni": client_hello(None),
        "ech": client_hello("pkgs.test", ech=True),
        "not-tls": f"GET /hello HTTP/1.1\r\nHost: evil.test:{P}\r\n\r\n".encode(),
    }
    async with zviz.open_sandbox(_policy(P)) as sb:
        out = await _exchange(sb, [{"send": _hex(connect + h)} for h in hellos.values()])
        for res in out:
            assert res["got"] == "HTTP/1.1 200 Connection established\r\n\r\n" and res.get("eof"), res
        # a ClientHello split across records and across reads is still read whole (and passes here)
        hello = client_hello("pkgs.test", pad=2000, record=300)
        chunks = [_hex(connect)] + [_hex(hello[i:i + 211]) for i in range(0, len(hello), 211)]
        out2 = await _exchange(sb, [{"send": "", "chunks": chunks, "wait": 3.0}])
        with trio.fail_after(5):  # (its event is recorded once the proxy has seen both sides end)
            while len(_egress_events(sb)) < 5:
                await trio.sleep(0.01)
        codes = [e.code for e in _egress_events(sb)]
        assert codes[:4] == list(hellos)
        assert codes[4] == "ok"  # the server then refused our fake hello: its handshake failed, not ours
        assert out2[0]["got"].startswith("HTTP/1.1 200")
    # host side: only the split, matching ClientHello reached the server
    assert tls.accepted == 1


@pytest.mark.trio
async def test_an_sni_that_only_normalises_to_the_tunnel_name_is_refused(tls):
    """The ClientHello goes upstream as it was sent, so its server name must
    be the tunnel's name as TLS writes it: " pkgs.test", "pkgs.test\t" or
    "pkgs.test\x1f" would normalise to pkgs.test here (names are stripped)
    and reach the server as a name it does not serve (its default site).
    Upper case and one trailing dot are the same name and pass."""
    P = tls.port
    connect = f"CONNECT pkgs.test:{P} HTTP/1.1\r\n\r\n".encode()
    bad = [b" pkgs.test", b"pkgs.test\t", b"pkgs.test\x1f", b"\x0bpkgs.test", b"pkgs.test..", b"pkgs.test\r\n"]
    good = [b"PKGS.test", b"pkgs.test."]
    async with zviz.open_sandbox(_policy(P)) as sb:
        await _exchange(sb, [{"send": _hex(connect + client_hello(raw_names=[n]))} for n in bad + good])
        with trio.fail_after(5):  # (an allowed tunnel's event is recorded once both sides have ended)
            while len(_egress_events(sb)) < len(bad + good):
                await trio.sleep(0.01)
        codes = [e.code for e in _egress_events(sb)]
        assert codes[:len(bad)] == ["sni"] * len(bad), codes
        assert codes[len(bad):] == ["ok"] * len(good), codes
    assert tls.accepted == len(good)  # host side: only the two well-formed names reached the server


@pytest.mark.trio
async def test_the_host_a_server_sees_is_the_name_checked(upstream):
    """Plain HTTP: the proxy writes the Host header itself, as the checked
    name (a server routes on it), not the client's spelling of the target:
    upper case and a trailing dot (which a server may not know as its own
    site's name) do not reach it."""
    P = upstream.port
    async with zviz.open_sandbox(_policy(P)) as sb:
        out = await _exchange(sb, [{"send": _hex(f"GET http://PKGS.Test.:{P}/hello HTTP/1.1\r\n\r\n".encode())},
                                   {"send": _hex(b"GET http://pkgs.test./hello HTTP/1.0\r\n\r\n")}])
        assert out[0]["got"].endswith("hello from pkgs.test\n"), out
        assert [e.code for e in _egress_events(sb)] == ["ok", "port"]  # (port 80 is not allowed here)
    assert upstream.requests == [("GET", "/hello", f"pkgs.test:{P}")]  # host side: the Host it saw


@pytest.mark.trio
async def test_direct_connects_get_a_fast_denial_with_the_fix(upstream, proxy_way):
    """A program that ignores the proxy variables: its connect to the host's
    address (and to the proxy's real port on the host) fails at once
    (supervised: EACCES; inside: ECONNREFUSED from the sandbox's own
    loopback), with an event naming the fix for each either way; nothing
    reaches the host's listeners."""
    P = upstream.port
    async with zviz.open_sandbox(_policy(P)) as sb:
        real = sb._life.egress.address[1]
        calls = [{"send": "", "port": P}, {"send": "", "port": real}, {"send": "", "host": "::1", "port": P,
                                                                        "family": int(socket.AF_INET6)},
                 {"send": "", "host": "::ffff:127.0.0.1", "port": P, "family": int(socket.AF_INET6)}]
        t0 = time.monotonic()
        out = await _exchange(sb, calls)
        assert time.monotonic() - t0 < 10
        err = 13 if proxy_way == "supervised" else 111
        assert [o.get("connect_errno") for o in out] == [err, err, err, err]
        with trio.fail_after(5):
            while len(events := [e for e in sb.events_so_far()
                                 if isinstance(e, zviz.DenialEvent) and e.syscall == "connect"]) < 4:
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # (no more come)
        events = [e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent) and e.syscall == "connect"]
        assert len(events) == 4 and all("HTTP_PROXY" in e.detail for e in events)
        assert sorted(e.detail.split(": ")[0].split(", ")[-1] for e in events) == sorted(
            [f"127.0.0.1:{P}", f"127.0.0.1:{real}", f"[::1]:{P}", f"127.0.0.1:{P}"])  # IPv6: [addr]:port
        if proxy_way == "inside":
            assert sb.statistics().notifications == 0  # the kernel refused them; the host saw their SYNs
        assert sb.statistics().egress.connections == 0
    assert upstream.requests == []


@pytest.mark.trio
async def test_the_proxys_port_elsewhere_reaches_nothing(upstream, proxy_way):
    """Port 3128 on any other address than the sandbox's own 127.0.0.1 and
    ::1 reaches nothing, fast (inside: every address is the sandbox's own
    loopback, where the proxy listens on 127.0.0.1 and ::1 only: refused;
    the supervised way: EACCES for each). The host's own listener on
    127.0.0.2:3128 sees no connection, and neither does the proxy."""
    host_lst = socket.socket()
    host_lst.bind(("127.0.0.2", 3128))
    host_lst.listen(8)
    host_lst.setblocking(False)
    try:
        async with zviz.open_sandbox(_policy(upstream.port)) as sb:
            calls = [{"send": "", "host": "127.0.0.2", "port": 3128},
                     {"send": "", "host": "10.255.255.1", "port": 3128},
                     {"send": "", "host": "::2", "port": 3128, "family": int(socket.AF_INET6)},
                     {"send": "", "host": "::ffff:127.0.0.2", "port": 3128, "family": int(socket.AF_INET6)}]
            t0 = time.monotonic()
            out = await _exchange(sb, calls)
            assert time.monotonic() - t0 < 10
            errs = [o.get("connect_errno") for o in out]
            if proxy_way == "supervised":
                assert errs == [13, 13, 13, 13]
            else:
                assert errs == [111, 111, 111, 111], errs
                with trio.fail_after(5):  # each refused (a reset from the namespace's lo) and seen
                    while len([e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent)]) < 4:
                        await trio.sleep(0.01)
                seen = sorted(e.detail.split(": ")[0] for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent))
                assert seen == sorted(["127.0.0.2:3128", "10.255.255.1:3128", "[::2]:3128", "127.0.0.2:3128"])
            assert sb.statistics().egress.connections == 0 and sb.statistics().egress.strangers == 0
        with pytest.raises(BlockingIOError):
            host_lst.accept()
    finally:
        host_lst.close()
    assert upstream.requests == []


@pytest.mark.trio
async def test_strangers_on_the_host_cannot_use_a_sandbox_proxy(upstream):
    P = upstream.port
    async with zviz.open_sandbox(_policy(P)) as sb:
        host, port = sb._life.egress.address

        def stranger() -> bytes:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(f"GET http://pkgs.test:{P}/hello HTTP/1.1\r\n\r\n".encode())
                try:
                    return s.recv(100)
                except ConnectionResetError:
                    return b""

        assert await trio.to_thread.run_sync(stranger) == b""  # dropped unread
        await trio.sleep(0.05)
        assert sb.statistics().egress.strangers == 1
    assert upstream.requests == []


@pytest.mark.trio
async def test_flood_and_slowloris_are_bounded_and_other_sandboxes_go_on(upstream, proxy_way):
    P = upstream.port
    flood = r'''
import socket, time, sys
socks = []
for i in range(40):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect(("127.0.0.1", 3128)); socks.append(s)
    except OSError:
        pass
time.sleep(0.3)
s = socks[0]
s.sendall(b"GE")  # slowloris: a byte now and then, never a whole head
t0 = time.monotonic(); closed = []
while time.monotonic() - t0 < 8:
    try:
        s.sendall(b"T"); time.sleep(0.2)
        if s.recv(100, socket.MSG_DONTWAIT) == b"": break
    except BlockingIOError:
        continue
    except OSError:
        break
print(round(time.monotonic() - t0, 1))
'''
    pol = _policy(P, max_connections=8)
    async with zviz.open_sandbox(pol) as a, zviz.open_sandbox(_policy(P)) as b:
        a._life.egress.head_timeout = 1.0
        await a.write_file("flood.py", flood)
        took_other: list[float] = []

        async def other():
            await trio.sleep(0.5)
            t = time.monotonic()
            r = await b.run(["python3", "-c", "import urllib.request as u; print(u.urlopen("
                             f"'http://pkgs.test:{P}/hello', timeout=10).read())"])
            took_other.append(time.monotonic() - t)
            assert r.status == 0, r.stderr

        async with trio.open_nursery() as n:
            n.start_soon(other)
            r = await a.run(["python3", "flood.py"])
        assert r.status == 0, r.stderr
        assert float(r.stdout) < 4.0  # the slow head was cut at head_timeout (1 s), not left open
        ev = _egress_events(a)
        assert sum(e.code == "connections" for e in ev) == 32  # 40 - 8 refused at once
        assert sum(e.code == "timeout" for e in ev) >= 1
        assert a.statistics().egress.active == 0
        assert took_other and took_other[0] < 5.0
    assert upstream.requests == [("GET", "/hello", f"pkgs.test:{P}")]  # the other sandbox's only


@pytest.mark.trio
async def test_the_byte_budget_ends_a_transfer(upstream, proxy_way):
    P = upstream.port
    upstream.routes["/big"] = ("application/octet-stream", b"x" * 200_000)
    async with zviz.open_sandbox(_policy(P, max_bytes=50_000)) as sb:
        out = await _exchange(sb, [{"send": _hex(f"GET http://pkgs.test:{P}/big HTTP/1.1\r\n\r\n".encode())}] * 2)
        assert len(out[0]["got"]) < 200_000
        codes = [e.code for e in _egress_events(sb)]
        assert codes == ["bytes", "bytes"]
        assert sb.statistics().egress.bytes_down <= 50_000 + (1 << 20)


@pytest.mark.trio
async def test_closing_the_sandbox_closes_every_proxied_connection(proxy_way):
    """The upstream holds each proxied connection open; closing the sandbox
    must end them on the host side too (the server reads EOF or RST)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    P = lst.getsockname()[1]
    ended: list[bytes] = []

    def serve():
        conns = []
        for _ in range(3):
            c, _ = lst.accept()
            c.settimeout(20)
            c.recv(4096)  # the request head
            conns.append(c)
        ready.set()
        for c in conns:
            try:
                while c.recv(4096):
                    pass
                ended.append(b"eof")
            except OSError:
                ended.append(b"rst")
            c.close()

    ready = threading.Event()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    hold = (r"import socket, time" "\n"
            r"s = [socket.create_connection(('127.0.0.1', 3128)) for _ in range(3)]" "\n"
            f"[x.sendall(b'GET http://pkgs.test:{P}/ HTTP/1.1\\r\\n\\r\\n') for x in s]" "\n"
            r"print('held', flush=True); time.sleep(60)" "\n")
    sb = await zviz.Sandbox.create(_policy(P))
    try:
        proc = await sb.start(["python3", "-c", hold])
        assert await proc.stdout.receive_some() == b"held\n"
        await trio.to_thread.run_sync(ready.wait, 10)
        assert sb.statistics().egress.active == 3
    finally:
        await sb.aclose()
    await trio.to_thread.run_sync(t.join, 10)
    lst.close()
    assert ended and len(ended) == 3
    # and each one is an event (recorded as it was cut)
    cut = [e for e in sb.events_so_far() if isinstance(e, zviz.EgressEvent)]
    assert [(e.allowed, e.domain) for e in cut] == [(True, "pkgs.test")] * 3 and all(e.bytes_up > 0 for e in cut)


def test_domains_mode_as_each_identity(upstream, identity):
    """The same rules for a root caller (a host uid of the sandbox's own) and
    an unprivileged one (uid 65534): the allowed name works, its raw address
    and a direct connect do not."""
    from ..conftest import run_as

    P = upstream.port
    code = ("import socket, urllib.request as u\n"
            f"print(u.urlopen('http://pkgs.test:{P}/hello', timeout=10).read().decode(), end='')\n"
            "try:\n"
            f"    u.urlopen('http://127.0.0.1:{P}/hello', timeout=10)\n"
            "except Exception as e:\n    print(getattr(e, 'code', e))\n"
            "s = socket.socket()\ntry:\n"
            f"    s.connect(('127.0.0.1', {P}))\nexcept OSError as e:\n    print(e.errno)\n")

    def scenario():
        async def main():
            pol = _policy(P)
            async with zviz.open_sandbox(pol) as sb:
                r = await sb.run(["python3", "-c", code], env={"NO_PROXY": "", "no_proxy": ""})
                return r.stdout.decode(), r.stderr.decode(), [e.code for e in _egress_events(sb)]
        return trio.run(main)

    out, err, codes = run_as(identity, scenario)
    # the direct connect: EACCES supervised (uid 65534 may not setns), ECONNREFUSED inside (root)
    assert out == f"hello from pkgs.test\n403\n{111 if identity == 'self' and os.geteuid() == 0 else 13}\n", err
    assert codes == ["ok", "ip"]
    assert upstream.requests == [("GET", "/hello", f"pkgs.test:{P}")]


@pytest.mark.trio
async def test_a_resolver_that_never_answers_does_not_hold_the_connection(upstream, monkeypatch):
    async def never(name: str, port: int, limiter=None) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(_egress, "resolve", never)
    pol = zviz.Policy.python(net=zviz.Network.domains(["slow.test"], ports=[upstream.port]))
    async with zviz.open_sandbox(pol) as sb:
        sb._life.egress.connect_timeout = 0.5
        t = time.monotonic()
        out = await _exchange(sb, [{"send": _hex(f"GET http://slow.test:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()),
                                    "wait": 5.0}])
        assert time.monotonic() - t < 4.0
        assert out[0]["got"].startswith("HTTP/1.1 502")
        assert [e.code for e in _egress_events(sb)] == ["resolve"]
        assert sb.statistics().egress.active == 0
