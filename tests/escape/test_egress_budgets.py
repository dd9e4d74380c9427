"""Attacks on the egress proxy's budgets (net.mode = "domains"): what one
sandbox may spend of the bytes it was given, and of the host process's
shared worker threads. Each checks what the HOST saw: the bytes an upstream
server received, the lookups in flight, another sandbox's file API. Every
server is on 127.0.0.1; `pkgs.test` is pinned to it."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import trio

import zviz
from zviz import _egress

from ..test_egressproto import client_hello


class _Sink:
    """A TCP server on 127.0.0.1 that reads every connection to its end
    (`received`: the bytes of each) and, with `send`, first answers that."""

    def __init__(self, send: bytes = b"") -> None:
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(64)
        self.port = self.lst.getsockname()[1]
        self.send = send
        self.received: list[int] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lst.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        n = 0
        c.settimeout(10)
        try:
            if self.send:
                n += len(c.recv(65536))
                c.sendall(self.send)
            while d := c.recv(1 << 20):
                n += len(d)
        except OSError:
            pass
        finally:
            c.close()
            with self._lock:
                self.received.append(n)

    def close(self) -> None:
        self.lst.close()


# N connections at once, each sending the file `first` then reading to the end; prints the bytes each got
PARALLEL = r'''
import json, socket, sys, threading
n, first = int(sys.argv[1]), open(sys.argv[2], "rb").read()
got = []
def one():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    k = 0
    try:
        s.sendall(first)
        s.shutdown(socket.SHUT_WR)
        while d := s.recv(1 << 20):
            k += len(d)
    except OSError:
        pass
    got.append(k)
ts = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(got))
'''

BUDGET = 64_000


@pytest.mark.trio
async def test_parallel_connections_cannot_outspend_the_byte_budget(proxy_way):
    """max_bytes is the sandbox's, over all its connections: eight tunnels
    that each queue 512 KB behind their ClientHello (an upload), and eight
    downloads of 1 MB, move no more than the budget between them. (The
    proxy counted a chunk of up to 1 MiB after moving it, per connection:
    N connections went N MiB over.)"""
    sink = _Sink()
    source = _Sink(send=b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"d" * 1_000_000)
    try:
        up = (f"CONNECT pkgs.test:{sink.port} HTTP/1.1\r\n\r\n".encode() + client_hello("pkgs.test")
              + b"u" * 512_000)
        down = f"GET http://pkgs.test:{source.port}/ HTTP/1.1\r\n\r\n".encode()
        for first, port, server in ((up, sink.port, sink), (down, source.port, source)):
            net = zviz.Network.domains(["pkgs.test"], ports=[port], hosts={"pkgs.test": "127.0.0.1"},
                                       max_bytes=BUDGET)
            async with zviz.open_sandbox(zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))) as sb:
                await sb.write_file("parallel.py", PARALLEL)
                await sb.write_file("first", first)
                r = await sb.run(["python3", "parallel.py", "8", "first"])
                assert r.status == 0, r.stderr.decode()
                got = json.loads(r.stdout)
                with trio.fail_after(10):  # (the proxy's connections end after the client's)
                    while sb.statistics().egress.active:
                        await trio.sleep(0.01)
                st = sb.statistics().egress
                events = [e for e in sb.events_so_far() if isinstance(e, zviz.EgressEvent)]
                codes = [e.code for e in events]
                assert "bytes" in codes, codes
                assert st.bytes_up + st.bytes_down <= BUDGET, (st, codes)
                if server is sink:  # host side: what reached the server
                    with trio.fail_after(10):
                        while len(sink.received) < sum(e.address is not None for e in events):
                            await trio.sleep(0.01)
                    assert 0 < sum(sink.received) <= BUDGET, sink.received
                else:  # what the program got, less the proxy's own refusals (403 with a reason, not counted)
                    assert sum(got) - sum(k for k in got if k < 1000) <= BUDGET + 1000, got
    finally:
        sink.close()
        source.close()


@pytest.mark.trio
async def test_slow_name_lookups_hold_only_their_own_sandboxs_threads(monkeypatch):
    """Each name lookup is a worker thread that runs until the resolver
    answers (a cancelled one too). A sandbox asking for 48 names that the
    resolver is slow on gets at most `MAX_LOOKUPS` of them in flight; the
    process's shared worker threads (40, trio's default), which the file
    API of every other sandbox uses, stay free. (The lookups took the shared
    ones: another sandbox's write_file waited for the slow resolver.)"""
    real = socket.getaddrinfo
    started: list[str] = []
    release = threading.Event()

    def slow(host, port, family=0, type=0, proto=0, flags=0):
        if isinstance(host, bytes):  # (trio's own lookup passes the name encoded)
            host = host.decode()
        if isinstance(host, str) and host.endswith(".slow.test"):
            if flags & socket.AI_NUMERICHOST:  # (trio's numeric-only try, on the loop: answers at once)
                raise socket.gaierror(socket.EAI_NONAME, "not numeric")
            started.append(host)
            release.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "the resolver is slow")
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    net = zviz.Network.domains(["*.slow.test"], ports=[80])
    client = ("import socket, threading\n"
              "def one(i):\n"
              "    s = socket.create_connection(('127.0.0.1', 3128), timeout=30)\n"
              "    s.sendall(b'GET http://n%d.slow.test/ HTTP/1.1\\r\\n\\r\\n' % i)\n"
              "    s.recv(100)\n"
              "ts = [threading.Thread(target=one, args=(i,)) for i in range(48)]\n"
              "[t.start() for t in ts]\n[t.join() for t in ts]\n")
    try:
        async with zviz.open_sandbox(zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))) as a, \
                zviz.open_sandbox(zviz.Policy.python()) as b:
            proc = await a.start(["python3", "-c", client])
            per_sandbox = getattr(_egress, "MAX_LOOKUPS", 8)
            with trio.fail_after(10):
                while len(started) < per_sandbox or a.statistics().egress.active < 48:
                    await trio.sleep(0.01)
            await trio.sleep(0.3)  # (more lookups would have started by now)
            t0 = time.monotonic()
            with trio.move_on_after(5):
                await b.write_file("note.txt", "the other sandbox goes on")
            took = time.monotonic() - t0
            assert took < 2.0, (took, len(started))  # another sandbox's file API did not wait for the resolver
            assert len(started) == per_sandbox  # host side: the sandbox's lookups in flight
            assert await b.read_file("note.txt") == b"the other sandbox goes on"
            release.set()
            with trio.fail_after(30):
                await proc.wait()
            assert len(started) == 48  # (every name was looked up in the end, 8 at a time)
    finally:
        release.set()


# Opens 64 tunnels (each: the request and a ClientHello, then held open) and prints how many the proxy took
HOLD = r'''
import socket, time
first = open("first", "rb").read()
socks, refused = [], 0
for i in range(64):
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
        s.sendall(first)
        socks.append(s)
    except OSError:
        refused += 1
print(len(socks), refused, flush=True)
time.sleep(60)
'''


@pytest.mark.trio
async def test_proxied_connections_cannot_take_the_fds_other_sandboxes_need():
    """Each proxied connection holds up to six of the host process's fds. Two
    sandboxes that each hold 64 tunnels open (to a server that never
    answers) under a soft RLIMIT_NOFILE of 512 used to take every fd of the
    process: a third sandbox's next command failed (EMFILE). Now the
    proxies, between them, hold at most half of the process's fds; a
    connection past that is refused with an event naming the limit, and the
    third sandbox runs its command."""
    import os
    import resource

    from zviz import _capacity

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if len(os.listdir("/proc/self/fd")) > 128 or hard < 512:
        pytest.skip("this process holds too many fds already (or may not have 512) to test a limit of 512")
    held: list[socket.socket] = []
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(512)
    P = lst.getsockname()[1]

    def hold() -> None:
        while True:
            try:
                held.append(lst.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    first = f"CONNECT pkgs.test:{P} HTTP/1.1\r\n\r\n".encode() + client_hello("pkgs.test")
    net = zviz.Network.domains(["pkgs.test"], ports=[P], hosts={"pkgs.test": "127.0.0.1"})
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    attackers: list[zviz.Sandbox] = []
    try:
        async with zviz.open_sandbox(zviz.Policy.python()) as victim:
            for _ in range(2):
                a = await zviz.Sandbox.create(zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60)))
                attackers.append(a)
                await a.write_file("hold.py", HOLD)
                await a.write_file("first", first)
                proc = await a.start(["python3", "hold.py"])
                with trio.fail_after(20):
                    took, refused = map(int, (await proc.stdout.receive_some()).split())
            with trio.fail_after(10):  # (each tunnel the proxy took has reached the server)
                while len(held) < sum(x.statistics().egress.active for x in attackers):
                    await trio.sleep(0.01)
            open_fds = len(os.listdir("/proc/self/fd"))
            r = await victim.run(["python3", "-c", "print('the other sandbox goes on')"])
            assert (r.status, r.stdout) == (0, b"the other sandbox goes on\n"), r
            assert open_fds < 512 - 24, open_fds  # host side: room left for the process's other sandboxes
            assert took + refused == 64
            assert _capacity.GATE.proxy_fds <= 256
            assert sum(x.statistics().egress.active for x in attackers) <= 256 // 6
            why = [e.reason for x in attackers for e in x.events_so_far()
                   if isinstance(e, zviz.EgressEvent) and e.code == "connections"]
            assert why and all("RLIMIT_NOFILE" in w for w in why), why
    finally:
        for a in attackers:
            await a.aclose()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        lst.close()
        for c in held:
            c.close()
    assert _capacity.GATE.proxy_fds == 0  # every connection gave its fds back
