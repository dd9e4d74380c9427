"""Direct egress (net.way = "direct"): what a sandbox might try with the
host's sockets it is handed and with zviz's DNS. Each test states what the
host observed (its listeners, its TLS server, its process)."""

from __future__ import annotations

import socket
import threading

import pytest
import trio

import zviz

from ..egress_servers import TlsEcho, self_signed
from .test_net_supervisor import _install, net_attack  # noqa: F401 (a fixture)


def _host_listening() -> set[tuple[str, str]]:
    """The listening TCP sockets of the host's network namespace: (local address, inode)."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A":
                    out.add((fields[1], fields[9]))
    return out


def _why_not() -> str | None:
    from zviz import _egressdirect, _kernel

    return _egressdirect.unavailable(enter_netns=_kernel.can_enter_netns(), zygote=True)


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=f"no direct egress here: {_why_not()}")


def _policy(*ports: int, **kw) -> zviz.Policy:
    net = zviz.Network.domains(["pkgs.test"], ports=ports, hosts={"pkgs.test": "127.0.0.1"}, way="direct", **kw)
    return zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))


class Listener:
    """A host listener that counts the connections it accepts and keeps what they send."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.data = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        with c:
            c.settimeout(3)
            try:
                while True:
                    d = c.recv(4096)
                    if not d:
                        return
                    self.data += d
                    if b"\r\n\r\n" in d:
                        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


REPOINT = r'''
import ctypes, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
good, evil = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("pkgs.test", good))
s.sendall(b"GET / HTTP/1.1\r\nHost: pkgs.test\r\n\r\n")
s.recv(100)
unspec = struct.pack("H", 0)
print("disconnect", libc.connect(s.fileno(), unspec, 2), ctypes.get_errno())
to = socket.inet_aton("127.0.0.1")
for length in (16, 20, 128):  # 16: the pump; others: the kernel (Landlock)
    sa = struct.pack("!HH4s", socket.AF_INET, evil, to)
    sa = struct.pack("H", socket.AF_INET) + sa[2:] + bytes(length - 8)
    r = libc.connect(s.fileno(), sa[:length], length)
    print("reconnect", length, r, ctypes.get_errno())
r = libc.listen(s.fileno(), 5)
print("listen", r, ctypes.get_errno())
t = socket.socket()
r = libc.listen(t.fileno(), 5)
print("own listen", r, ctypes.get_errno(), flush=True)
import time; time.sleep(30)
'''


@pytest.mark.trio
async def test_a_handed_host_socket_cannot_be_pointed_elsewhere_or_listen():
    """The sandbox gets a socket of the host's (connected to the checked
    address). It disconnects it (AF_UNSPEC, in the kernel), then connects
    it to another host port with every address length, then listens on it:
    the other listener accepts nothing, no socket of the sandbox listens on
    the host, and its own sockets may still listen."""
    good, evil = Listener(), Listener()
    try:
        async with zviz.open_sandbox(_policy(good.port)) as sb:
            before = _host_listening()  # (the proxy's own listener on the host's loopback is there already)
            p = await sb.start(["python3", "-c", REPOINT, str(good.port), str(evil.port)])
            out = ""
            while out.count("\n") < 6:
                chunk = await p.stdout.receive_some()
                assert chunk, out
                out += chunk.decode()
            listening = _host_listening() - before  # (while the program still holds its sockets)
            p.kill()
        lines = {line.rsplit(" ", 2)[0]: line.rsplit(" ", 2)[1:] for line in out.splitlines()}
        assert evil.accepted == 0, out
        for length in ("16", "20", "128"):
            assert lines[f"reconnect {length}"][0] == "-1", out
        assert lines["listen"][0] == "-1", out
        assert lines["own listen"][0] == "0", out
        assert listening == set(), listening
    finally:
        good.close()
        evil.close()


@pytest.mark.trio
async def test_a_refused_first_flight_never_reaches_the_server(tmp_path):
    """A ClientHello naming evil.test on pkgs.test's connection: the pump
    has connected to the server, but the gate held the bytes; the server
    saw no handshake at all."""
    made = self_signed(str(tmp_path), "pkgs.test")
    if made is None:
        pytest.skip("no openssl")
    cert, key = made
    srv = TlsEcho(cert, key)
    code = ("import socket, ssl, sys\nctx = ssl.create_default_context(); ctx.check_hostname = False\n"
            "ctx.verify_mode = ssl.CERT_NONE\ns = socket.create_connection(('pkgs.test', int(sys.argv[1])))\n"
            "try:\n    ctx.wrap_socket(s, server_hostname='evil.test')\n    print('handshake')\n"
            "except (OSError, ssl.SSLError) as e:\n    print('refused')\n")
    try:
        async with zviz.open_sandbox(_policy(srv.port)) as sb:
            r = await sb.run(["python3", "-c", code, str(srv.port)])
            assert r.stdout == b"refused\n", r
            await trio.sleep(0.2)
        assert srv.seen == [], srv.seen
    finally:
        srv.close()


FLIP_SETUP = "import socket, sys; print(socket.getaddrinfo('pkgs.test', int(sys.argv[1]))[0][4][0])"


@pytest.mark.trio
async def test_a_flipped_port_on_an_allowed_address_never_reaches_another_port(net_attack):  # noqa: F811
    """A thread flips connect()'s port between the allowed one and a host
    port that is not allowed, on the sandbox's address for pkgs.test, while
    3000 connects run: the pump reads once and connects to its copy; the
    other port is refused inside the sandbox's namespace. The host's other
    listener accepts nothing."""
    good, evil = Listener(), Listener()
    try:
        async with zviz.open_sandbox(_policy(good.port)) as sb:
            await _install(sb, net_attack)
            fake = (await sb.run(["python3", "-c", FLIP_SETUP, str(good.port)])).stdout.decode().strip()
            assert fake.startswith("198.18."), fake
            r = await sb.run(["./na", "flip", fake, str(good.port), str(evil.port), "3000"], timeout=120)
        out = r.stdout.decode()
        assert "flip: OK" in out, r
        fields = dict(kv.split("=") for kv in out.split("flip: OK ")[1].split())
        assert int(fields["good"]) > 0
        assert evil.accepted == 0
    finally:
        good.close()
        evil.close()


DNS_FUZZ = r'''
import os, random, socket, struct
random.seed(7)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.2)
good = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x04pkgs\x04test\x00" + struct.pack("!HH", 1, 1)
bad = [b"", b"\x00", os.urandom(11), good[:12] + b"\xc0\x0c" + good[-4:], good[:4] + b"\x00\x05" + good[6:],
       struct.pack("!HHHHHH", 2, 0x8000, 1, 0, 0, 0) + good[12:], good + os.urandom(600), b"\x3f" * 600,
       good[:12] + b"\x3f" + b"a" * 63 + b"\x00" + good[-4:], good[:12] + (b"\x3fa" + b"b" * 62) * 5 + b"\x00"]
bad += [bytes(random.getrandbits(8) for _ in range(random.randrange(1, 80))) for _ in range(300)]
for b in bad:
    u.sendto(b, ("10.9.8.7", 53))  # (any address: every one is the sandbox's, and zviz answers on 53)
    try:
        u.recv(2048)
    except OSError:
        pass
u.sendto(good, ("8.8.8.8", 53))
reply = u.recv(2048)
print(reply[:2] == b"\x00\x01", reply[-4:] == bytes([198, 18, 0, 1]))
'''


@pytest.mark.trio
async def test_malformed_dns_never_stops_the_answers_and_every_resolver_is_zvizs():
    """310 malformed or hostile queries (compression in a question, a
    response, oversize, random bytes), sent to an address of the sandbox's
    choosing: then a well-formed query sent to 8.8.8.8 is answered, by zviz
    (the sandbox's address for pkgs.test): no resolver outside is reachable."""
    async with zviz.open_sandbox(_policy(8080)) as sb:
        r = await sb.run(["python3", "-c", DNS_FUZZ])
        assert r.stdout == b"True True\n", r
        r = await sb.run(["python3", "-c", FLIP_SETUP, "8080"])
        assert r.stdout == b"198.18.0.1\n"
