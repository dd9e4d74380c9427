"""The egress proxy's pure half (`_egressproto`): names, rules, addresses and
the three protocols, without a socket. Every input here is what a hostile
sandbox could send; the parsers are fuzzed too."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from zviz import _egressproto as p
from zviz._egressproto import NEED_MORE, BadRequest

# ---------------------------------------------------------------- names

@pytest.mark.parametrize(("text", "want"), [
    ("PyPI.org.", "pypi.org"), ("files.PYTHONHOSTED.org", "files.pythonhosted.org"),
    ("bücher.de", "xn--bcher-kva.de"), ("xn--bcher-kva.de", "xn--bcher-kva.de"), ("_dmarc.example.com",
                                                                                 "_dmarc.example.com"),
])
def test_names_are_normalised(text, want):
    assert p.normalize_name(text) == want


@pytest.mark.parametrize("text", [
    "", ".", "a..b", "-a.com", "a-.com", "a b.com", "a/b.com", "a@b.com", "a:b", "1.2.3.4", "[::1]", "::1",
    "127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1", "example.123", "a" * 64 + ".com", ("a." * 130) + "com",
    "exa\x00mple.com", "xn--.com", "xn--abc.com", "xn--999999999.com", "ex%61mple.com", "*.com", "a\u200b.com",
])
def test_weird_names_are_refused(text):
    with pytest.raises(ValueError):
        p.normalize_name(text)


def test_wildcards_match_subdomains_only_and_deny_wins():
    r = p.Rules.build(["*.example.com", "pypi.org"], ["bad.example.com"], [443], {})
    assert r.check("a.example.com", 443)[1] is None
    assert r.check("x.y.example.com", 443)[1] is None
    assert r.check("example.com", 443)[1].code == "not-allowed"  # the base is not its own subdomain
    assert r.check("evilexample.com", 443)[1].code == "not-allowed"
    assert r.check("example.com.evil.net", 443)[1].code == "not-allowed"
    assert r.check("BAD.example.com.", 443)[1].code == "denied"
    assert r.check("pypi.org", 80)[1].code == "port"
    assert r.check("PYPI.ORG.", 443) == ("pypi.org", None)
    assert r.check("pypi.org", 0)[1].code == "port" and r.check("pypi.org", 70000)[1].code == "port"


@pytest.mark.parametrize("host", ["1.2.3.4", "151.101.0.223", "[2a04:4e42::223]", "2a04:4e42::223", "127.1",
                                  "0x97.0x65.0.0xdf", "2130706433"])
def test_raw_addresses_are_refused_whatever_they_are(host):
    r = p.Rules.build(["pypi.org"], [], [443], {"pypi.org": ["151.101.0.223"]})
    assert r.check(host, 443)[1].code == "ip"


# ---------------------------------------------------------------- addresses

@pytest.mark.parametrize("addr", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
    "255.255.255.255", "100.64.0.1", "192.0.2.1", "198.18.0.1", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1",
    "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "::127.0.0.1", "2001:db8::1", "fec0::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo: its client is 192.0.2.45 (documentation range)
    "168.63.129.16", "::ffff:168.63.129.16", "64:ff9b::a83f:8110",  # Azure's WireServer, a public-range address
])
def test_non_public_addresses_are_refused(addr):
    assert p.address_refusal(ipaddress.ip_address(addr)) is not None


@pytest.mark.parametrize("addr", ["151.101.0.223", "8.8.8.8", "2a04:4e42::223", "::ffff:8.8.8.8",
                                  "64:ff9b::808:808"])
def test_public_addresses_pass(addr):
    assert p.address_refusal(ipaddress.ip_address(addr)) is None


def test_one_private_answer_refuses_the_name_unless_pinned():
    got, why = p.check_addresses("pkgs.example", ["151.101.0.223", "10.0.0.5"], pinned=False)
    assert got == [] and why.code == "private-address" and "hosts=" in why.reason
    got, why = p.check_addresses("pkgs.test", ["127.0.0.1"], pinned=True)
    assert got == ["127.0.0.1"] and why is None
    assert p.check_addresses("x", [], pinned=False)[1].code == "resolve"
    assert p.check_addresses("x", ["::ffff:8.8.8.8", "8.8.8.8"], pinned=False) == (["8.8.8.8"], None)


# ---------------------------------------------------------------- HTTP heads

def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_connect_and_absolute_form():
    r = p.parse_http_head(_head("CONNECT pypi.org:443 HTTP/1.1", "Host: pypi.org:443") + b"\x16\x03")
    assert (r.host, r.port, r.connect) == ("pypi.org", 443, True)
    assert r.consumed == len(_head("CONNECT pypi.org:443 HTTP/1.1", "Host: pypi.org:443"))
    r = p.parse_http_head(_head("GET http://pkgs.test:8080/simple/x/?a=1 HTTP/1.1", "Host: pkgs.test:8080",
                                "Proxy-Authorization: Basic x", "Proxy-Connection: keep-alive",
                                "Connection: keep-alive", "Accept: */*"))
    assert (r.host, r.port, r.connect) == ("pkgs.test", 8080, False)
    assert r.head == _head("GET /simple/x/?a=1 HTTP/1.1", "Host: pkgs.test:8080", "accept: */*",
                           "Connection: close")
    r = p.parse_http_head(_head("GET http://a.test HTTP/1.0"))
    assert (r.host, r.port) == ("a.test", 80) and r.head.startswith(b"GET / HTTP/1.0\r\n")
    r = p.parse_http_head(_head("CONNECT [2001:db8::1]:443 HTTP/1.1"))
    assert r.host == "2001:db8::1"


def test_a_host_header_without_a_port_names_the_target_at_any_port():
    """Some clients leave the port out of Host even for a port that is not
    the default; the proxy connects to the target (and writes its own Host),
    so that is accepted. A Host with another port or another name is not."""
    r = p.parse_http_head(_head("CONNECT pkgs.test:8443 HTTP/1.1", "Host: pkgs.test"))
    assert (r.host, r.port, r.connect) == ("pkgs.test", 8443, True)
    r = p.parse_http_head(_head("GET http://pkgs.test:8080/simple/ HTTP/1.1", "Host: PKGS.test."))
    assert (r.host, r.port) == ("pkgs.test", 8080) and b"Host: pkgs.test:8080\r\n" in r.head
    # the Host the proxy writes is the checked name, whatever the spelling of the target
    for target, host in (("PKGS.Test.:8080", b"pkgs.test:8080"), ("pkgs.TEST.", b"pkgs.test"),
                         ("pkgs.test:80", b"pkgs.test:80")):
        r = p.parse_http_head(_head(f"GET http://{target}/x HTTP/1.1"))
        assert b"\r\nHost: " + host + b"\r\n" in r.head, r.head
    for head in (_head("CONNECT pkgs.test:8443 HTTP/1.1", "Host: pkgs.test:443"),
                 _head("GET http://pkgs.test:8080/ HTTP/1.1", "Host: pkgs.test:80"),
                 _head("GET http://pkgs.test:8080/ HTTP/1.1", "Host: evil.test")):
        with pytest.raises(p.BadRequest, match="Host header names another host"):
            p.parse_http_head(head)


@pytest.mark.parametrize("head", [
    _head("CONNECT user:pw@pypi.org:443 HTTP/1.1"),
    _head("GET http://allowed.test@evil.test/ HTTP/1.1"),
    _head("GET http://allowed.test:80@evil.test/ HTTP/1.1"),
    _head("GET http://pkgs.test/ HTTP/1.1", "Host: evil.test"),
    _head("CONNECT pkgs.test:443 HTTP/1.1", "Host: evil.test:443"),
    _head("GET http://pkgs.test/ HTTP/1.1", "Host: pkgs.test", "Host: evil.test"),
    _head("GET /relative HTTP/1.1", "Host: pkgs.test"),
    _head("GET https://pkgs.test/ HTTP/1.1"),
    _head("GET ftp://pkgs.test/ HTTP/1.1"),
    _head("CONNECT pkgs.test HTTP/1.1"),
    _head("CONNECT pkgs.test:0 HTTP/1.1"), _head("CONNECT pkgs.test:65536 HTTP/1.1"),
    _head("CONNECT pkgs.test:+443 HTTP/1.1"), _head("CONNECT pkgs.test:0x1bb HTTP/1.1"),
    _head("CONNECT ::1:443 HTTP/1.1"), _head("CONNECT [::1:443 HTTP/1.1"), _head("CONNECT [evil.test]:443 HTTP/1.1"),
    _head("GET http://pkgs.test/ HTTP/2.0"), _head("GET  http://pkgs.test/ HTTP/1.1"),
    _head("G@T http://a.test/ HTTP/1.1"),
    _head("GET http://pkgs.test/ HTTP/1.1", " folded: header"),
    _head("GET http://pkgs.test/ HTTP/1.1", "bad header"),
    _head("GET http://pkgs.test/ HTTP/1.1", "Transfer-Encoding: chunked"),
    _head("POST http://pkgs.test/ HTTP/1.1", "Content-Length: 5", "Content-Length: 6"),
    _head("POST http://pkgs.test/ HTTP/1.1", "Content-Length: -1"),
    _head("GET http://pkgs.tést/ HTTP/1.1"), b"GET http://pkgs.test/ HTTP/1.1\r\nX: \xff\xfe\r\n\r\n",
    b"GET http://pkgs.test/ HTTP/1.1\r\nX: a\rb\r\n\r\n", b"GET http://pkgs.test/ HTTP/1.1\nHost: x\n\n",
    b"GET http://pkgs.test/ HTTP/1.1\r\nX: \x00\r\n\r\n",
    _head("GET http://pkgs.test/ HTTP/1.1", *[f"X-{i}: y" for i in range(101)]),
    b"GET http://pkgs.test/" + b"a" * p.MAX_HEAD + b" HTTP/1.1\r\n",
])
def test_malformed_or_tricky_heads_are_refused(head):
    with pytest.raises(BadRequest):
        p.parse_http_head(head)


def test_a_head_arrives_in_pieces_and_the_rest_waits():
    whole = _head("GET http://pkgs.test/x HTTP/1.1", "Host: pkgs.test") + b"GET http://evil.test/ HTTP/1.1\r\n"
    end = whole.index(b"\r\n\r\n") + 4
    for cut in range(end - 1):
        assert p.parse_http_head(whole[:cut]) is NEED_MORE
    r = p.parse_http_head(whole)
    assert r.consumed == end and r.body_length == 0  # the pipelined request is not part of this one


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_http_heads(data):
    try:
        r = p.parse_http_head(data)
    except BadRequest:
        return
    if r is NEED_MORE:
        return
    assert 0 < r.port < 65536 and r.consumed <= len(data)
    assert "@" not in r.host


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["GET", "CONNECT", "POST"]), st.text(max_size=40), st.text(max_size=20))
def test_fuzz_request_targets(method, target, host):
    data = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("utf-8", "surrogatepass")
    try:
        r = p.parse_http_head(data)
    except (BadRequest, UnicodeError):
        return
    assert r is not NEED_MORE
    assert "@" not in r.host and 0 < r.port < 65536


# ---------------------------------------------------------------- SOCKS5

def test_socks5_frames():
    assert p.parse_socks_greeting(b"\x05") is NEED_MORE
    assert p.parse_socks_greeting(b"\x05\x02\x02") is NEED_MORE
    g = p.parse_socks_greeting(b"\x05\x02\x02\x00")
    assert g.no_auth and g.consumed == 4
    assert not p.parse_socks_greeting(b"\x05\x01\x02").no_auth
    name = b"pypi.org"
    req = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", 443)
    for cut in range(len(req)):
        assert p.parse_socks_request(req[:cut]) is NEED_MORE
    r = p.parse_socks_request(req + b"extra")
    assert (r.host, r.port, r.is_ip, r.consumed) == ("pypi.org", 443, False, len(req))
    r = p.parse_socks_request(b"\x05\x01\x00\x01" + bytes([127, 0, 0, 1]) + struct.pack("!H", 80))
    assert (r.host, r.is_ip) == ("127.0.0.1", True)
    r = p.parse_socks_request(b"\x05\x01\x00\x04" + ipaddress.IPv6Address("::1").packed + struct.pack("!H", 80))
    assert (r.host, r.is_ip) == ("::1", True)
    r = p.parse_socks_request(b"\x05\x01\x00\x03\x07" + b"1.2.3.4" + struct.pack("!H", 80))
    assert r.is_ip  # an address spelled as a name is still an address


@pytest.mark.parametrize(("frame", "code"), [
    (b"\x05\x02\x00\x03\x01a\x00\x50", p.SOCKS_BAD_COMMAND),  # BIND
    (b"\x05\x03\x00\x03\x01a\x00\x50", p.SOCKS_BAD_COMMAND),  # UDP ASSOCIATE
    (b"\x05\x01\x00\x09\x01a\x00\x50", p.SOCKS_BAD_ADDRESS),
    (b"\x05\x01\x00\x03\x03\xff\xfe\xfd\x00\x50", p.SOCKS_BAD_ADDRESS),  # not UTF-8
    (b"\x05\x01\x00\x03\x03a\nb\x00\x50", p.SOCKS_BAD_ADDRESS),
    (b"\x05\x01\x00\x03\x01a\x00\x00", p.SOCKS_NOT_ALLOWED),
])
def test_socks5_refusals(frame, code):
    with pytest.raises(p.SocksRefusal) as e:
        p.parse_socks_request(frame)
    assert e.value.code == code


@pytest.mark.parametrize("frame", [b"\x04\x01\x00\x50", b"\x05\x00", b"\x05\x01\x01\x03"])
def test_socks5_malformed(frame):
    with pytest.raises(BadRequest):
        (p.parse_socks_request if len(frame) == 4 and frame[0] == 5 else p.parse_socks_greeting)(frame)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_socks5(data):
    for fn in (p.parse_socks_greeting, p.parse_socks_request):
        try:
            r = fn(data)
        except BadRequest:
            continue
        if r is not NEED_MORE:
            assert r.consumed <= len(data)


# ---------------------------------------------------------------- TLS ClientHello

def client_hello(sni: str | None = "pypi.org", *, ech: bool = False, pad: int = 0, raw_names: list[bytes] | None = None,
                 record: int = 16384) -> bytes:
    """A ClientHello (TLS records of at most `record` bytes of payload each)."""
    exts = b""
    names = raw_names if raw_names is not None else ([sni.encode()] if sni is not None else [])
    if names:
        entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in names)
        lst = struct.pack("!H", len(entries)) + entries
        exts += struct.pack("!HH", 0, len(lst)) + lst
    if ech:
        exts += struct.pack("!HH", 0xFE0D, 4) + b"\x00\x00\x01\x02"
    if pad:
        exts += struct.pack("!HH", 21, pad) + bytes(pad)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(msg), record):
        frag = msg[i:i + record]
        out += b"\x16\x03\x01" + struct.pack("!H", len(frag)) + frag
    return out


def test_sni_is_read_across_records_and_reads():
    hello = client_hello("PyPI.org", pad=3000, record=512)  # fragmented across 7 records
    for cut in range(0, len(hello), 97):
        assert p.parse_client_hello(hello[:cut]) is NEED_MORE
    h = p.parse_client_hello(hello + b"\x17\x03\x03")
    assert h.server_name == "PyPI.org" and not h.ech
    assert p.sni_refusal(h, "pypi.org") is None


def test_sni_mismatch_missing_and_ech_are_refused():
    assert p.sni_refusal(p.parse_client_hello(client_hello("evil.test")), "pypi.org").code == "sni"
    assert p.sni_refusal(p.parse_client_hello(client_hello(None)), "pypi.org").code == "no-sni"
    assert p.sni_refusal(p.parse_client_hello(client_hello("pypi.org", ech=True)), "pypi.org").code == "ech"
    assert p.sni_refusal(p.parse_client_hello(client_hello("1.2.3.4")), "pypi.org").code == "sni"


@pytest.mark.parametrize(("sni", "ok"), [
    (b"pypi.org", True), (b"PyPI.ORG", True), (b"pypi.org.", True), (b" pypi.org", False), (b"pypi.org\t", False),
    (b"pypi.org\x1c", False), (b"pypi.org..", False), (b".pypi.org", False), (b"pypi.org\x00", False),
])
def test_the_sni_is_checked_as_sent_not_as_normalised(sni, ok):
    refused = p.sni_refusal(p.parse_client_hello(client_hello(raw_names=[sni])), "pypi.org")
    assert (refused is None) == ok, refused


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n", b"\x17\x03\x03\x00\x05hello", b"\x16\x02\x00\x00\x05hello",
    b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\xff\xff",
    client_hello(raw_names=[b"a.test", b"b.test"]), client_hello(raw_names=[b"p\xffypi.org"]),
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
    b"\x16\x03\x01\x00\x08\x01\xff\xff\xff" + bytes(4),  # a 16 MiB ClientHello
])
def test_malformed_client_hellos_are_refused(data):
    with pytest.raises(BadRequest):
        p.parse_client_hello(data)


def test_truncated_client_hello_inside_a_complete_record_is_refused():
    hello = client_hello("pypi.org")
    body = hello[5:]
    short = body[:4] + body[4:-10]  # the handshake header claims more than the message holds...
    short = b"\x01" + (len(short) - 4).to_bytes(3, "big") + short[4:]  # ...now consistent, but cut inside the SNI
    with pytest.raises(BadRequest):
        p.parse_client_hello(b"\x16\x03\x01" + struct.pack("!H", len(short)) + short)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_client_hello(data):
    try:
        p.parse_client_hello(b"\x16\x03\x01" + struct.pack("!H", max(1, len(data))) + data)
    except BadRequest:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2000), st.integers(1, 2000))
def test_fuzz_client_hello_splits(pad, record):
    hello = client_hello("pypi.org", pad=pad, record=record)
    assert p.parse_client_hello(hello).server_name == "pypi.org"
    assert p.parse_client_hello(hello[:-1]) is NEED_MORE


def test_proxy_environment():
    env = p.proxy_environment()
    assert env["HTTPS_PROXY"] == env["http_proxy"] == f"http://127.0.0.1:{p.PROXY_PORT}"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert env["NODE_USE_ENV_PROXY"] == "1"  # (Node's fetch ignores the rest without it)
