"""The pump's fast checks (zviz/_flight.c) against Python's (the authority):
whatever the C check passes, Python's passes; what real clients send first
is passed by C (the fast path is used); DNS reads and answers agree with
zviz/_dns.py. Property tests mutate real ClientHellos, request heads and
queries byte by byte."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from zviz import _dns, _egressdirect, _stage

OK, MORE, PYTHON = 1, 0, -1


def _client_hello(sni: str | None, **kw) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if kw.get("alpn"):
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


HELLO = _client_hello("pkgs.test")
HELLO_ALPN = _client_hello("pkgs.test", alpn=True)
HEADS = [b"GET / HTTP/1.1\r\nHost: pkgs.test\r\n\r\n",
         b"GET /simple/tinypkg/ HTTP/1.1\r\nHost: pkgs.test:8080\r\nUser-Agent: pip/24\r\nAccept: */*\r\n\r\n",
         b"POST /x HTTP/1.0\r\nhost:PKGS.TEST.\r\nContent-Length: 0\r\n\r\n"]


def _python_passes(buf: bytes, name: str, port: int) -> bool:
    return _egressdirect._first_flight(buf, name, port) == (None, True)


def test_what_real_clients_send_first_takes_the_fast_path():
    for hello in (HELLO, HELLO_ALPN):
        assert _stage.flight_check(hello, "pkgs.test", 443) == OK
        assert _python_passes(hello, "pkgs.test", 443)
    for head in HEADS:
        assert _stage.flight_check(head, "pkgs.test", 8080) == OK, head
        assert _python_passes(head, "pkgs.test", 8080), head


@pytest.mark.parametrize(("buf", "why"), [
    (_client_hello("evil.test"), "another name"),
    (_client_hello(None), "no name"),
    (_client_hello("pkgs.test.evil"), "a longer name"),
    (_client_hello("pkgs.tes"), "a shorter name"),
    (HELLO + b"\x17\x03\x03\x00\x01x", "something after the ClientHello"),
    (b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n", "another Host"),
    (b"GET / HTTP/1.1\r\nHost: pkgs.test:81\r\n\r\n", "another port"),
    (b"GET / HTTP/1.1\r\nHost: pkgs.test\r\nHost: evil.test\r\n\r\n", "two Hosts"),
    (b"GET / HTTP/1.1\r\n\r\n", "no Host"),
    (b"GET http://evil.test/ HTTP/1.1\r\nHost: pkgs.test\r\n\r\n", "absolute form"),
    (b"CONNECT pkgs.test:443 HTTP/1.1\r\nHost: pkgs.test\r\n\r\n", "CONNECT"),
    (b"GET / HTTP/1.1\r\nHost: pkgs.test\r\n\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n", "a second request"),
    (b"GET / HTTP/1.1\r\nX: y\r\n Host: pkgs.test\r\n\r\n", "a folded line"),
    (b"GET / HTTP/1.1\nHost: pkgs.test\r\n\r\n", "a bare LF"),
    (b"GET / HTTP/1.1\r\nHost: user@pkgs.test\r\n\r\n", "userinfo"),
    (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", "an IPv6 literal"),
    (b"\x05\x01\x00", "SOCKS5"),
    (b"GET / HTTP/1.1\r\nHost: pkgs.test\x00\r\n\r\n", "a NUL"),
])
def test_refusals_are_never_the_fast_paths(buf, why):
    assert _stage.flight_check(buf, "pkgs.test", 8080) == PYTHON, why


def test_incomplete_flights_wait():
    for part in (HELLO[:3], HELLO[:40], HEADS[0][:20], HEADS[0][:-1]):
        assert _stage.flight_check(part, "pkgs.test", 8080) == MORE


def _mutations() -> st.SearchStrategy[bytes]:
    base = st.sampled_from([HELLO, HELLO_ALPN, *HEADS])

    @st.composite
    def mutated(draw) -> bytes:
        b = bytearray(draw(base))
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
            at = draw(st.integers(0, max(0, len(b) - 1)))
            if kind == "flip" and b:
                b[at] = draw(st.integers(0, 255))
            elif kind == "cut":
                del b[at:]
            elif kind == "insert":
                b[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif b:
                del b[at:at + draw(st.integers(1, 8))]
        return bytes(b)

    return mutated()


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(buf=_mutations(), name=st.sampled_from(["pkgs.test", "pkgs.tes", "kgs.test"]),
       port=st.sampled_from([8080, 443, 80]))
def test_whatever_c_passes_python_passes(buf, name, port):
    if _stage.flight_check(buf, name, port) == OK:
        assert _python_passes(buf, name, port), buf


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_c_passes_no_random_bytes(buf):
    if _stage.flight_check(buf, "pkgs.test", 80) == OK:
        assert _python_passes(buf, "pkgs.test", 80), buf


def _queries() -> st.SearchStrategy[bytes]:
    @st.composite
    def mutated(draw) -> bytes:
        b = bytearray(_dns.query(draw(st.integers(0, 65535)), draw(st.sampled_from(["pkgs.test", "A.b.C"])),
                                 draw(st.sampled_from([1, 28, 16, 255]))))
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(b) - 1))
            b[at] = draw(st.integers(0, 255))
        return bytes(b)

    return mutated()


@settings(max_examples=3000, deadline=None)
@given(q=_queries())
def test_c_reads_a_query_only_as_python_does_and_answers_the_same(q):
    fast = _stage.dns_query_name(q)
    if fast is None:
        return
    name, qtype, end = fast
    parsed = _dns.parse_query(q)  # (C read it: Python must too, the same)
    assert (parsed.name, parsed.qtype, parsed.qclass) == (name, qtype, _dns.CLASS_IN)
    assert len(parsed.question) + 12 == end
    assert _stage.dns_answer(q, end, qtype, bytes([198, 18, 0, 9])) == _dns.answer(
        parsed, addresses=("198.18.0.9",), ttl=_egressdirect.DNS_TTL)
