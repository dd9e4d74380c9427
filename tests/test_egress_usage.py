"""net.mode = "domains" as a user meets it: what a misconfigured client, a
mistyped flag or a refused request gets told. Every server is on 127.0.0.1
(or ::1), reached by a name pinned with `hosts=`; nothing leaves the machine."""

from __future__ import annotations

import pytest

import zviz
from zviz import _egressproto as p

from .egress_servers import Server

SYS_PY = "/usr/bin/python3"


@pytest.fixture
def web():
    srv = Server({"/hello": ("text/plain", b"hello from pkgs.test\n")})
    yield srv
    srv.close()


def _policy(port: int, **kw) -> zviz.Policy:
    net = zviz.Network.domains(["pkgs.test"], ports=[port], hosts={"pkgs.test": "127.0.0.1"}, **kw)
    return zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))


def _egress(sb) -> list[zviz.EgressEvent]:
    return [e for e in sb.events_so_far() if isinstance(e, zviz.EgressEvent)]


# ---------------------------------------------------------------- another protocol at the proxy

@pytest.mark.parametrize(("first", "says"), [
    (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00pkgs.test\x00", "SOCKS4"),  # socks4a://
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "https://"),  # a proxy URL written https://
    (b"\x00\x01\x02", "not an HTTP request"), (b"\r\nGET", "not an HTTP request"),
    (b"G\x00T / HTTP/1.1", "not an HTTP request"), (b"A" * 40, "not an HTTP request"),
])
def test_another_protocol_is_refused_from_its_first_bytes(first, says):
    with pytest.raises(p.NotHttp, match=says) as e:
        p.parse_http_head(first)
    assert "socks5h://127.0.0.1:3128" in str(e.value) and e.value.reply


@pytest.mark.parametrize("start", [b"G", b"GET", b"GET ", b"CONNECT pkgs.te", b"M-SEARCH", b"A" * 32])
def test_the_start_of_a_request_waits_for_the_rest(start):
    assert p.parse_http_head(start) is p.NEED_MORE


@pytest.mark.trio
async def test_a_client_speaking_another_protocol_is_answered_at_once(web):
    """A SOCKS4 client (socks4a://), a TLS handshake (a proxy URL written
    https://) and bytes of nothing known each get an answer at once and an
    event naming the fix (they waited 10 s for the head's timeout)."""
    code = """
import socket, time
for first in (b"\\x04\\x01\\x00\\x50\\x00\\x00\\x00\\x01\\x00pkgs.test\\x00", b"\\x16\\x03\\x01\\x00\\x05hello",
              b"\\x00\\x00\\x00\\x00"):
    t = time.monotonic()
    s = socket.create_connection(("127.0.0.1", 3128))
    s.settimeout(30)
    s.sendall(first)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(round(time.monotonic() - t, 2), data[:12])
"""
    async with zviz.open_sandbox(_policy(web.port)) as sb:
        r = await sb.run([SYS_PY, "-c", code])
        lines = r.stdout.decode().splitlines()
        assert len(lines) == 3, r.stderr
        took = [float(ln.split()[0]) for ln in lines]
        assert max(took) < 3, lines
        assert lines[0].endswith(repr(b"\x00\x5b" + bytes(6))), lines  # SOCKS4: request rejected
        assert "HTTP/1.1 400" in lines[1] and "HTTP/1.1 400" in lines[2], lines
        events = _egress(sb)
        assert [e.code for e in events] == ["bad-request"] * 3, events
        assert "SOCKS4" in events[0].reason and "https://" in events[1].reason
        assert all("socks5h://127.0.0.1:3128" in e.reason and not e.allowed for e in events)
        assert not web.requests


# ---------------------------------------------------------------- refusals name the fix

def test_each_refusal_of_a_name_says_what_to_change():
    rules = p.Rules.build(["pkgs.test", "*.ok.test"], ["*.bad.ok.test"], [80, 443], {})
    name, why = rules.check("x.bad.ok.test", 443)
    assert name == "x.bad.ok.test"
    assert why.code == "denied" and "'*.bad.ok.test'" in why.reason and "deny_domains" in why.reason
    _, why = rules.check("pkgs.test", 8080)  # an allowed name on a port not allowed
    assert why.code == "port" and "ports=[..., 8080]" in why.reason and "--allow-domain pkgs.test:8080" in why.reason
    _, why = rules.check("other.test", 8080)  # the flag suggested must let the request through
    assert why.code == "not-allowed" and why.reason.endswith("--allow-domain other.test:8080)"), why.reason
    assert "ports=[..., 8080]" in why.reason
    _, why = rules.check("other.test", 443)
    assert why.code == "not-allowed" and why.reason.endswith("--allow-domain other.test)"), why.reason
