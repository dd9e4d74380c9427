"""The blank network namespace (zviz/_netns.py): a `none` sandbox starts in
zviz's blank namespace and its sockets are made by the supervisor in one of
its own (zviz/_sockets.py). What the host sees: which namespace each
process and socket is in, that nothing is ever made in the blank one, that
no host thread is left in another namespace, and what a hostile program
gets from the supervisor's socketpair (a bad pointer, a read-only page, a
race with munmap)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import textwrap
import threading

import attrs
import pytest
import trio

import zviz
from zviz import _kernel, _netns, _spec, _stage

from ..conftest import IS_ROOT, open_fds

pytestmark = pytest.mark.skipif(not (IS_ROOT and _netns.usable()),
                                reason="the blank network namespace needs root (zviz makes and enters "
                                "network namespaces)")

SIOCGSKNS = 0x894C
PY = "/usr/bin/python3"


def _ino(path: str) -> int:
    return os.stat(path).st_ino


def _blank_ino() -> int:
    fd = _netns.blank_fd()
    assert fd is not None
    return os.fstat(fd).st_ino


async def _py(sb: zviz.Sandbox, code: str, timeout: float = 30) -> dict:
    r = await sb.run([PY, "-c", textwrap.dedent(code)], timeout=timeout)
    assert r.exit_code == 0, r.stderr.decode()[-2000:]
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def _lazy(lazy: bool) -> zviz.Policy:
    pol = zviz.Policy.python()
    return attrs.evolve(pol, namespaces=attrs.evolve(pol.namespaces, lazy_net=lazy))


def _socket_netns(pid: int, fd: int) -> int:
    """The namespace a sandbox's socket is in, asked on the host (SIOCGSKNS)."""
    pidfd = os.pidfd_open(pid)
    try:
        ours = _stage.pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        ns = fcntl.ioctl(ours, SIOCGSKNS)
        try:
            return os.fstat(ns).st_ino
        finally:
            os.close(ns)
    finally:
        os.close(ours)


def _host_pid_of(marker: str) -> int:
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        return int(p)
            except OSError:
                continue
    raise AssertionError(f"no process with {marker}")


HOLD = """
import os, socket, sys, json
marker = {marker!r}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0" + {name!r}); s.listen()
print(json.dumps({{"fd": s.fileno(), "ns": os.stat("/proc/self/ns/net").st_ino}}), flush=True)
sys.stdin.read()
"""


def test_the_sandbox_is_in_the_blank_namespace_and_its_sockets_in_one_of_its_own():
    """Two sandboxes at once each bind the same abstract name the host binds
    too: all three succeed; each sandbox's process is in the blank namespace,
    each one's socket in a namespace of its own (neither the blank, nor the
    host's, nor the other's)."""
    name = "zviz-same-" + secrets.token_hex(4)
    host_ns, blank = _ino("/proc/self/ns/net"), _blank_ino()

    async def main():
        seen = []
        host = socket.socket(socket.AF_UNIX)
        host.bind("\0" + name)
        host.listen()
        async with zviz.open_sandbox(zviz.Policy.python()) as a, zviz.open_sandbox(zviz.Policy.python()) as b:
            procs = []
            for sb in (a, b):
                marker = "zviz-marker-" + secrets.token_hex(4)
                p = await sb.start([PY, "-c", HOLD.format(marker=marker, name=name), marker], stderr=False)
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await p.stdout.receive_some()
                    assert chunk, "the holder ended early"
                    line += chunk
                info = json.loads(line)
                pid = _host_pid_of(marker)
                seen.append((info["ns"], _ino(f"/proc/{pid}/ns/net"), _socket_netns(pid, info["fd"])))
                procs.append(p)
            for p in procs:
                await p.stdin.send_all(b"")
                await p.stdin.aclose()
                await p.wait()
        host.close()
        return seen

    seen = trio.run(main)
    (a_in, a_host, a_sock), (b_in, b_host, b_sock) = seen
    assert a_in == b_in == a_host == b_host == blank  # inside and from the host: the blank one
    assert a_sock not in (blank, host_ns) and b_sock not in (blank, host_ns)
    assert a_sock != b_sock


EVERY_KIND = """
import json, os, socket
a, b = socket.socketpair()
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
q = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); q.bind("/tmp/q.sock"); q.listen()
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); c.connect("/tmp/q.sock"); x, _ = q.accept()
c.send(b"m"); got = x.recv(1)
ab = socket.socket(socket.AF_UNIX); ab.bind("\\0zviz-kind"); ab.listen()
auto = socket.socket(socket.AF_UNIX); auto.bind("")
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
names = socket.if_nameindex()
print(json.dumps({"got": got.decode(), "names": names, "auto": auto.getsockname()[:1] == b"\\0"}))
"""

SHOW = """
import json
def lines(p):
    with open(p) as f:
        return f.read().splitlines()
dev = [l.split() for l in lines("/proc/net/dev")[2:]]
print(json.dumps({"unix": lines("/proc/net/unix")[1:], "netlink": lines("/proc/net/netlink")[1:],
                  "dev": dev}))
"""


def test_nothing_is_ever_made_in_the_blank_namespace():
    """A sandbox makes sockets of every kind it may (and a route socket's
    dump); another reads the blank namespace's /proc/net meanwhile, and the
    host reads it after: no socket, no traffic on its loopback."""

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as a:
            made = await _py(a, EVERY_KIND)
            async with zviz.open_sandbox(zviz.Policy.python()) as b:
                shown = await _py(b, SHOW)
        return made, shown

    made, shown = trio.run(main)
    assert made["got"] == "m" and made["auto"]
    assert [n for _, n in made["names"]] == ["lo"]  # the sandbox's own namespace: its loopback only
    assert shown["unix"] == []
    assert shown["netlink"] and all(line.split()[2] == "0" for line in shown["netlink"])  # the kernel's own only
    assert [d[0] for d in shown["dev"]] == ["lo:"] and all(v == "0" for v in shown["dev"][0][1:])

    def read_blank() -> list[str]:
        fd = _netns.blank_fd()
        assert fd is not None
        from zviz import _kernel as k

        assert k._c().setns(fd, 0x40000000) == 0
        with open("/proc/thread-self/net/unix") as f:
            return f.read().splitlines()[1:]

    out: list[list[str]] = []
    t = threading.Thread(target=lambda: out.append(read_blank()))
    t.start()
    t.join()
    assert out == [[]]


SOCKETS = r"""
import asyncio, ctypes, fcntl, json, os, socket, subprocess
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def fds():
    return len(os.listdir("/proc/self/fd"))
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
out["flags"] = [bool(fcntl.fcntl(a.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                bool(fcntl.fcntl(b.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)]
raw = (ctypes.c_int * 2)()
libc.socketpair(1, 1, 0, raw)  # (no SOCK_CLOEXEC: Python's own sockets always have it)
out["inherit"] = not (fcntl.fcntl(raw[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
c, d = socket.socketpair()
child = subprocess.run(["/usr/bin/python3", "-c", f"import os; os.write({c.fileno()}, b'from-child')"],
                       pass_fds=[c.fileno()])
out["child"] = d.recv(20).decode()
r, w = socket.socketpair()
socket.send_fds(w, [b"x"], [c.fileno()])
msg, got, _, _ = socket.recv_fds(r, 1, 1)
os.write(got[0], b"passed"); out["scm"] = d.recv(10).decode()
async def m():
    rd, wr = await asyncio.open_unix_connection(sock=socket.socketpair()[0])
    return "asyncio"
out["asyncio"] = asyncio.run(m())
before = fds()
sv = (ctypes.c_int * 2)()
out["einval"] = [libc.socket(1, 99, 0), ctypes.get_errno()]
out["efault"] = [libc.socketpair(1, 1, 0, ctypes.c_void_p(8)), ctypes.get_errno()]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
ro_page = libc.mmap(None, 4096, 1, 0x22, -1, 0)  # PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS
out["readonly"] = [libc.socketpair(1, 1, 0, ctypes.c_void_p(ro_page)), ctypes.get_errno(),
                   ctypes.string_at(ro_page, 8) == b"\0" * 8]
out["leaked"] = fds() - before
out["ok"] = [libc.socketpair(1, 1, 0, sv), sv[0] >= 0, sv[1] >= 0]
out["inet"] = [libc.socket(2, 1, 0), ctypes.get_errno()]
print(json.dumps(out))
"""


def test_sockets_work_and_a_bad_pointer_gets_what_the_kernel_would_say():
    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            r = await sb.run([PY, "-c", SOCKETS], timeout=30)
            return r

    r = trio.run(main)
    assert r.exit_code == 0, r.stderr.decode()[-2000:]
    out = json.loads(r.stdout.decode().splitlines()[-1])
    assert out["flags"] == [True, True] and out["inherit"]
    assert out["child"] == "from-child" and out["scm"] == "passed" and out["asyncio"] == "asyncio"
    assert out["einval"] == [-1, errno.EINVAL]  # the kernel's own answer, passed through
    assert out["efault"] == [-1, errno.EFAULT]
    assert out["readonly"] == [-1, errno.EFAULT, True]  # not written through /proc/PID/mem's force
    assert out["leaked"] == 0  # neither refused pair left an fd behind
    assert out["ok"] == [0, True, True]
    assert out["inet"][0] == -1 and r.denials.get("socket", 0) >= 1  # other families: refused and reported


ABSTRACT = """
import json, socket
s = socket.socket(socket.AF_UNIX); s.bind("\\0zviz-abstract"); s.listen()
c = socket.socket(socket.AF_UNIX)
try:
    c.connect("\\0zviz-abstract"); r = "connected"
except OSError as e:
    r = e.errno
print(json.dumps({"r": r}))
"""


def test_abstract_connections_need_lazy_net_off():
    """Landlock scopes an abstract socket by its maker: made by zviz, a
    command's own abstract server is out of its reach (EPERM). With
    `lazy_net = False` the sandbox makes its sockets itself, as before."""

    async def main():
        out = []
        for lazy in (True, False):
            async with zviz.open_sandbox(_lazy(lazy)) as sb:
                out.append((await _py(sb, ABSTRACT))["r"])
        return out

    assert trio.run(main) == [errno.EPERM, "connected"]


def test_no_host_thread_is_left_in_another_namespace():
    """After sandboxes spawned in the blank namespace and had sockets made in
    their own, the loop's thread and the worker threads are in the host's."""
    host_ns = _ino("/proc/thread-self/ns/net")
    before = open_fds()

    async def main():
        for _ in range(6):
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                await _py(sb, "import socket, json; socket.socketpair(); socket.socket(socket.AF_UNIX); "
                              "print(json.dumps({}))")
        return [await trio.to_thread.run_sync(_ino, "/proc/thread-self/ns/net") for _ in range(8)]

    workers = trio.run(main)
    assert _ino("/proc/thread-self/ns/net") == host_ns
    assert set(workers) == {host_ns}
    assert open_fds() - before <= {_netns.blank_fd()}  # every sandbox's own namespace closed with it


RACE = r"""
import ctypes, json, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
page = libc.mmap(None, 4096, 3, 0x22, -1, 0)
stop = False
def flip():  # the page read-only, writable, gone (PROT_NONE), a new one: never a hole another mmap could take
    while not stop:
        libc.mprotect(ctypes.c_void_p(page), 4096, 1)
        libc.mprotect(ctypes.c_void_p(page), 4096, 3)
        libc.mmap(ctypes.c_void_p(page), 4096, 0, 0x32, -1, 0)  # MAP_FIXED over itself: PROT_NONE
        libc.mmap(ctypes.c_void_p(page), 4096, 3, 0x32, -1, 0)  # and a fresh writable one
res = {"ok": 0, "efault": 0, "other": 0}
def pairs():
    for _ in range(100):  # (the pairs made stay open: reading the page would race the flipper)
        r = libc.socketpair(1, 1, 0, ctypes.c_void_p(page))
        if r == 0:
            res["ok"] += 1
        elif ctypes.get_errno() == 14:
            res["efault"] += 1
        else:
            res["other"] += 1
t = threading.Thread(target=flip); t.start()
ws = [threading.Thread(target=pairs) for _ in range(3)]
[w.start() for w in ws]; [w.join() for w in ws]
stop = True; t.join()
print(json.dumps(res))
"""


def test_a_socketpair_racing_munmap_and_mprotect_harms_only_its_caller():
    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            runs = []
            while len(runs) < 8 and sum(r["ok"] for r in runs) == 0:  # (until the race went both ways)
                runs.append(await _py(sb, RACE, timeout=60))
            after = await _py(sb, "import json, socket; a, b = socket.socketpair(); a.send(b'k'); "
                                  "print(json.dumps({'k': b.recv(1).decode()}))")
        return runs, after

    runs, after = trio.run(main)
    assert all(r["ok"] + r["efault"] + r["other"] == 300 and r["other"] == 0 for r in runs), runs
    assert sum(r["ok"] for r in runs) > 0 and sum(r["efault"] for r in runs) > 0, runs
    assert after == {"k": "k"}  # the supervisor still serves the sandbox


def test_a_warm_snippet_starts_in_the_blank_namespace_too():
    code = ("import asyncio, os, socket\n"
            "async def m():\n    a, b = socket.socketpair(); return 'ok'\n"
            "print(os.stat('/proc/self/ns/net').st_ino, asyncio.run(m()))")

    async def main():
        return await zviz.run_snippet(code, timeout=30)

    r = trio.run(main)
    assert r.exit_code == 0, r.stderr
    ino, word = (r.stdout.decode() if isinstance(r.stdout, bytes) else r.stdout).split()
    assert int(ino) == _blank_ino() and word == "ok"


def test_the_stage_refuses_a_blank_spawn_without_the_blank_namespace():
    """The C stage's own check: a stage planned for the blank namespace with
    no namespace given, or given the caller's own, fails the spawn (never
    the host's network)."""
    null = _kernel.open_devnull()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        stage = _spec.StageSpec(clone_flags=_kernel.CLONE_NEWUSER, uid_map="0 0 1\n", gid_map="0 0 1\n",
                                blank_netns=True)
        true = _spec.Command(exe=b"/bin/true", argv=(b"/bin/true",), envp=(), cwd=b"/", stdin=null.fd,
                             stdout=null.fd, stderr=null.fd)
        for fd, err in ((-1, errno.EBADF), (own, errno.EINVAL)):
            with pytest.raises(OSError) as e:
                _stage.spawn(stage.pack(), attrs.evolve(true, netns_fd=fd).pack())
            assert e.value.errno == err
        both = attrs.evolve(stage, clone_flags=_kernel.CLONE_NEWUSER | 0x40000000)
        with pytest.raises(ValueError, match="blank"):
            _stage.spawn(both.pack(), attrs.evolve(true, netns_fd=_netns.blank_fd()).pack())
        assert _ino("/proc/thread-self/ns/net") == os.fstat(own).st_ino
    finally:
        os.close(own)
        null.close()


def test_socketpair_peer_credentials_name_no_process_of_the_sandbox():
    """What differs, documented: a pair's peer credentials are its maker's,
    zviz's (outside the sandbox: pid 0, the overflow uid)."""

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            return await _py(sb, "import json, socket, struct; a, b = socket.socketpair(); "
                                 "print(json.dumps(struct.unpack('3i', a.getsockopt(socket.SOL_SOCKET, "
                                 "socket.SO_PEERCRED, 12))))")

    pid, uid, _gid = trio.run(main)
    assert pid == 0 and uid == 65534


CHANGE = r"""
import errno, fcntl, json, socket, struct
out = {}
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try:
    fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", 1))  # SIOCSIFFLAGS: lo up
    out["up"] = "done"
except OSError as e:
    out["up"] = e.errno
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
# RTM_NEWLINK: a dummy interface named zz (NLM_F_REQUEST|NLM_F_ACK|NLM_F_CREATE|NLM_F_EXCL)
kind = b"dummy\0\0\0"
linkinfo = struct.pack("HH", 4 + 4 + len(kind), 18) + struct.pack("HH", 4 + len(kind), 1) + kind
name = struct.pack("HH", 4 + 4, 3) + b"zz\0\0"
body = struct.pack("BxHiII", 0, 0, 0, 0, 0) + name + linkinfo
msg = struct.pack("IHHII", 16 + len(body), 16, 0x1 | 0x4 | 0x400 | 0x200, 1, 0) + body
n.send(msg)
reply = n.recv(4096)
out["newlink"] = -struct.unpack_from("i", reply, 16)[0]
print(json.dumps(out))
"""


def test_the_sandbox_cannot_change_its_own_namespace():
    """Its namespace belongs to the host's user namespace: lo stays down, no
    interface can be made (EPERM from the ioctl, EPERM in rtnetlink's ack)."""

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            return await _py(sb, CHANGE)

    assert trio.run(main) == {"up": errno.EPERM, "newlink": errno.EPERM}


MATRIX = r"""
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
G = 0xDEADBEEF << 32
socket.socketpair()  # (the first socket: from here on, in the blank namespace, the pump makes them)
fams = [1, 2, 10, 16, 17, 0, G | 1, G | 16, 1 << 32]
kinds = [1, 2, 3, 5, 10, 1 | 0o4000, 3 | 0o2000000, 2 | 0o4000 | 0o2000000, 3 | 0x100, G | 3, 0xFFFFFFFF]
protos = [0, 1, 4, 9, G]
sv = (ctypes.c_int * 2)()
out = []
for nr in (41, 53):
    for f in fams:
        for k in kinds:
            for p in protos:
                args = [ctypes.c_ulong(f), ctypes.c_ulong(k), ctypes.c_ulong(p)]
                if nr == 53:
                    args.append(sv)
                r = libc.syscall(nr, *args)
                e = ctypes.get_errno() if r < 0 else 0
                if r >= 0:
                    for fd in ((r,) if nr == 41 else (sv[0], sv[1])):
                        os.close(fd)
                out.append([nr, f, k, p, r >= 0, e])
print(json.dumps(out))
"""


def test_the_pump_makes_exactly_what_the_kernel_would_have():
    """Every socket() and socketpair() of a matrix (families, types, flags,
    protocols, garbage in the high bits), made by the pump in a blank sandbox
    and in-kernel in a sandbox with its namespace at clone: the same
    outcome and errno for each, and as many refusals reported."""

    async def main():
        out = []
        for lazy in (True, False):
            async with zviz.open_sandbox(_lazy(lazy)) as sb:
                r = await sb.run([PY, "-c", MATRIX], timeout=60)
                assert r.exit_code == 0, r.stderr.decode()[-2000:]
                out.append((json.loads(r.stdout.decode().splitlines()[-1]), dict(r.denials)))
        return out

    (blank, blank_denials), (own, own_denials) = trio.run(main)
    assert len(blank) == len(own) == 2 * 9 * 11 * 5
    assert any(ok for *_, ok, _e in blank)  # (some were made)
    differ = [(b, o) for b, o in zip(blank, own, strict=True) if b != o]
    assert not differ, differ[:10]
    assert blank_denials == own_denials


def forked(n: int, body: str, *, hold_s: float = 0.0, tail: str = "") -> str:
    """A program whose `n` forked children each run `body` (`k` is a child's
    index; it counts in `made` and sets `err`), report, and hold what they
    made until every one has (and `hold_s` more); then `tail` runs, and it
    prints {"made": the total, "errnos": the children's}."""
    return f"""
import array, errno, json, os, socket, time
report_r, report_w = os.pipe()
hold_r, hold_w = os.pipe()
N = {n}
for k in range(N):
    if os.fork() == 0:
        os.close(hold_w)
        made, err, socks = 0, 0, []
{textwrap.indent(textwrap.dedent(body).strip(), " " * 8)}
        os.write(report_w, (json.dumps([made, err]) + "\\n").encode())
        os.read(hold_r, 1)  # (holds what it made until every child has said)
        os._exit(0)
got = b""
while got.count(b"\\n") < N:
    got += os.read(report_r, 4096)
counts = [json.loads(line) for line in got.decode().splitlines()]
time.sleep({hold_s})
os.close(hold_w)
for _ in range(N):
    os.wait()
{textwrap.dedent(tail).strip()}
print(json.dumps({{"made": sum(n for n, _ in counts), "errnos": sorted({{e for _, e in counts}})}}))
"""


def making(n: int, make: str = "socket.socket(socket.AF_UNIX)") -> str:
    """A child's part of `forked`: up to `n` sockets made by `make`, held."""
    return f"""
    try:
        for _ in range({n}):
            socks.append({make})
            made += 1
    except OSError as e:
        err = e.errno
    """


MANY = forked(6, making(1000), tail="socket.socket(socket.AF_UNIX).close()  # (all closed: room again)")


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
def test_a_sandbox_holds_at_most_max_live_sockets_made_for_it(pumps, monkeypatch):
    """Its sockets are the host's memory (charged to the host's cgroup): six
    processes of one sandbox making 6000 between them get MAX_LIVE, the rest
    ENOBUFS with an event that says why; closed, there is room again."""
    from zviz import _pump, _sockets

    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            out = await _py(sb, MANY, timeout=120)
            return out, [e.detail for e in sb.events_so_far() if e.syscall == "socket"]

    out, details = trio.run(main)
    assert out["made"] == _sockets.MAX_LIVE and errno.ENOBUFS in out["errnos"], out
    assert details and all("at most" in d and "lazy_net" in d for d in details), details[:3]
