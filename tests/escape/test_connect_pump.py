"""The connect pump (zviz/_pump.c): under net.mode = "allow" a C thread per
listener performs the allowed connects and hands everything else to the
Python supervisor. What it must never do: connect where Python would not
(a flipped sockaddr, a forbidden port, a socket that is not a fresh TCP
one), outlive its sandbox, or let one sandbox's memory stall another's.
Each test states what the host observed."""

from __future__ import annotations

import os
import socket
import time

import pytest
import trio

import zviz
from zviz import _pump

from .test_net_supervisor import _allow, _install, _lag_under, net_attack  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not _pump.available(), reason="the extension has no connect pump")


def _listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s


def _accepted(listener: socket.socket) -> int:
    """Connections waiting in `listener`'s queue, accepted and closed."""
    listener.setblocking(False)
    n = 0
    while True:
        try:
            c, _ = listener.accept()
        except BlockingIOError:
            return n
        c.close()
        n += 1


PROBE = r"""
import errno, socket, sys
ok, bad = int(sys.argv[1]), int(sys.argv[2])
def attempt(kind, port, **kw):
    try:
        s = socket.socket(*kw.get("args", ()))
    except OSError as e:
        print(kind, "socket", errno.errorcode.get(e.errno, e.errno))
        return
    try:
        if kw.get("listen"):
            s.bind(("127.0.0.1", 0)); s.listen(1)
        s.connect(("127.0.0.1", port))
        print(kind, "connected", s.getpeername()[1] == port)
    except OSError as e:
        print(kind, errno.errorcode.get(e.errno, e.errno))
    finally:
        s.close()
attempt("allowed", ok)
attempt("forbidden", bad)
attempt("udp", ok, args=(socket.AF_INET, socket.SOCK_DGRAM))
attempt("listening", ok, listen=True)
s = socket.socket(); s.connect(("127.0.0.1", ok))
try:
    s.connect(("127.0.0.1", ok))
except OSError as e:
    print("again", errno.errorcode.get(e.errno, e.errno))
"""


def test_the_pump_connects_only_what_python_would_and_hands_over_the_rest(monkeypatch):
    """The same program under the pump and under the Python path prints
    the same outcomes; with the pump, the allowed connects were the pump's
    and the refusals are events as before."""
    good, bad = _listener(), _listener()
    ports = [str(good.getsockname()[1]), str(bad.getsockname()[1])]

    async def main():
        async with zviz.open_sandbox(_allow(f"127.0.0.1:{ports[0]}")) as sb:
            r = await sb.run(["python3", "-c", PROBE, *ports])
            sup = sb._life.supervisor
            return r, sup.connects_pumped, sb.statistics()

    try:
        pumped = trio.run(main)
        assert _accepted(bad) == 0
        monkeypatch.setattr(_pump, "available", lambda: False)
        python = trio.run(main)
        assert _accepted(bad) == 0
    finally:
        good.close()
        bad.close()
    out = pumped[0].stdout.decode()
    assert out == python[0].stdout.decode(), (out, python[0].stdout)
    assert "allowed connected True" in out and "forbidden EACCES" in out, out
    assert "again EISCONN" in out, out
    assert pumped[1] == 2 and python[1] == 0, (pumped[1], python[1])  # the allowed one and the one connected again
    assert pumped[0].denials == python[0].denials, (pumped[0].denials, python[0].denials)
    assert pumped[0].denials.get("connect") == 1 and pumped[0].denials.get("socket") == 1, pumped[0].denials
    assert pumped[2].connects == python[2].connects


def test_a_flipped_sockaddr_never_reaches_the_forbidden_port(net_attack):  # noqa: F811
    """A thread flips connect()'s port between the allowed and a forbidden
    one while the main thread connects 3000 times: the pump connects to the
    copy it read, checked; the forbidden listener on the host accepts
    nothing, the allowed one every connect the sandbox saw succeed."""
    good, bad = _listener(), _listener()
    gp, bp = good.getsockname()[1], bad.getsockname()[1]
    counts = {"good": 0, "bad": 0}

    async def main():
        async with zviz.open_sandbox(_allow(f"127.0.0.1:{gp}")) as sb:
            await _install(sb, net_attack)
            async with trio.open_nursery() as n:
                async def drain():
                    while True:
                        counts["good"] += _accepted(good)
                        counts["bad"] += _accepted(bad)
                        await trio.sleep(0.005)

                n.start_soon(drain)
                r = await sb.run(["./na", "flip", "127.0.0.1", str(gp), str(bp), "3000"], timeout=120)
                await trio.sleep(0.05)
                n.cancel_scope.cancel()
            return r, sb._life.supervisor.connects_pumped

    try:
        r, pumped = trio.run(main)
        counts["good"] += _accepted(good)
        counts["bad"] += _accepted(bad)
    finally:
        good.close()
        bad.close()
    out = r.stdout.decode()
    assert "flip: OK" in out, out
    fields = dict(kv.split("=") for kv in out.split("flip: OK ")[1].split())
    assert counts["bad"] == 0, (counts, out)
    assert int(fields["good"]) > 0 and int(fields["refused"]) > 0, out
    assert counts["good"] == int(fields["good"]), (counts, out)
    assert pumped > 0


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pumps_end_with_their_sandbox():
    """Twelve allow-mode sandboxes, each connecting, opened and closed: the
    host process's threads and fds are back where they were, and the pump
    thread of an open sandbox is visible while it is open."""
    good = _listener()
    port = good.getsockname()[1]
    code = f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"

    async def main():
        async with zviz.open_sandbox(_allow(f"127.0.0.1:{port}")) as sb:  # warm-up: trio's own threads exist
            await sb.run(["python3", "-c", code])
        _accepted(good)
        before = _tasks(), _fds()
        during = []
        for _ in range(12):
            async with zviz.open_sandbox(_allow(f"127.0.0.1:{port}")) as sb:
                r = await sb.run(["python3", "-c", code])
                assert r.ok, r
                during.append(_tasks())
        for _ in range(100):  # the threads end as soon as they see their stop (or the hang-up)
            if _tasks() <= before[0]:
                break
            await trio.sleep(0.01)
        return before, (_tasks(), _fds()), during

    try:
        before, after, during = trio.run(main)
        assert _accepted(good) == 12
    finally:
        good.close()
    assert min(during) >= before[0] + 1, (before, during)
    assert after[0] <= before[0], (before, after)
    assert after[1] <= before[1], (before, after)


def test_a_sandbox_holding_its_mmap_lock_stalls_neither_the_host_nor_a_neighbours_connects(net_attack):  # noqa: F811
    """One sandbox forks over 60,000 mappings in a loop (its mmap_lock
    busy) while a thread connects to its allowed endpoint as fast as it can:
    its pump waits on that lock, in its own thread. The host's event loop
    stays prompt, a neighbour's /bin/true too, and a second allow-mode
    sandbox's connects stay fast."""
    with open("/proc/sys/vm/max_map_count") as f:
        if int(f.read()) < 65000:
            pytest.skip("vm.max_map_count below 65000")
    os.sync()  # (what the file system still has to write, a fresh CI's installs, is not this test's lag)
    good = _listener()
    port = good.getsockname()[1]
    neighbour_connects: list[float] = []

    async def storm():
        import attrs

        pol = _allow(f"127.0.0.1:{port}")
        pol = attrs.evolve(pol, limits=attrs.evolve(pol.limits, memory=None))
        code = (f"import socket, time\nts = []\nfor _ in range(100):\n    t = time.perf_counter()\n"
                f"    socket.create_connection(('127.0.0.1', {port})).close()\n"
                f"    ts.append(time.perf_counter() - t)\n    time.sleep(0.01)\nprint(max(ts))")
        async with zviz.open_sandbox(pol) as sb, zviz.open_sandbox(_allow(f"127.0.0.1:{port}")) as other:
            await _install(sb, net_attack)
            async with trio.open_nursery() as n:
                async def drain():
                    while True:
                        _accepted(good)
                        await trio.sleep(0.005)

                n.start_soon(drain)
                async def neighbour():
                    await trio.sleep(0.5)
                    r = await other.run(["python3", "-c", code])
                    neighbour_connects.append(float(r.stdout))

                n.start_soon(neighbour)
                r = await sb.run(["./na", "storm", "3", "60000", "0", str(port)], timeout=60)
                while not neighbour_connects:
                    await trio.sleep(0.05)
                n.cancel_scope.cancel()
            return r

    try:
        lag, neighbour, r = _lag_under(storm)
    finally:
        good.close()
    out = r.stdout.decode()
    assert "storm: OK" in out, r
    connected = int(out.split()[-2])
    assert connected > 10, out
    assert lag < 0.25, f"the host's loop lagged {lag * 1000:.0f} ms"
    assert neighbour < 0.5, f"a neighbour's /bin/true took {neighbour * 1000:.0f} ms"
    assert neighbour_connects[0] < 0.25, f"another sandbox's connect took {neighbour_connects[0] * 1000:.0f} ms"


def test_a_changed_allowlist_reaches_the_pump():
    """set_network() to another endpoint: the pump refuses the old one at
    once (Python refuses it, with an event) and performs the new one."""
    a, b = _listener(), _listener()
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    code = ("import socket, sys\nfor p in sys.argv[1:]:\n    try:\n        socket.create_connection(('127.0.0.1', "
            "int(p))).close(); print(p, 'ok')\n    except OSError as e:\n        print(p, e.errno)")

    async def main():
        async with zviz.open_sandbox(_allow(f"127.0.0.1:{pa}")) as sb:
            first = await sb.run(["python3", "-c", code, str(pa), str(pb)])
            await sb.set_network(zviz.Network(mode="allow", allow=[f"127.0.0.1:{pb}"]))
            second = await sb.run(["python3", "-c", code, str(pa), str(pb)])
            return first.stdout.decode(), second.stdout.decode(), sb._life.supervisor.connects_pumped

    try:
        first, second, pumped = trio.run(main)
        time.sleep(0.05)
        assert _accepted(a) == 1 and _accepted(b) == 1
    finally:
        a.close()
        b.close()
    assert first.split("\n")[:2] == [f"{pa} ok", f"{pb} 13"], first
    assert second.split("\n")[:2] == [f"{pa} 13", f"{pb} ok"], second
    assert pumped == 2
