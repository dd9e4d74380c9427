"""net.mode = "domains" with the egress proxy listening inside the sandbox's
own network namespace (a host process that may setns, a zygote): the sandbox's
connects to 127.0.0.1:3128 and [::1]:3128 are in-kernel (no seccomp
notification, no supervisor), and land on sockets the host holds. Without
root every connect is supervised (tests/test_egress.py, and the escape tests
run both ways)."""

from __future__ import annotations

import fcntl
import json
import os
import socket

import pytest
import trio

import zviz
from zviz import _egressproto

from .egress_servers import Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the proxy listens inside the sandbox's network "
                                "namespace for a root host process only (else every connect is supervised)")

SIOCGSKNS = 0x894C  # a socket's network namespace, as an fd

CLIENT = r'''
import json, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
out = []
for i in range(n):
    fam, host = (socket.AF_INET6, "::1") if i % 2 else (socket.AF_INET, "127.0.0.1")
    s = socket.socket(fam)
    s.settimeout(10)
    s.connect((host, 3128))
    s.sendall(f"GET http://pkgs.test:{port}/hello HTTP/1.1\r\n\r\n".encode())
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    out.append(got.split(b"\r\n\r\n", 1)[1].decode())
print(json.dumps(out))
'''


# Direct connects (a program that ignores the proxy variables): errno and seconds for each.
DIRECT = r'''
import json, socket, sys, time
out = []
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(30)
    t = time.monotonic()
    try:
        s.connect((host, port))
        out.append([0, time.monotonic() - t])
    except OSError as e:
        out.append([e.errno, time.monotonic() - t])
    s.close()
print(json.dumps(out))
'''


def _connect_denials(sb: zviz.Sandbox) -> list[zviz.DenialEvent]:
    return [e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent) and e.syscall == "connect"]


@pytest.fixture
def upstream():
    srv = Server({"/hello": ("text/plain", b"hello\n")})
    yield srv
    srv.close()


def _policy(port: int) -> zviz.Policy:
    net = zviz.Network.domains(["pkgs.test"], ports=[port], hosts={"pkgs.test": "127.0.0.1"})
    return zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))


def _netns_inode(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


@pytest.mark.trio
async def test_connects_to_the_proxy_are_not_notified(upstream):
    """Ten requests through the proxy, on 127.0.0.1 and ::1: no connect was
    supervised (the sandbox's statistics count none), and no notification
    more than a run of the same interpreter that connects nowhere."""
    async with zviz.open_sandbox(_policy(upstream.port)) as sb:
        await sb.write_file("client.py", CLIENT)
        r = await sb.run(["python3", "client.py", str(upstream.port), "0"])
        assert r.status == 0, r.stderr
        base = sb.statistics().notifications
        r = await sb.run(["python3", "client.py", str(upstream.port), "10"])
        assert r.status == 0, r.stderr
        assert json.loads(r.stdout) == ["hello\n"] * 10
        st = sb.statistics()
        assert st.connects == 0
        assert st.notifications - base == base  # the second run's notifications are the first run's, no more
        assert st.egress.allowed == 10 and st.egress.strangers == 0
        assert sb._life.egress._expected == {}  # the supervisor announced nothing
    assert len(upstream.requests) == 10


@pytest.mark.trio
async def test_the_supervised_way_is_what_it_replaces(upstream, monkeypatch):
    """The same requests with the listener on the host's loopback: each
    connect is a notification performed by the supervisor (the fallback
    without root; it is what the test above does without)."""
    monkeypatch.setattr(_egressproto, "LISTEN_INSIDE", False)
    async with zviz.open_sandbox(_policy(upstream.port)) as sb:
        await sb.write_file("client.py", CLIENT)
        r = await sb.run(["python3", "client.py", str(upstream.port), "4"])
        assert r.status == 0, r.stderr
        assert sb.statistics().connects == 4 and sb._life.egress._inside == []


@pytest.mark.trio
async def test_the_listener_lives_in_the_sandbox_namespace_and_closes_with_it(upstream):
    """The proxy's sockets for the sandbox are in the zygote's network
    namespace, not the host's (a host process cannot connect to them), and
    closing the sandbox closes them."""
    async with zviz.open_sandbox(_policy(upstream.port)) as sb:
        r = await sb.run(["true"])
        assert r.status == 0
        inside = list(sb._life.egress._inside)
        zygote = sb._life.runner.zygote
        sandbox_ns = os.stat(f"/proc/{zygote.pid}/ns/net").st_ino
        host_ns = os.stat("/proc/self/ns/net").st_ino
        assert sandbox_ns != host_ns
        assert sorted(s.getsockname()[:2] for s in inside) == [("127.0.0.1", 3128), ("::1", 3128)]
        assert all(_netns_inode(s) == sandbox_ns for s in inside)
        assert _netns_inode(sb._life.egress._listen) == host_ns  # (the supervised way's socket)
        watch = list(sb._life.egress._watch)  # the raw sockets that see direct connects' SYNs
        assert sorted(s.family for s in watch) == [socket.AF_INET, socket.AF_INET6]
        assert all(s.type == socket.SOCK_RAW and _netns_inode(s) == sandbox_ns for s in watch)
    assert all(s.fileno() == -1 for s in inside + watch)


@pytest.mark.trio
async def test_a_replaced_zygote_gets_a_new_listener(upstream):
    """A zygote that dies (the OOM killer, say) takes its namespace with it;
    its replacement gets new sockets before it runs anything, the old ones
    are closed."""
    async with zviz.open_sandbox(_policy(upstream.port)) as sb:
        await sb.write_file("client.py", CLIENT)
        r = await sb.run(["python3", "client.py", str(upstream.port), "1"])
        assert r.status == 0, r.stderr
        old = list(sb._life.egress._inside)
        old_pid = sb._life.runner.zygote.pid
        sb._life.runner.zygote.kill()
        with trio.fail_after(10):
            while os.path.exists(f"/proc/{old_pid}/ns/net"):
                await trio.sleep(0.01)
        r = await sb.run(["python3", "client.py", str(upstream.port), "2"])
        assert r.status == 0, r.stderr
        assert json.loads(r.stdout) == ["hello\n"] * 2
        assert sb._life.runner.zygote.pid != old_pid
        assert all(s.fileno() == -1 for s in old)
        new = sb._life.egress._inside
        assert len(new) == 2 and all(s.fileno() >= 0 for s in new)
        assert sb.statistics().connects == 0
        assert len(sb._life.egress._watch) == 2  # (new watchers too: a direct connect is still an event)
        r = await sb.run(["python3", "-c", DIRECT, json.dumps([["10.9.8.7", 80]])])
        assert json.loads(r.stdout)[0][0] == 111
        with trio.fail_after(5):
            while not _connect_denials(sb):
                await trio.sleep(0.01)
        assert "10.9.8.7:80: " in _connect_denials(sb)[0].detail


@pytest.mark.trio
async def test_unix_sockets_of_the_sandbox_connect_in_kernel(tmp_path):
    """With connects in-kernel, a sandbox's own unix socket server works (as
    in net.mode = "none" and "loopback"); the path is resolved in the
    sandbox's own view of the filesystem, under Landlock."""
    code = ("import socket, os\nsrv = socket.socket(socket.AF_UNIX)\nsrv.bind('s.sock')\nsrv.listen(1)\n"
            "c = socket.socket(socket.AF_UNIX)\nc.connect('s.sock')\na, _ = srv.accept()\nc.sendall(b'hi')\n"
            "print(a.recv(2).decode())\n")
    async with zviz.open_sandbox(_policy(1)) as sb:
        r = await sb.run(["python3", "-c", code])
        assert (r.status, r.stdout) == (0, b"hi\n"), r.stderr


@pytest.mark.trio
async def test_a_listener_that_cannot_be_made_fails_the_run_and_leaves_nothing(upstream, monkeypatch):
    """If the host cannot make the proxy's sockets in a new zygote's
    namespace, that zygote is killed before it runs anything and the run
    fails with the step named (the sandbox never runs with connects
    in-kernel and no proxy)."""
    from zviz import _kernel

    def refuse(pidfd, make):
        raise PermissionError(1, "setns refused")

    monkeypatch.setattr(_kernel, "sockets_in_netns", refuse)
    async with zviz.open_sandbox(_policy(upstream.port)) as sb:
        spawned: list[int] = []
        real_wait = _kernel.PendingSpawn.wait

        async def spy(self):
            s = await real_wait(self)
            spawned.append(s.pid)
            return s

        monkeypatch.setattr(_kernel.PendingSpawn, "wait", spy)
        with pytest.raises(zviz.SandboxSetupError, match="egress-proxy"):
            await sb.run(["true"])
        assert sb._life.runner.zygote is None and spawned
        assert not any(os.path.exists(f"/proc/{pid}") for pid in spawned)  # killed and reaped


def test_only_a_process_that_may_enter_a_namespace_listens_inside():
    """The way is chosen by what the host process may do (CAP_SYS_ADMIN, and
    no filter of its own refusing setns), asked again when its credentials
    change: the same interpreter dropped to uid 65534 gets the supervised
    way, and its domains-mode sandboxes still work (tests/escape/test_egress.py,
    test_domains_mode_as_each_identity)."""
    from zviz import _kernel

    from .conftest import run_as

    assert _kernel.can_enter_netns() is True
    assert run_as("nobody", _kernel.can_enter_netns) is False


@pytest.mark.trio
async def test_a_direct_connect_is_refused_at_once_and_is_one_event_each():
    """A program that ignores the proxy and connects to a raw address, public
    or private, IPv4 or IPv6, or the proxy's port at another address: refused
    at once (ECONNREFUSED: every address is the sandbox's own loopback, where
    nothing listens there) and one denial event each, with the address and
    the fix, counted in the sandbox's denials; no seccomp notification. A
    TCP bind is still refused (Landlock)."""
    targets = [["93.184.216.34", 443], ["10.0.0.1", 80], ["2606:2800:220:1::1", 443], ["fd00::1", 8080],
               ["::ffff:192.168.1.1", 22], ["1.2.3.4", 3128], ["fd00::2", 3128]]
    async with zviz.open_sandbox(_policy(1)) as sb:
        await sb.write_file("direct.py", DIRECT)
        r = await sb.run(["python3", "direct.py", "[]"])
        base = sb.statistics().notifications
        r = await sb.run(["python3", "direct.py", json.dumps(targets)])
        assert r.status == 0, r.stderr
        # the run's own (read at its end, whether or not the loop woke for them before)
        assert r.denials == {"connect": 7}, r.denials
        out = json.loads(r.stdout)
        assert [e for e, _ in out] == [111] * 7, out
        assert max(t for _, t in out) < 0.5, out  # never a hang (a few microseconds each, unloaded)
        with trio.fail_after(5):
            while len(_connect_denials(sb)) < 7:
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        events = _connect_denials(sb)
        assert sorted(e.detail.split(": ")[0] for e in events) == sorted([  # (IPv4's and IPv6's: two sockets)
            "93.184.216.34:443", "10.0.0.1:80", "[2606:2800:220:1::1]:443", "[fd00::1]:8080", "192.168.1.1:22",
            "1.2.3.4:3128", "[fd00::2]:3128"])  # (IPv6: [addr]:port)
        for e in events:
            assert "HTTPS_PROXY" in e.detail and "--allow-domain" in e.detail and e.errno == 111
            assert e.source == "netns" and str(e).startswith("denied connect(")
            assert e.command == "python3"  # (the only run: its command)
        st = sb.statistics()
        assert st.denials["connect"] == 7 and st.notifications == 2 * base and st.connects == 0  # (once each)
        assert sb._life.egress.direct_reads == 7
        r = await sb.run(["python3", "-c", "import socket\ns = socket.socket()\ntry:\n    s.bind(('0.0.0.0', 8080))\n"
                          "except OSError as e:\n    print(e.errno)\n"])
        assert r.stdout == b"13\n"  # Landlock: no TCP bind


@pytest.mark.trio
async def test_a_direct_connect_is_never_counted_in_another_run():
    """The kernel's reset does not say which process connected: a denial
    counts in a run only when that run is the only one live; with two, the
    sandbox's totals have it and neither run does (never the wrong one)."""
    async with zviz.open_sandbox(_policy(1)) as sb:
        await sb.write_file("direct.py", DIRECT)
        sleeper = await sb.start(["sleep", "30"])
        try:
            r = await sb.run(["python3", "direct.py", json.dumps([["10.0.0.1", 80]])])
            assert r.status == 0 and json.loads(r.stdout)[0][0] == 111, r.stderr
            assert r.denials == {}, r.denials
        finally:
            sleeper.kill()
        await sleeper.wait()
        assert sleeper.denials == {}, sleeper.denials
        with trio.fail_after(5):
            while not _connect_denials(sb):
                await trio.sleep(0.01)
        assert sb.statistics().denials["connect"] == 1
        assert _connect_denials(sb)[0].command == ""
        r = await sb.run(["python3", "direct.py", json.dumps([["10.0.0.2", 80]])])  # alone again: its own
        assert r.denials == {"connect": 1} and sb.statistics().denials["connect"] == 2


@pytest.mark.trio
async def test_bulk_through_the_proxy_wakes_no_watcher():
    """The watchers' filter passes only SYNs to other ports than the proxy's:
    connections through the proxy, and every byte they carry, never reach
    the host's watcher sockets (no read, no event)."""
    body = os.urandom(1 << 20) * 24
    srv = Server({"/big": ("application/octet-stream", body)})
    code = ("import socket, sys\nfor i in range(3):\n    s = socket.create_connection(('127.0.0.1', 3128))\n"
            f"    s.sendall(b'GET http://pkgs.test:{srv.port}/big HTTP/1.1\\r\\n\\r\\n')\n    n = 0\n"
            "    while chunk := s.recv(1 << 20):\n        n += len(chunk)\n    print(n)\n")
    try:
        async with zviz.open_sandbox(_policy(srv.port)) as sb:
            r = await sb.run(["python3", "-c", code])
            assert r.status == 0, r.stderr
            assert all(int(n) > len(body) for n in r.stdout.split()), r.stdout
            await trio.sleep(0.1)
            assert sb._life.egress.direct_reads == 0 and _connect_denials(sb) == []
            assert sb.statistics().egress.allowed == 3
    finally:
        srv.close()


@pytest.mark.trio
async def test_a_flood_of_direct_connects_is_bounded():
    """Thousands of direct connects: each refused at once; the host reads
    what the watchers' small buffers hold (the rest dropped by the kernel,
    the connects refused all the same) and the sandbox goes on."""
    code = ("import socket\nn = 0\nfor i in range(5000):\n    s = socket.socket()\n    try:\n"
            "        s.connect(('10.1.2.3', 1 + i % 60000))\n    except ConnectionRefusedError:\n        n += 1\n"
            "    s.close()\nprint(n)\n")
    async with zviz.open_sandbox(_policy(1)) as sb:
        with trio.fail_after(30):
            r = await sb.run(["python3", "-c", code])
        assert r.stdout == b"5000\n", r.stderr
        await trio.sleep(0.2)
        n = len(_connect_denials(sb))
        assert 0 < n <= 5000 and sb._life.egress.direct_reads <= 5000
        r = await sb.run(["echo", "ok"])
        assert r.stdout == b"ok\n"


@pytest.mark.trio
async def test_only_refused_connects_are_events():
    """The watchers pass the kernel's answer to a refused connect only: a
    program talking to itself (a listener the kernel bound for listen()) and
    connections the proxy resets (over max_connections) are not events."""
    code = ("import socket\nsrv = socket.socket()\nsrv.listen(4)\nport = srv.getsockname()[1]\n"
            "c = socket.create_connection(('127.0.0.1', port), timeout=5)\na, _ = srv.accept()\n"
            "c.sendall(b'x')\nprint(a.recv(1).decode())\nc.close(); a.close()\n"
            "held = [socket.create_connection(('127.0.0.1', 3128), timeout=5) for _ in range(4)]\n"
            "for h in held:\n    h.sendall(b'GET ')\n"
            "import time; time.sleep(0.3)\nprint('ok')\n")
    net = zviz.Network.domains(["pkgs.test"], max_connections=1)
    async with zviz.open_sandbox(zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=60))) as sb:
        r = await sb.run(["python3", "-c", code])
        assert r.stdout == b"x\nok\n", r.stderr
        await trio.sleep(0.2)
        assert sb.statistics().egress.denied_by_code.get("connections", 0) >= 1  # the proxy did reset some
        assert _connect_denials(sb) == [] and sb._life.egress.direct_reads == 0
