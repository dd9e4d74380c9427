"""net.mode = "domains" as a user meets it: what a misconfigured client, a
mistyped flag or a refused request gets told. Every server is on 127.0.0.1
(or ::1), reached by a name pinned with `hosts=`; nothing leaves the machine."""

from __future__ import annotations

import pytest
import trio

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
    _, why = rules.check("ok.test", 443)  # the base of a wildcard
    assert why.code == "not-allowed" and why.reason.endswith("'*.ok.test' is for its subdomains only)"), why.reason



@pytest.mark.parametrize(("head", "says"), [
    (b"GET http://pkgs.test:8080/ HTTP/1.1\r\nHost: pkgs.test:9090\r\n\r\n", "('pkgs.test:9090') than the request "
     "target (pkgs.test:8080)"),
    (b"CONNECT pkgs.test:8443 HTTP/1.1\r\nHost: evil.test:8443\r\n\r\n", "('evil.test:8443') than the CONNECT "
     "target (pkgs.test:8443)"),
])
def test_a_host_header_refusal_names_both_hosts(head, says):
    with pytest.raises(p.BadRequest) as e:
        p.parse_http_head(head)
    assert says in e.value.reason and "drop the Host header" in e.value.reason, e.value.reason


# ---------------------------------------------------------------- a program that goes around the proxy

def test_a_direct_connect_names_its_address_unambiguously_and_the_fix():
    assert p.direct_hint(("2606:2800:220:1::1", 443)).startswith("[2606:2800:220:1::1]:443: connections leave only")
    assert p.direct_hint(("93.184.216.34", 443)).startswith("93.184.216.34:443: connections leave only")
    for host, pin in (("127.0.0.1", "127.0.0.1"), ("127.0.0.53", "127.0.0.53"), ("::1", "[::1]")):
        text = p.direct_hint((host, 8080))
        assert "own loopback" in text and "NO_PROXY" in text and f"--add-host svc.test:{pin} " in text, text
        assert "--allow-domain svc.test:8080" in text
    assert "own loopback" not in p.direct_hint(("10.0.0.1", 8080)) and "--allow-domain NAME" in p.direct_hint()


@pytest.mark.trio
async def test_a_client_that_no_proxy_sends_to_its_own_loopback_is_told_how_to_reach_the_host(web, proxy_way):
    """`localhost` allowed and pinned to 127.0.0.1: curl follows NO_PROXY and
    connects to the sandbox's own loopback, which it is refused; the event says
    so and how to reach the host's service (it said: use the proxy and allow
    the name, both of which the user had done). An IPv6 destination is written
    [addr]:port, and a TCP Fast Open send names the fix too."""
    net = zviz.Network.domains(["localhost"], ports=[web.port], hosts={"localhost": "127.0.0.1"})
    code = """
import socket
for fam, a in ((socket.AF_INET6, ("::2", 3128)), (socket.AF_INET, ("93.184.216.34", 80))):
    s = socket.socket(fam)
    s.settimeout(20)
    try:
        if fam == socket.AF_INET:
            s.sendto(b"GET / HTTP/1.0\\r\\n\\r\\n", socket.MSG_FASTOPEN, a)
        else:
            s.connect(a)
    except OSError as e:
        print(e.errno)
"""
    async with zviz.open_sandbox(zviz.Policy.shell(net=net, limits=zviz.Limits(wall_s=60))) as sb:
        r = await sb.run(["curl", "-sS", f"http://localhost:{web.port}/hello"])
        assert r.exit_code == 7 and not web.requests, r.stderr  # couldn't connect
        r = await sb.run([SYS_PY, "-c", code])
        assert r.stdout.split() == ([b"13", b"13"] if proxy_way == "supervised" else [b"111", b"13"])
        with trio.fail_after(5):  # (inside, the host reads the kernel's resets in the proxy's task)
            while not ([e for e in sb.events_so_far() if "::2" in getattr(e, "detail", "")]
                       and [e for e in sb.events_so_far() if f"127.0.0.1:{web.port}" in getattr(e, "detail", "")]):
                await trio.sleep(0.01)
        details = [e.detail for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent)]
        (lo,) = [d for d in details if f"127.0.0.1:{web.port}" in d]
        assert "own loopback" in lo and "--add-host svc.test:127.0.0.1" in lo, lo
        (v6,) = [d for d in details if "::2" in d]
        assert "[::2]:3128: connections leave only" in v6, v6
        (tfo,) = [d for d in details if "MSG_FASTOPEN" in d]
        assert "HTTPS_PROXY" in tfo and "--allow-domain" in tfo, tfo


# ---------------------------------------------------------------- the command line

def _cli_net(*flags: str, policy_file: str | None = None) -> zviz.Network:
    from zviz import _cli

    args = ["run", *(["--policy", policy_file] if policy_file else []), *flags, "--", "true"]
    return _cli._policy_from_args(_cli._parser().parse_args(args)).net


@pytest.mark.parametrize("item", ["a.test:http", "a.test:", "a.test:0", "a.test:65536", "a.test:\u0663"])
def test_allow_domain_with_a_bad_port_names_the_flag(item):
    with pytest.raises(zviz.PolicyError, match=r"'--allow-domain'.*NAME:PORT, PORT a number from 1 to 65535"):
        _cli_net("--allow-domain", item)


@pytest.mark.parametrize(("item", "says"), [
    ("pkgs.test", "a name, a colon, an address"), ("pkgs.test=127.0.0.1", "a name, a colon, an address"),
    (":127.0.0.1", "a name, a colon, an address"), ("[::1]:pkgs.test", "'[' is not a host name"),
    ("127.0.0.1:pkgs.test", "'127.0.0.1' is an IP address"), ("pkgs.test:127.0.0.1:80", "'127.0.0.1:80' is not an IP"),
    ("pkgs.test:localhost", "'localhost' is not an IP address"), ("pkgs.test:[::1", "'[::1' is not an IP address"),
    ("*.pkgs.test:127.0.0.1", "a pin is for one name, not a pattern"),
])
def test_a_malformed_add_host_names_the_flag_and_what_is_wrong(item, says):
    """(it named net.hosts, or said '[' was not a host name, or took 'pkgs.test:[::1' as ::1)"""
    with pytest.raises(zviz.PolicyError) as e:
        _cli_net("--allow-domain", "pkgs.test", "--allow-domain", "*.pkgs.test", "--add-host", item)
    assert "'--add-host'" in str(e.value) and "NAME:IP, e.g. pkgs.test:127.0.0.1 or pkgs.test:[::1]" in str(e.value)
    assert says in str(e.value), e.value


@pytest.mark.parametrize(("flags", "says"), [
    (["--allow-domain", "a b"], "'--allow-domain'.*'a b' is not a host name"),
    (["--allow-domain", "*"], "'--allow-domain'.*a wildcard is only allowed as the whole first label"),
    (["--allow-domain", "a..b:8080"], r"'--allow-domain'.*'a\.\.b' is not a host name"),
    (["--allow-domain", "https://pypi.org/simple"], "'--allow-domain'.*not a URL: pypi.org"),
    (["--allow-domain", "http://pkgs.test:8080"], "'--allow-domain'.*not a URL: pkgs.test:8080"),
    (["--allow-domain", "*.org"], r"'--allow-domain'.*'\*\.org' allows every site under the top-level domain"),
    (["--allow-domain", "*.COM.:443"], r"'--allow-domain'.*'\*\.com' allows every site under the top-level domain"),
    (["--allow-domain", "a.test", "--deny-domain", "x y"], "'--deny-domain'.*'x y' is not a host name"),
    (["--allow-domain", "a.test", "--deny-domain", "b.a.test:8080"], "'--deny-domain'.*a name without a port: "
     r"b\.a\.test \(a deny rule covers every port\)"),
])
def test_a_malformed_domain_flag_names_the_flag(flags, says):
    """(they named net.allow_domains / net.deny_domains; a URL got "PORT a number")"""
    with pytest.raises(zviz.PolicyError, match=says):
        _cli_net(*flags)


def test_add_host_for_a_name_no_allow_domain_allows_is_refused(tmp_path):
    """A pin nothing allows is never used: most often a typo of the allowed
    name, which then goes to DNS (and is refused, or reaches what DNS says)."""
    with pytest.raises(zviz.PolicyError, match=r"'--add-host'.*pkg\.test is not: add --allow-domain pkg\.test"):
        _cli_net("--allow-domain", "pkgs.test:8080", "--add-host", "pkg.test:127.0.0.1")
    pol = tmp_path / "p.toml"
    pol.write_text('preset = "shell"\n[net]\nmode = "domains"\nallow_domains = ["*.corp.test"]\n')
    with pytest.raises(zviz.PolicyError, match=r"corp\.test is not"):  # *. is for subdomains only
        _cli_net("--add-host", "corp.test:10.0.0.1", policy_file=str(pol))
    net = _cli_net("--add-host", "Pkgs.Corp.Test.:10.0.0.1", "--add-host", "x.corp.test:[::1]", policy_file=str(pol))
    assert dict(net.hosts) == {"pkgs.corp.test": ("10.0.0.1",), "x.corp.test": ("::1",)}
    net = _cli_net("--allow-domain", "pkgs.test:8080", "--add-host", "PKGS.test:127.0.0.1")
    assert net.ports == (80, 443, 8080) and dict(net.hosts) == {"pkgs.test": ("127.0.0.1",)}


# ---------------------------------------------------------------- the policy

@pytest.mark.parametrize(("names", "says"), [
    (["https://pypi.org/simple"], "expected a domain name, not a URL: 'pypi.org'"),
    (["pkgs.test:8080"], "expected a domain name without a port: 'pkgs.test', and the port in net.ports"),
    (["*.pkgs.test:8080"], "expected a domain name without a port: '*.pkgs.test'"),
])
def test_a_url_or_a_port_in_a_name_says_what_was_meant(names, says):
    """(both said a label was not letters, digits and inner hyphens)"""
    with pytest.raises(zviz.PolicyError) as e:
        zviz.Network.domains(names)
    assert says in str(e.value), e.value
    with pytest.raises(zviz.PolicyError) as e:
        zviz.Network.domains(["a.test"], deny=names)
    assert "net.deny_domains" in str(e.value), e.value
    if "port" in says:  # a deny rule has no port
        assert "a deny rule covers every port" in str(e.value) and "net.ports" not in str(e.value), e.value
    else:
        assert says in str(e.value), e.value


@pytest.mark.parametrize("value", [0, -1, 2.5, True, None, "64"])
def test_max_connections_says_what_it_takes(value):
    with pytest.raises(zviz.PolicyError, match=r"net\.max_connections") as e:
        zviz.Network.domains(["a.test"], max_connections=value)
    assert str(e.value).endswith("expected a positive whole number (connections open at once)"), e.value


def test_pins_of_one_name_written_two_ways_are_merged():
    """`PKGS.test` and `pkgs.test.` are the same name: both pins are kept (the
    last one silently replaced the other)."""
    net = zviz.Network.domains(["pkgs.test"], hosts={"PKGS.test": "127.0.0.1", "pkgs.test.": ["::1", "127.0.0.1"]})
    assert dict(net.hosts) == {"pkgs.test": ("127.0.0.1", "::1")}
    net = _cli_net("--allow-domain", "pkgs.test", "--add-host", "PKGS.test:127.0.0.1", "--add-host", "pkgs.test:[::1]")
    assert dict(net.hosts) == {"pkgs.test": ("127.0.0.1", "::1")}


# ---------------------------------------------------------------- the docs

def test_every_refusal_code_is_documented():
    """An EgressEvent's `code` is what a program (or a person) branches on:
    each one the proxy can give is in docs/network.md and docs/api.md."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codes = set()
    for module in ("_egress.py", "_egressproto.py", "_egressdirect.py"):
        with open(os.path.join(root, "zviz", module)) as f:
            codes |= set(re.findall(r'Refused\(\s*"([a-z-]+)"', f.read()))
    assert {"not-allowed", "port", "bad-request", "bytes"} <= codes
    for doc in ("network.md", "api.md"):
        with open(os.path.join(root, "docs", doc)) as f:
            line = next(ln for ln in f if "`ok`, or why not:" in ln)
        missing = sorted(c for c in codes if f"`{c}`" not in line)
        assert not missing, f"docs/{doc} does not list the refusal codes {missing}"


# ---------------------------------------------------------------- the blocking facade, once closed

def test_a_closed_sync_sandbox_says_so_and_keeps_its_figures(web):
    """After `with zviz.sync.open_sandbox(...)`, what the code reached can
    still be read (as with the async API), a second close() does nothing, and
    every call that would run something is a SandboxClosedError (all were
    "RuntimeError: This portal is not running")."""
    with zviz.sync.open_sandbox(_policy(web.port)) as sb:
        r = sb.run([SYS_PY, "-c", f"import urllib.request as u; print(u.urlopen('http://pkgs.test:{web.port}/hello')"
                    ".read())"])
        assert r.stdout == b"b'hello from pkgs.test\\n'\n", r.stderr
    assert sb.closed
    st = sb.statistics().egress
    assert st.allowed == 1 and st.domains["pkgs.test"].bytes_down > 0
    assert [e.domain for e in sb.events_so_far() if isinstance(e, zviz.EgressEvent)] == ["pkgs.test"]
    sb.close()  # idempotent
    for call in (lambda: sb.run(["true"]), lambda: sb.set_network(zviz.Network.domains(["other.test"])),
                 lambda: sb.files.read("x"), lambda: sb.write_file("x", "y")):
        with pytest.raises(zviz.SandboxClosedError, match="closed"):
            call()


# ---------------------------------------------------------------- allow mode: names need domains

@pytest.mark.trio
async def test_a_dns_lookup_in_allow_mode_points_at_domains(web):
    """The issue's first report: `--net HOST:PORT -- pip install ...` fails
    with "Temporary failure in name resolution"; the denied UDP socket of
    that lookup now says which mode serves names."""
    code = ("import socket\ntry:\n    socket.getaddrinfo('pkgs.test', 80)\nexcept OSError as e:\n    print(e.errno)\n")
    net = zviz.Network(mode="allow", allow=[f"127.0.0.1:{web.port}"])
    async with zviz.open_sandbox(zviz.Policy.python(net=net)) as sb:
        r = await sb.run([SYS_PY, "-c", code])
        assert r.stdout.strip() not in (b"", b"0"), r.stderr  # EAI_AGAIN (-3)
        udp = [e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent) and e.syscall == "socket"
               and "type=2" in e.detail]
        assert udp and all("no DNS" in e.detail and "--allow-domain NAME" in e.detail for e in udp), udp
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:  # mode none: nothing of the kind
        await sb.run([SYS_PY, "-c", code])
        udp = [e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent) and e.syscall == "socket"]
        assert udp and not any("--allow-domain" in e.detail for e in udp)


@pytest.mark.parametrize("pattern", ["*.com", "*.COM.", "*.io", "*.xn--p1ai", "*.org"])
def test_an_allow_wildcard_over_a_whole_public_tld_is_refused_everywhere(pattern):
    """`*.com` allowed every .com site (it was accepted as a subdomain rule);
    a deny rule may be that wide, and the special-use TLDs (no public site
    under them) may be wildcarded."""
    with pytest.raises(zviz.PolicyError, match=r"net\.allow_domains.*allows every site under the top-level domain"):
        zviz.Network.domains(["pypi.org", pattern])
    with pytest.raises(zviz.PolicyError, match="allows every site under the top-level domain"):
        zviz.Policy.from_toml(f'preset = "shell"\n[net]\nmode = "domains"\nallow_domains = ["{pattern}"]\n')
    net = zviz.Network.domains(["pypi.org"], deny=[pattern])
    assert net.deny_domains == ("*." + pattern[2:].lower().rstrip("."),)
    for ok in ("*.test", "*.internal", "*.localhost", "*.example.com", "*.co.uk"):
        assert zviz.Network.domains([ok]).allow_domains == (ok,)
