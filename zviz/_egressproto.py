"""The egress proxy's pure half: rules, addresses, and the three protocols a
sandbox speaks to it. No I/O, no trio, no sockets (`_egress` is the shell).

Every byte parsed here comes from inside a sandbox and is hostile. Rules:
1. Names are normalised once (case, trailing dot, IDNA to punycode) and
   anything that is not an ordinary DNS name is refused (`name_error`); IP
   literals are never names: a raw address is refused (`Refused("ip")`),
   whatever it is (pin a name to it with `hosts=`), so a sandbox cannot skip
   the name check by asking for an allowed host's address.
2. A name passes when it matches an `allow` pattern and no `deny` pattern
   (deny wins). `*.x` matches subdomains of x, never x itself.
3. Every address a name resolves to must be public (`address_refusal`):
   private, loopback, link-local (169.254.169.254, the cloud metadata),
   multicast, unspecified, reserved, shared (CGNAT), documentation ranges,
   and IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64,
   6to4, Teredo) whose IPv4 half is not public, are refused unless the
   name is pinned with `hosts=` (a pin is the caller's word).
4. Parsers return a value, `NEED_MORE`, or raise `BadRequest(reason)`;
   each has a size cap, and never buffers more than that.

Why this module is long: the rules and the three parsers (HTTP/1.x heads,
SOCKS5, the TLS ClientHello) share the caps and the refusal values; each
section stands alone, and the ClientHello reader is the one to move out next.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from collections.abc import Iterable, Mapping

import attrs

# ---------------------------------------------------------------- caps

MAX_HEAD = 16 * 1024  # bytes of an HTTP request head (request line and headers)
MAX_HEADERS = 100
MAX_NAME = 253
MAX_CLIENT_HELLO = 64 * 1024  # bytes of ClientHello handshake message (post-quantum key shares fit)
MAX_SOCKS = 600  # bytes of a SOCKS5 greeting plus request (255-byte methods, 255-byte name)

PROXY_PORT = 3128  # where programs in the sandbox find the proxy (on their own loopback)
# The proxy listens inside the sandbox's network namespace where it can (a host process that may
# setns, a zygote): connects to it are then in-kernel. False: every connect is supervised (as without).
LISTEN_INSIDE = True


def kernel_mode(mode: str, *, in_netns: bool = False) -> str:
    """The seccomp network mode a policy's mode needs. "domains" with the
    proxy listening inside the sandbox's own network namespace (`in_netns`,
    see _egress) is "domains": the sockets of "allow" (TCP only), every
    connect made by the kernel, in a namespace holding nothing but the
    sandbox's loopback and the proxy's listener, every destination routed
    to that loopback (`_egresswatch`; Landlock keeps refusing TCP binds).
    Without it, "domains" is
    "allow": every connect supervised, the proxy as the one endpoint."""
    if mode == "domains":
        return "domains" if in_netns else "allow"
    return mode


class BadRequest(ValueError):
    """A malformed or refused frame from the sandbox (`reason` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()

# ---------------------------------------------------------------- names

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def name_error(text: object) -> str | None:
    """Why `text` is not an acceptable DNS name (None: it is)."""
    try:
        normalize_name(text)
    except ValueError as e:
        return str(e)
    return None


def normalize_name(text: object) -> str:
    """The canonical form of a host name: lower case, no trailing dot,
    IDNA labels as punycode (`xn--`). ValueError for anything else: IP
    literals, empty labels, bytes outside the DNS alphabet, over-long names."""
    if not isinstance(text, str):
        raise ValueError(f"a host name must be text, not {type(text).__name__}")
    return _normalize_name(text)


@functools.lru_cache(maxsize=1024)  # (a sandbox asks for the same few names again and again)
def _normalize_name(text: str) -> str:
    name = text.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME * 4:
        raise ValueError(f"{text!r} is not a host name (empty or too long)")
    if is_ip_literal(name):
        raise ValueError(f"{text!r} is an IP address, not a host name")
    if not name.isascii():
        try:
            encoded = name.encode("idna").decode("ascii")
            back = encoded.encode("ascii").decode("idna")
        except (UnicodeError, ValueError):
            raise ValueError(f"{text!r} is not a valid internationalised host name") from None
        if back != name.lower():  # nameprep dropped or changed characters (zero-width, ß, ...): ambiguous
            raise ValueError(f"{text!r} changes under IDNA (to {back!r}): write the name's punycode form")
        name = encoded
    name = name.lower()
    if len(name) > MAX_NAME:
        raise ValueError(f"{text!r} is longer than {MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not (_LABEL.match(label) or (label[:1] == "_" and _LABEL.match(label[1:]))):  # _service labels
            raise ValueError(f"{text!r} is not a host name (label {label!r}: letters, digits and inner hyphens only)")
        if label.startswith("xn--"):
            try:
                ok = label.encode("ascii").decode("idna").encode("idna").decode("ascii") == label
            except (UnicodeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{text!r} has an invalid punycode label {label!r}")
    if labels[-1].isdigit():
        raise ValueError(f"{text!r} is not a host name (an all-numeric last label reads as an address)")
    return name


def is_ip_literal(text: str) -> bool:
    t = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(t.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return True
    # inet_aton's forms resolvers accept: 127.1, 0x7f.1, 2130706433, 0177.0.0.1
    parts = t.split(".")
    return bool(parts) and all(re.fullmatch(r"0[xX][0-9a-fA-F]*|[0-9]+", p or "x") for p in parts)


def normalize_pattern(text: object) -> str:
    """A rule's pattern: a name, or `*.` and a name (subdomains only)."""
    if isinstance(text, str) and text.startswith("*."):
        return "*." + normalize_name(text[2:])
    if isinstance(text, str) and "*" in text:
        raise ValueError(f"{text!r}: a wildcard is only allowed as the whole first label ('*.example.com')")
    return normalize_name(text)


# Top-level domains that name no public site (RFC 6761, RFC 6762, ICANN's
# .internal): a wildcard over one reaches only names pinned with `hosts=`.
SPECIAL_USE_TLDS = frozenset({"test", "example", "invalid", "localhost", "local", "internal"})


def allow_breadth_error(pattern: str) -> str | None:
    """Why an allow rule's normalised `pattern` is too wide to mean what its
    author meant (a wildcard over a whole public top-level domain, `*.com`:
    every site under it), or None. Only top-level domains are caught: a
    wildcard over a shared suffix with two labels (`*.co.uk`, `*.github.io`)
    is not, since that needs the Public Suffix List (docs/network.md)."""
    if pattern.startswith("*.") and "." not in pattern[2:] and pattern[2:] not in SPECIAL_USE_TLDS:
        return (f"{pattern!r} allows every site under the top-level domain {pattern[2:]!r}: name the site, "
                f"e.g. '*.example.{pattern[2:]}' (a deny rule may be that wide)")
    return None


def matches(pattern: str, name: str) -> bool:
    """`name` (normalised) matches `pattern` (normalised): equal, or a strict
    subdomain of a `*.` pattern's base."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])  # ".example.com": at least one more label
    return name == pattern


# ---------------------------------------------------------------- addresses

_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # deprecated, but routed as private where still configured
# Public-range addresses that a cloud host answers itself, like 169.254.169.254: Azure's WireServer
# (VM agent, extension settings, the host's DNS and DHCP), reachable only from inside the VM.
_CLOUD_HOST_ENDPOINTS = frozenset({ipaddress.IPv4Address("168.63.129.16")})
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the
    translation forms (mapped, compatible, NAT64, 6to4, Teredo)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(packed[12:16])
    if packed[:12] == bytes(12) and packed[12:16] not in (bytes(4), b"\0\0\0\1"):  # ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(packed[12:16])
    return None


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the proxy refuses to connect to `ip` for an unpinned name (None:
    it is a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            why = address_refusal(inner)
            return f"{why} (inside the IPv6 address {ip})" if why else None
        if ip.scope_id:
            return "a scoped IPv6 address"
        if ip in _SITE_LOCAL:
            return "a site-local address"
    for test, why in (("is_loopback", "loopback"), ("is_unspecified", "unspecified"),
                      ("is_link_local", "link-local (cloud metadata lives there)"), ("is_multicast", "multicast"),
                      ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, test):
            return f"a {why} address"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if ip in _CLOUD_HOST_ENDPOINTS:
        return "a cloud host's own endpoint (Azure's WireServer)"
    if not ip.is_global:
        return "not a public address (shared or special-purpose range)"
    return None


# ---------------------------------------------------------------- rules


@attrs.frozen
class Refused:
    """Why a connection is refused: `code` (a short key: counted in the
    statistics) and `reason` (for people: it names the fix)."""

    code: str
    reason: str


@attrs.frozen
class Rules:
    """Normalised rules, built by `Rules.build` (from a `Network`)."""

    allow: tuple[str, ...]
    deny: tuple[str, ...]
    ports: frozenset[int]
    hosts: Mapping[str, tuple[str, ...]]  # name -> pinned addresses (normalised name, canonical addresses)

    @classmethod
    def build(cls, allow: Iterable[str], deny: Iterable[str], ports: Iterable[int],
              hosts: Mapping[str, Iterable[str]]) -> Rules:
        pins = {normalize_name(k): tuple(str(canonical_ip(a)) for a in v) for k, v in hosts.items()}
        return cls(allow=tuple(normalize_pattern(p) for p in allow), deny=tuple(normalize_pattern(p) for p in deny),
                   ports=frozenset(ports), hosts=pins)

    def check(self, host: str, port: int) -> tuple[str, Refused | None]:
        """(the normalised name, or the text as given; None when it may be
        tried, else why not). Resolution and the address check come after."""
        if not isinstance(port, int) or not 0 < port < 65536:
            return host, Refused("port", f"port {port} is not a TCP port")
        if is_ip_literal(host):
            return host, Refused("ip", f"{host} is an IP address: zviz allows names only (pin one with hosts= or "
                                 "--add-host NAME:IP and use the name)")
        try:
            name = normalize_name(host)
        except ValueError as e:
            return host[:MAX_NAME], Refused("name", str(e))
        rule = next((p for p in self.deny if matches(p, name)), None)
        if rule is not None:
            return name, Refused("denied", f"{name} matches the deny rule {rule!r} (deny wins over allow: take it "
                                 "out of deny_domains / --deny-domain to reach this name)")
        flag_port = "" if port in self.ports else f":{port}"
        if not any(matches(p, name) for p in self.allow):
            ports = "" if port in self.ports else f", ports=[..., {port}]"
            only = f"; '*.{name}' is for its subdomains only" if f"*.{name}" in self.allow else ""
            return name, Refused("not-allowed", f"{name} is not in the allowed domains (add it: "
                                 f"Network.domains([..., {name!r}]{ports}) or --allow-domain {name}{flag_port}"
                                 f"{only})")
        if port not in self.ports:
            return name, Refused("port", f"port {port} is not allowed for domains (allowed: "
                                 f"{', '.join(map(str, sorted(self.ports)))}; add it: Network.domains([...], "
                                 f"ports=[..., {port}]) or --allow-domain {name}{flag_port})")
        return name, None

    def pinned(self, name: str) -> tuple[str, ...] | None:
        return self.hosts.get(name)


def canonical_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_addresses(name: str, addresses: Iterable[str], pinned: bool) -> tuple[list[str], Refused | None]:
    """The addresses to try, in order, or why none may be. With a pin every
    address is the caller's and passes; otherwise one refused address refuses
    the name (a resolver answer that mixes a public and a private address is
    a rebinding attempt, not a choice)."""
    out: list[str] = []
    for text in addresses:
        try:
            ip = canonical_ip(text)
        except ValueError:
            return [], Refused("address", f"{name} resolved to {text!r}, not an address")
        if not pinned:
            why = address_refusal(ip)
            if why is not None:
                return [], Refused("private-address", f"{name} resolves to {ip}, {why}: pin it with hosts={{{name!r}: "
                                   f"'{ip}'}} or --add-host {name}:{ip} if you mean it")
        if str(ip) not in out:
            out.append(str(ip))
    if not out:
        return [], Refused("resolve", f"{name} has no address")
    return out, None


# ---------------------------------------------------------------- authority (host[:port])


def parse_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or (with a default port) `host`. No userinfo,
    no empty host, a port from 1 to 65535 written in decimal."""
    if "@" in text:
        raise BadRequest("userinfo ('user@host') in a proxy target is refused")
    if not text or any(c in text for c in " \t\r\n\\/?#%") or not text.isascii():
        raise BadRequest(f"not a host[:port]: {text[:80]!r}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest("an unclosed IPv6 literal")
        host, rest = text[1:end], text[end + 1:]
        if not is_ip_literal(host):
            raise BadRequest(f"[{host[:60]}] is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise BadRequest(f"not a host[:port]: {text[:80]!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        else:
            port_text = port_text_
        if ":" in host:
            raise BadRequest("an IPv6 address must be in brackets")
    if port_text is None:
        if default_port is None:
            raise BadRequest("the target needs a port")
        return host, default_port
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise BadRequest(f"port {port_text[:10]!r} is not a TCP port (1-65535)")
    return host, int(port_text)


# ---------------------------------------------------------------- HTTP/1.x request heads

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_HEAD_BYTE = re.compile(rb"[^\x09\x0a\x0d\x20-\x7e]")  # control or non-ASCII: refused in a head
_HOP = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate",
                  b"te", b"trailer", b"upgrade"})


@attrs.frozen
class HttpRequest:
    """A parsed request head. `connect`: CONNECT host:port (a tunnel);
    otherwise a plain-HTTP request in absolute form, with `head` the bytes
    to send upstream (origin form, hop-by-hop headers dropped,
    `Connection: close`) and `body_length` the bytes of body that follow."""

    method: str
    host: str
    port: int
    connect: bool
    head: bytes
    body_length: int
    consumed: int  # bytes of the buffer the head took


class NotHttp(BadRequest):
    """The client's first bytes cannot start an HTTP request (nor a SOCKS5
    greeting): refused at once, with `reply` (what such a client understands),
    not after the head's timeout."""

    def __init__(self, reason: str, reply: bytes) -> None:
        super().__init__(reason)
        self.reply = reply


_MAX_METHOD = 32  # longer than any HTTP method in use


def check_request_start(buf: bytes) -> None:
    """NotHttp when what a client sent first is another protocol: SOCKS4,
    a TLS handshake (a proxy URL written `https://`), or anything whose first
    word is not a method. A client speaking one of those waits for an answer
    that the head's timeout would only give after seconds."""
    fix = (f"use HTTP (HTTP_PROXY/HTTPS_PROXY=http://127.0.0.1:{PROXY_PORT}) or SOCKS5 with names resolved by "
           f"the proxy (ALL_PROXY=socks5h://127.0.0.1:{PROXY_PORT})")
    if buf[:1] == b"\x04":
        raise NotHttp(f"SOCKS4 is not supported: {fix}", b"\x00\x5b" + bytes(6))  # 0x5b: request rejected
    if buf[:1] == b"\x16":
        raise NotHttp(f"a TLS handshake sent to the proxy itself (a proxy URL written https://): the proxy is "
                      f"reached in plain text, the tunnel carries the TLS; {fix}",
                      http_error(400, "not an HTTP request"))
    space = buf.find(b" ", 0, _MAX_METHOD + 1)
    method = buf[:space] if space >= 0 else buf[:_MAX_METHOD + 1]
    if method and (not _TOKEN.match(method) or (space < 0 and len(method) > _MAX_METHOD)):
        raise NotHttp(f"not an HTTP request nor a SOCKS5 greeting: {fix}",
                      http_error(400, "not an HTTP request nor a SOCKS5 greeting"))


def _head(buf: bytes) -> tuple[int, bytes, bytes, bytes, list[tuple[bytes, bytes]]] | _NeedMore:
    """(where the head ends, method, target, version, headers) of the request
    head at the start of `buf`, NEED_MORE, or BadRequest/NotHttp."""
    check_request_start(buf)
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest(f"request head larger than {MAX_HEAD} bytes")
        if b"\n" in buf and b"\r\n" not in buf[: buf.index(b"\n") + 1]:
            raise BadRequest("bare LF line ending")
        return NEED_MORE
    head = buf[:end]
    if _BAD_HEAD_BYTE.search(head):
        raise BadRequest("control or non-ASCII bytes in the request head")
    lines = head.split(b"\r\n")
    if any(b"\n" in ln or b"\r" in ln for ln in lines):
        raise BadRequest("bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("the request line is not 'METHOD TARGET HTTP/1.x'")
    method_b, target_b, version = parts
    if not _TOKEN.match(method_b) or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("the request line is not 'METHOD TARGET HTTP/1.x'")
    headers: list[tuple[bytes, bytes]] = []
    for ln in lines[1:]:
        if ln[:1] in (b" ", b"\t"):
            raise BadRequest("folded header lines (obs-fold) are refused")
        name, sep, value = ln.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest("a malformed header line")
        headers.append((name.lower(), value.strip(b" \t")))
    if len(headers) > MAX_HEADERS:
        raise BadRequest(f"more than {MAX_HEADERS} headers")
    return end, method_b, target_b, version, headers


def origin_request_refusal(buf: bytes, name: str, port: int) -> Refused | _NeedMore | None:
    """The first request of a plain-HTTP connection made straight to `name`
    (direct egress: origin form, sent as the program wrote it): why it may not
    go there (None: it may; NEED_MORE until its head is complete). Its one
    Host header must name `name` (and `port`, when it has one): a server
    routes on it."""
    parsed = _head(buf)
    if isinstance(parsed, _NeedMore):
        return parsed
    _end, method, target, _version, headers = parsed
    if method == b"CONNECT" or not target.startswith(b"/"):
        return Refused("bad-request", "a request sent straight to a server must be in origin form "
                       "('GET /path HTTP/1.1' with a Host header)")
    hosts = [v for n, v in headers if n == b"host"]
    if len(hosts) != 1:
        return Refused("bad-request", f"a request to {name} must carry exactly one Host header")
    if not _same_authority(hosts[0].decode(), name, port, 80):
        return Refused("host", _host_mismatch(hosts[0], name, port, "name connected to"))
    return None


def parse_http_head(buf: bytes) -> HttpRequest | _NeedMore:
    """Parse one request head at the start of `buf` (NEED_MORE until its
    blank line arrives; BadRequest past MAX_HEAD or on anything malformed,
    NotHttp at once when its first bytes are another protocol)."""
    parsed = _head(buf)
    if isinstance(parsed, _NeedMore):
        return parsed
    end, method_b, target_b, version, headers = parsed
    method, target = method_b.decode(), target_b.decode()
    hosts = [v for n, v in headers if n == b"host"]
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    lengths = {v for n, v in headers if n == b"content-length"}
    if any(n == b"transfer-encoding" for n, _ in headers):
        raise BadRequest("request bodies with Transfer-Encoding are not forwarded (send a Content-Length)")
    if len(lengths) > 1:
        raise BadRequest("conflicting Content-Length headers")
    body = 0
    if lengths:
        (text,) = lengths
        if not text.isdigit() or len(text) > 15:
            raise BadRequest("a malformed Content-Length")
        body = int(text)

    if method == "CONNECT":
        host, port = parse_authority(target, None)
        if hosts and not _same_authority(hosts[0].decode(), host, port, 443):
            raise BadRequest(_host_mismatch(hosts[0], host, port, "CONNECT target"))
        return HttpRequest(method=method, host=host, port=port, connect=True, head=b"", body_length=0,
                           consumed=end + 4)
    lower = target.lower()
    if not lower.startswith("http://"):
        if lower.startswith("https://"):
            raise BadRequest("https:// targets go through CONNECT (set HTTPS_PROXY), not plain forwarding")
        raise BadRequest("a proxy request needs an absolute http:// target")
    rest = target[7:]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "#" in path:
        path = path[: path.index("#")]
    host, port = parse_authority(authority, 80)
    if hosts and not _same_authority(hosts[0].decode(), host, port, 80):
        raise BadRequest(_host_mismatch(hosts[0], host, port, "request target"))
    if not path.startswith("/"):
        path = "/" + path
    try:  # the Host written upstream is the name checked (a server routes on it), not the client's spelling
        shown = normalize_name(host) + authority[len(host):]  # (":port" when the target had one)
    except ValueError:
        shown = authority  # (not a name: the rules refuse it)
    out = [f"{method} {path} {version.decode()}".encode(), b"Host: " + shown.encode()]
    for n, v in headers:
        if n in _HOP or n == b"host":
            continue
        out.append(n + b": " + v)
    out.append(b"Connection: close")
    return HttpRequest(method=method, host=host, port=port, connect=False, head=b"\r\n".join(out) + b"\r\n\r\n",
                       body_length=body, consumed=end + 4)


def _same_authority(header: str, host: str, port: int, default: int) -> bool:
    """The Host header names the target. A Host without a port names the
    host at any port: some clients leave the port out even when it is not
    the default (the proxy never forwards the client's Host: it connects to
    the checked target and writes its own). A port, when given, must match."""
    try:
        h, p = parse_authority(header, -1)
    except BadRequest:
        return False
    return h.lower().rstrip(".") == host.lower().rstrip(".") and p in (port, -1)


def _host_mismatch(header: bytes, host: str, port: int, what: str) -> str:
    return (f"the Host header names another host ({header.decode()[:80]!r}) than the {what} "
            f"({host[:MAX_NAME]}:{port}): drop the Host header, or make it the same host and port")


def http_error(status: int, reason: str) -> bytes:
    """A short response for the client (the reason, one line, in the body and a header)."""
    phrase = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
              413: "Payload Too Large", 429: "Too Many Requests", 502: "Bad Gateway",
              504: "Gateway Timeout"}.get(status, "Error")
    text = reason.replace("\r", " ").replace("\n", " ")[:400]
    body = f"zviz egress: {text}\n".encode("ascii", "replace")
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"X-Zviz-Egress: {text.encode('ascii', 'replace').decode()}\r\nConnection: close\r\n\r\n").encode() + body


# ---------------------------------------------------------------- SOCKS5 (RFC 1928)

SOCKS_OK, SOCKS_FAILURE, SOCKS_NOT_ALLOWED, SOCKS_NET_UNREACHABLE, SOCKS_HOST_UNREACHABLE = 0, 1, 2, 3, 4
SOCKS_REFUSED, SOCKS_TTL, SOCKS_BAD_COMMAND, SOCKS_BAD_ADDRESS = 5, 6, 7, 8


@attrs.frozen
class SocksGreeting:
    no_auth: bool  # the client offers method 0 (no authentication)
    consumed: int


@attrs.frozen
class SocksRequest:
    host: str  # a name (ATYP 3) or the address's text (ATYP 1, 4)
    port: int
    is_ip: bool
    consumed: int


def parse_socks_greeting(buf: bytes) -> SocksGreeting | _NeedMore:
    if not buf:
        return NEED_MORE
    if buf[0] != 5:
        raise BadRequest("not SOCKS version 5")
    if len(buf) < 2:
        return NEED_MORE
    n = buf[1]
    if n == 0:
        raise BadRequest("a SOCKS5 greeting with no methods")
    if len(buf) < 2 + n:
        return NEED_MORE
    return SocksGreeting(no_auth=0 in buf[2:2 + n], consumed=2 + n)


def parse_socks_request(buf: bytes) -> SocksRequest | _NeedMore:
    """CONNECT only (BIND and UDP ASSOCIATE raise BadRequest with `socks_reply`)."""
    if len(buf) < 4:
        return NEED_MORE
    ver, cmd, rsv, atyp = buf[:4]
    if ver != 5 or rsv != 0:
        raise BadRequest("a malformed SOCKS5 request")
    if cmd != 1:
        raise SocksRefusal(SOCKS_BAD_COMMAND, f"SOCKS5 command {cmd} (only CONNECT is served)")
    if atyp == 1:
        if len(buf) < 10:
            return NEED_MORE
        host, at = str(ipaddress.IPv4Address(buf[4:8])), 8
        is_ip = True
    elif atyp == 4:
        if len(buf) < 22:
            return NEED_MORE
        host, at = str(ipaddress.IPv6Address(buf[4:20])), 20
        is_ip = True
    elif atyp == 3:
        if len(buf) < 5:
            return NEED_MORE
        n = buf[4]
        if n == 0:
            raise BadRequest("an empty SOCKS5 host name")
        if len(buf) < 5 + n + 2:
            return NEED_MORE
        raw = buf[5:5 + n]
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            try:
                host = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SocksRefusal(SOCKS_BAD_ADDRESS, "a SOCKS5 host name that is not UTF-8") from None
        if any(ord(c) < 0x21 for c in host):
            raise SocksRefusal(SOCKS_BAD_ADDRESS, "control characters in a SOCKS5 host name")
        at, is_ip = 5 + n, is_ip_literal(host)
    else:
        raise SocksRefusal(SOCKS_BAD_ADDRESS, f"SOCKS5 address type {atyp}")
    port = struct.unpack_from("!H", buf, at)[0]
    if port == 0:
        raise SocksRefusal(SOCKS_NOT_ALLOWED, "port 0")
    return SocksRequest(host=host, port=port, is_ip=is_ip, consumed=at + 2)


class SocksRefusal(BadRequest):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def socks_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


# ---------------------------------------------------------------- TLS ClientHello (RFC 8446)

EXT_SERVER_NAME = 0
EXT_ECH = 0xFE0D  # encrypted_client_hello: the real server name is encrypted
EXT_ECH_OUTER = 0xFD00


@attrs.frozen
class ClientHello:
    server_name: str | None  # the SNI host_name (None: none sent)
    ech: bool  # an encrypted_client_hello extension is present


def looks_like_tls(buf: bytes) -> bool:
    return len(buf) >= 1 and buf[0] == 0x16


def parse_client_hello(buf: bytes) -> ClientHello | _NeedMore:
    """The SNI of the ClientHello at the start of `buf`: TLS records of type
    handshake (22), possibly many (a ClientHello may be fragmented across
    records, and records across reads), reassembled up to MAX_CLIENT_HELLO."""
    msg = bytearray()
    at = 0
    need: int | None = None
    while need is None or len(msg) < need:
        if len(buf) < at + 5:
            return NEED_MORE
        ctype, major, _minor, length = buf[at], buf[at + 1], buf[at + 2], struct.unpack_from("!H", buf, at + 3)[0]
        if ctype != 22:
            raise BadRequest("not a TLS handshake record")
        if major != 3:
            raise BadRequest("not a TLS record version")
        if length == 0 or length > 16384 + 256:
            raise BadRequest("a TLS record of impossible length")
        if len(buf) < at + 5 + length:
            if at + 5 + length > MAX_CLIENT_HELLO + 5 * 8:
                raise BadRequest("a ClientHello larger than the proxy reads")
            return NEED_MORE
        msg += buf[at + 5:at + 5 + length]
        at += 5 + length
        if need is None and len(msg) >= 4:
            if msg[0] != 1:
                raise BadRequest("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(msg[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise BadRequest("a ClientHello larger than the proxy reads")
        if len(msg) > MAX_CLIENT_HELLO:
            raise BadRequest("a ClientHello larger than the proxy reads")
    return _client_hello_body(bytes(msg[4:need]))


def _client_hello_body(b: bytes) -> ClientHello:
    r = _Reader(b)
    r.take(2 + 32)  # legacy_version, random
    r.take(r.u8())  # session id
    r.take(r.u16())  # cipher suites
    r.take(r.u8())  # compression methods
    if r.left() == 0:
        return ClientHello(server_name=None, ech=False)
    ext = _Reader(r.take(r.u16()))
    if r.left():
        raise BadRequest("bytes after the ClientHello's extensions")
    name: str | None = None
    ech = False
    seen: set[int] = set()
    while ext.left():
        etype, data = ext.u16(), ext.take(ext.u16())
        if etype in seen:
            raise BadRequest(f"TLS extension {etype} sent twice")
        seen.add(etype)
        if etype in (EXT_ECH, EXT_ECH_OUTER):
            ech = True
        elif etype == EXT_SERVER_NAME:
            lst = _Reader(data)
            entries = _Reader(lst.take(lst.u16()))
            if lst.left():
                raise BadRequest("a malformed server_name extension")
            names = []
            while entries.left():
                kind, value = entries.u8(), entries.take(entries.u16())
                if kind == 0:
                    names.append(value)
            if len(names) != 1:
                raise BadRequest("a server_name extension must hold exactly one host_name")
            try:
                name = names[0].decode("ascii")
            except UnicodeDecodeError:
                raise BadRequest("a server name that is not ASCII") from None
    return ClientHello(server_name=name, ech=ech)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._d = data
        self._at = 0

    def left(self) -> int:
        return len(self._d) - self._at

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise BadRequest("a truncated TLS ClientHello")
        out = self._d[self._at:self._at + n]
        self._at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")


_SNI = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # (one trailing dot: the same name, absolute)


def sni_refusal(hello: ClientHello, name: str) -> Refused | None:
    """Why a ClientHello may not go to `name` (the CONNECT's normalised name)."""
    if hello.ech:
        return Refused("ech", "the ClientHello uses Encrypted Client Hello: the proxy cannot see which server "
                       "it is for (turn ECH off in the client)")
    if hello.server_name is None:
        return Refused("no-sni", f"the ClientHello for {name} names no server (SNI): refused")
    if not _SNI.fullmatch(hello.server_name):
        # The SNI goes upstream as sent: a server routes on those bytes, not on what they normalise to
        # (" pypi.org", "pypi.org\t" would pass as pypi.org here and reach an unknown-name default there).
        return Refused("sni", f"the ClientHello's server name {hello.server_name[:80]!r} is not a host name as "
                       "TLS sends it (letters, digits, hyphens and dots only)")
    try:
        sni = normalize_name(hello.server_name)
    except ValueError:
        return Refused("sni", f"the ClientHello's server name {hello.server_name[:80]!r} is not a host name")
    if sni != name:
        return Refused("sni", f"the ClientHello names {sni}, the tunnel was opened for {name} (domain fronting)")
    return None


def direct_hint(address: tuple[str, int] | None = None) -> str:
    """The detail of a denial for a program that went around the proxy: a
    UDP or raw socket (no address), or a direct connect to `address` (host,
    port), written `[v6]:port` where the host is IPv6."""
    way = (f"use HTTP_PROXY/HTTPS_PROXY/ALL_PROXY=http://127.0.0.1:{PROXY_PORT} (set for you; pip, npm, curl, git "
           "and requests read them)")
    text = f"connections leave only through zviz's egress proxy, by domain name: {way} and allow the name with " \
           "Network.domains([...]) or --allow-domain NAME"
    if address is None:
        return text
    host, port = address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        loopback = canonical_ip(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:  # most often a client that NO_PROXY kept off the proxy, after a name the policy pins and allows
        pin = f"[{host}]" if ":" in host else host
        return (f"{where}: the sandbox's own loopback, where nothing listens (NO_PROXY keeps localhost, 127.0.0.1 "
                f"and ::1 off the proxy). To reach a service on the host's loopback, pin another name to it "
                f"(--add-host svc.test:{pin} or hosts={{'svc.test': '{host}'}}), allow it (--allow-domain "
                f"svc.test:{port}) and use that name through HTTP_PROXY=http://127.0.0.1:{PROXY_PORT} (set for you)")
    return f"{where}: {text}"


def name_hint(address: tuple[str, int] | None = None) -> str:
    """The detail of a denial under direct egress (net.way = "direct"): a
    connect to an address that is not one of the sandbox's names, or a
    socket zviz does not connect (no address)."""
    text = ("connections leave only by domain name: resolve an allowed name (zviz answers the sandbox's DNS) "
            "and connect to the address it gives; allow the name with Network.domains([...]) or --allow-domain NAME")
    if address is None:
        return text
    host, port = address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{where}: not an address of an allowed name (or not on an allowed port): {text}"


def proxy_environment() -> dict[str, str]:
    """The variables that point clients at the proxy (pip, npm, curl, git,
    requests, httpx and urllib read them; NO_PROXY keeps loopback direct)."""
    url = f"http://127.0.0.1:{PROXY_PORT}"
    out = {}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        out[k] = out[k.lower()] = url
    out["NO_PROXY"] = out["no_proxy"] = "localhost,127.0.0.1,::1"
    out["npm_config_proxy"] = out["npm_config_https_proxy"] = url
    out["NODE_USE_ENV_PROXY"] = "1"  # Node's own fetch() and http (22.21+, 24+); older Node ignores it
    return out
