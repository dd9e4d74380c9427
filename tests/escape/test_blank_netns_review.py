"""A hostile review of the blank network namespace (zviz/_netns.py,
zviz/_sockets.py, the pump's fast_socket): what a program inside a `none`
sandbox (or a concurrent one) tried, and what the host observed. Each test
says what was tried and what held; the one that found a bug says so.

Beside tests/escape/test_blank_netns.py (which it does not repeat)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import trio

import zviz
from zviz import _kernel, _netns, _pump, _sockets

from ..conftest import IS_ROOT, open_fds

pytestmark = pytest.mark.skipif(not (IS_ROOT and _netns.usable()),
                                reason="the blank network namespace needs root (zviz makes and enters "
                                "network namespaces)")

PY = "/usr/bin/python3"


from .test_blank_netns import _blank_ino, _py  # noqa: E402


def _run(code: str, policy: zviz.Policy | None = None, timeout: float = 60) -> dict:
    async def main():
        async with zviz.open_sandbox(policy or zviz.Policy.python()) as sb:
            return await _py(sb, code, timeout)

    return trio.run(main)


def _blank_lines(what: str) -> list[str]:
    """/proc/net/<what> of the blank namespace, read on the host (a thread that enters it)."""
    fd = _netns.blank_fd()
    assert fd is not None
    out: list[list[str]] = []

    def read() -> None:
        assert _kernel._c().setns(fd, 0x40000000) == 0
        with open(f"/proc/thread-self/net/{what}") as f:
            out.append(f.read().splitlines())

    t = threading.Thread(target=read)  # (a thread of its own: it ends in the blank namespace)
    t.start()
    t.join()
    return out[0]


# ---- FOUND: a caller that dies while the Python supervisor installs its pair


PAIR_IN_A_THREAD = r"""
import ctypes, threading, time
libc = ctypes.CDLL(None, use_errno=True)
sv = (ctypes.c_int * 2)()
t = threading.Thread(target=lambda: libc.socketpair(1, 1, 0, sv))
t.start(); t.join()
print("{}")
"""


def test_a_caller_that_dies_while_its_pair_is_installed_does_not_fail_the_sandbox(monkeypatch):
    """FOUND (fixed). The Python supervisor installs a pair in a worker
    thread: it opens /proc/TID/mem, then /proc/TID/maps. A caller whose
    process dies in between (another of its threads calls exit_group: a
    hostile program does it in a loop) made the second open raise
    ProcessLookupError out of the worker, into the sandbox's service task
    group: the sandbox was torn down and the host's `async with` raised
    ProcessLookupError (seen 1 in ~120 such commands with the pump
    unavailable; the pump makes all but a sandbox's first socket). Here the
    host kills the caller at that very point, every time. Now: the call is
    answered as from a caller that is gone, and the sandbox goes on."""
    monkeypatch.setattr(_pump, "available", lambda: False)  # (every socket made by Python, as without pumps)
    killed: list[int] = []

    def open_then_kill(path, flags, *rest):
        fd = os.open(path, flags, *rest)
        if path.endswith("/mem") and not killed:
            tid = int(path.split("/")[2])
            with open(f"/proc/{tid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
            os.kill(tgid, signal.SIGKILL)
            killed.append(tid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the thread is gone from /proc
                try:
                    os.close(os.open(f"/proc/{tid}/maps", os.O_RDONLY))
                except OSError:
                    break
                time.sleep(0.005)
        return fd

    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake.open = open_then_kill
    monkeypatch.setattr(_sockets, "os", fake)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            first = await sb.run([PY, "-c", PAIR_IN_A_THREAD], timeout=30)
            second = await _py(sb, "import json, socket; a, b = socket.socketpair(); a.send(b'k'); "
                                   "print(json.dumps({'k': b.recv(1).decode()}))")
        return first, second

    first, second = trio.run(main)
    assert killed, "the pair never reached the Python supervisor"
    assert first.exit_code != 0  # (killed)
    assert second == {"k": "k"}  # the supervisor still serves the sandbox, and closing it raised nothing


def test_the_pair_worker_never_raises_into_the_sandbox_service():
    """The same, where the listener was closed meanwhile (its tasks all gone:
    the supervisor forgets it while the worker runs): the worker's ValueError
    was raised into the service task group. Now the call is answered (or
    not: nobody is left) and the host's copies of the pair are closed."""
    from zviz._supervisor import Supervisor

    listener = _kernel.OwnedFd(os.open("/dev/null", os.O_RDONLY), "listener")
    listener.close()
    a, b = socket.socketpair()
    fds = (a.detach(), b.detach())
    page = bytearray(8)
    addr = ctypes.addressof((ctypes.c_char * 8).from_buffer(page))
    n = _kernel.Notification(id=1, pid=threading.get_native_id(), nr=53, arch=0xC000003E,
                             args=(1, 1, 0, addr, 0, 0))

    async def main():
        sup = Supervisor(allowed_endpoints=frozenset(), net_allow=False, on_event=lambda e: None, task_group=None)
        await sup._install_pair(listener, n, fds, False)

    trio.run(main)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


# ---- held: the host's credentials on the sandbox's netlink and unix sockets

ROUTE = r"""
import errno, fcntl, json, os, socket, struct
out = {}
def nl(n, typ, flags, body):
    n.send(struct.pack("IHHII", 16 + len(body), typ, flags, 1, 0) + body)
    r = n.recv(65536)
    return -struct.unpack_from("i", r, 16)[0] if struct.unpack_from("H", r, 4)[0] == 2 else "answered"
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
NEW = 0x1 | 0x4 | 0x400 | 0x200  # REQUEST|ACK|CREATE|EXCL
out["newaddr"] = nl(n, 20, NEW, struct.pack("BBBBI", 2, 8, 0, 0, 1) + struct.pack("HH", 8, 2) + bytes([10, 9, 9, 9]))
out["newroute"] = nl(n, 24, NEW, struct.pack("BBBBBBBBI", 2, 0, 0, 0, 254, 4, 253, 1, 0)
                     + struct.pack("HHi", 8, 4, 1))
out["newnsid"] = nl(n, 88, 0x1 | 0x4, struct.pack("4x") + struct.pack("HHi", 8, 1, 5) + struct.pack("HHI", 8, 3, 1))
def opt(sock, level, name, value):
    try:
        sock.setsockopt(level, name, value)
        return "set"
    except OSError as e:
        return e.errno
out["rcvbufforce"] = opt(n, socket.SOL_SOCKET, 33, 1 << 24)
out["mark"] = opt(n, socket.SOL_SOCKET, 36, 7)
out["priority"] = opt(n, socket.SOL_SOCKET, socket.SO_PRIORITY, 7)
out["listen_all_nsid"] = opt(n, 270, 8, 1)
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
out["u_priority"] = opt(u, socket.SOL_SOCKET, socket.SO_PRIORITY, 7)
out["u_sndbufforce"] = opt(u, socket.SOL_SOCKET, 32, 1 << 26)
def ioc(fd, req, arg=0):
    try:
        fcntl.ioctl(fd, req, arg)
        return "done"
    except OSError as e:
        return e.errno
out["skns"] = ioc(u.fileno(), 0x894C)  # SIOCGSKNS: an fd of its namespace
ns = os.open("/proc/self/ns/net", os.O_RDONLY)
out["ns_userns"] = ioc(ns, 0xB701)  # NS_GET_USERNS of the blank namespace
try:
    with open("/proc/sys/net/core/somaxconn", "w") as f:
        f.write("5")
    out["sysctl"] = "written"
except OSError as e:
    out["sysctl"] = e.errno
print(json.dumps(out))
"""


def test_route_and_unix_sockets_made_with_the_hosts_credentials_change_nothing():
    """The sandbox's sockets are made by zviz (root, outside its namespaces):
    their file credentials are the host's. Every kernel check tried needs
    the caller's own capability too: no address, route or namespace id
    (rtnetlink EPERM), no privileged socket option, no listening to every
    namespace's events, no fd of the socket's namespace; the blank
    namespace's sysctls are read-only and its owner out of reach."""
    out = _run(ROUTE)
    assert out == {"newaddr": errno.EPERM, "newroute": errno.EPERM, "newnsid": errno.EPERM,
                   "rcvbufforce": errno.EPERM, "mark": errno.EPERM, "priority": errno.EPERM,
                   "listen_all_nsid": errno.EPERM, "u_priority": errno.EPERM, "u_sndbufforce": errno.EPERM,
                   "skns": errno.EPERM, "ns_userns": errno.EPERM, "sysctl": errno.EROFS}


PEERPIDFD = r"""
import ctypes, fcntl, json, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
a, b = socket.socketpair()
fd = struct.unpack("i", a.getsockopt(socket.SOL_SOCKET, 77, 4))[0]  # SO_PEERPIDFD
out = {"fdinfo": {l.split(":")[0]: l.split(":")[1].strip() for l in open(f"/proc/self/fdinfo/{fd}")}}
def call(*args):
    r = libc.syscall(*args)
    return ctypes.get_errno() if r < 0 else "done"
out["signal"] = call(424, fd, 0, None, 0)
out["getfd"] = call(438, fd, 0, 0)
out["setns"] = call(308, fd, 0x40000000)
ns = {}
for i in range(1, 11):  # PIDFD_GET_{CGROUP,IPC,MNT,NET,PID,PID_FOR_CHILDREN,TIME,..,USER,UTS}_NAMESPACE
    try:
        ns[i] = os.readlink(f"/proc/self/fd/{fcntl.ioctl(fd, 0xFF00 | i)}")
    except OSError as e:
        ns[i] = e.errno
out["ns"] = sorted(set(ns.values()), key=str)
print(json.dumps(out))
"""


def test_a_pairs_peer_pidfd_names_zviz_and_opens_nothing():
    """Tried: SO_PEERPIDFD on a pair (Linux 6.5+). Observed: a pidfd of
    zviz's own process (the pair's maker), a live reference to a host
    process the sandbox cannot see otherwise (it can poll it for zviz's
    exit). Nothing opens through it: its pid is 0 in the sandbox, its
    namespaces are out of reach (EACCES: ptrace rights), and signals,
    pidfd_getfd and setns are refused by the filter."""
    out = _run(PEERPIDFD)
    assert out["fdinfo"]["Pid"] == "0" and out["fdinfo"]["NSpid"] == "0"
    assert out["ns"] == [errno.EACCES]
    assert out["signal"] in (errno.ENOSYS, errno.EPERM) and out["getfd"] == errno.EPERM
    assert out["setns"] == errno.EPERM


# ---- held: nothing acts on the blank namespace but what zviz makes

OTHER_WAYS = r"""
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
u64 = ctypes.c_uint64
def call(*args):
    r = libc.syscall(*args)
    return ctypes.get_errno() if r < 0 else "made"
sv = (ctypes.c_int * 2)()
out = {
    "io_uring": call(425, 8, ctypes.create_string_buffer(120)),
    "unshare": call(272, 0x40000000),
    "setns": call(308, os.open("/proc/self/ns/net", os.O_RDONLY), 0x40000000),
    "inet": call(41, 2, 1, 0),
    "packet": call(41, 17, 3, 0),
    "generic_netlink": call(41, 16, 3, 16),
    "netlink_pair": call(53, 16, 3, 0, sv),
    "unix_family_high_bits": call(41, u64(1 | 1 << 32), 1, 0),
    "route_type_high_bits": call(41, 16, u64(3 | 1 << 32), 0),
    "route_protocol_high_bits": call(41, 16, 3, u64(1 << 32)),
    "route_family_high_bits": call(41, u64(16 | 1 << 32), 3, 0),
    "unix_type_high_bits": call(41, 1, u64(1 | 0xFFFFFFFF << 32), 0),  # (the kernel reads an int: made)
    "unix_bad_protocol": call(41, 1, 1, 7),
    "pair_bad_type": call(53, 1, 99, 0, sv),
}
print(json.dumps(out))
"""


def test_every_other_way_to_a_socket_or_the_namespace_is_refused():
    """Tried: io_uring (IORING_OP_SOCKET), unshare and setns of a network
    namespace, other families and protocols, garbage in the high bits of
    family, type and protocol. Refused as before, except what the kernel
    itself reads as an int (a unix socket's type): made, as in-kernel."""
    out = _run(OTHER_WAYS)
    refused = {k for k, v in out.items() if v in (errno.EPERM, errno.EACCES, errno.ENOSYS)}
    assert refused == {"io_uring", "unshare", "setns", "inet", "packet", "generic_netlink", "netlink_pair",
                       "unix_family_high_bits", "route_type_high_bits", "route_protocol_high_bits",
                       "route_family_high_bits"}
    assert out["unix_type_high_bits"] == "made"
    assert out["unix_bad_protocol"] == errno.EPROTONOSUPPORT and out["pair_bad_type"] == errno.EINVAL


STACKED = r"""
import ctypes, json, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def prog(action):  # socket and socketpair -> action, the rest allowed
    ins = [(0x20, 0, 0, 0), (0x15, 2, 0, 41), (0x15, 1, 0, 53), (0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, action)]
    raw = b"".join(struct.pack("HBBI", *i) for i in ins)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(buf))
    return buf, ctypes.create_string_buffer(fprog)
out = {}
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    keep = prog(0x7FC00000)  # SECCOMP_RET_USER_NOTIF, for a listener this filter cannot have (prctl)
    libc.prctl(38, 1, 0, 0, 0)
    res = [libc.prctl(22, 2, keep[1], 0, 0), ctypes.get_errno()]
    res.append([libc.syscall(41, 1, 1, 0), ctypes.get_errno()])
    os.write(w, json.dumps(res).encode()); os._exit(0)
os.waitpid(pid, 0)
out["notif"] = json.loads(os.read(r, 1000))
keep = prog(0x7FFF0000)  # SECCOMP_RET_ALLOW: cannot outrank zviz's notification
libc.prctl(38, 1, 0, 0, 0)
out["allow_loaded"] = libc.prctl(22, 2, keep[1], 0, 0)
s = socket.socket(socket.AF_UNIX); s.bind("\0zviz-stacked"); s.listen()
out["unix"] = open("/proc/net/unix").read().splitlines()[1:]
print(json.dumps(out))
"""


def test_a_filter_the_sandbox_stacks_cannot_let_a_socket_through():
    """Tried: a filter of the program's own (prctl: no listener) that
    answers socket() with USER_NOTIF (for a supervisor of its own to
    CONTINUE it, which would make it in-kernel, in the blank namespace), or
    with ALLOW. Observed: USER_NOTIF without a listener is ENOSYS; ALLOW
    never outranks zviz's notification: the socket is still zviz's, in the
    sandbox's own namespace, and the blank one stays empty."""
    out = _run(STACKED)
    assert out["notif"] == [0, 0, [-1, errno.ENOSYS]]
    assert out["allow_loaded"] == 0 and out["unix"] == []
    assert _blank_lines("unix")[1:] == []


I386 = r"""
import ctypes, mmap, os, signal, json
# i386 socket(AF_UNIX, SOCK_STREAM, 0) by int 0x80 (nr 359), rbx kept: the filter's architecture check
code = bytes.fromhex("53b867010000bb01000000b90100000031d2cd805bc3")
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
pid = os.fork()
if pid == 0:
    f(); os._exit(0)
_, st = os.waitpid(pid, 0)
print(json.dumps({"signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None}))
"""


def test_the_i386_socket_call_kills_its_caller():
    """Tried: socket() through the 32-bit ABI (int 0x80), which the pump and
    the supervisor never see as x86_64. Observed: killed by the filter."""
    assert _run(I386) == {"signal": int(signal.SIGSYS)}


# ---- held: where the supervisor writes a pair's numbers

ODD_PLACES = r"""
import ctypes, json, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
P = 4096
def fds():
    return len(os.listdir("/proc/self/fd"))
def pair_at(addr):
    r = libc.syscall(53, 1, 1, 0, ctypes.c_uint64(addr))
    return "made" if r == 0 else ctypes.get_errno()
out, before = {}, fds()
for line in open("/proc/self/maps"):
    name = line.split()[-1]
    if name in ("[vdso]", "[vvar]", "[vsyscall]"):
        lo = int(line.split("-")[0], 16)
        out[name] = [pair_at(lo), ctypes.string_at(lo, 8).hex() if name == "[vdso]" else None]
a = libc.mmap(None, 4 * P, 3, 0x22, -1, 0)
out["guard_installed"] = libc.madvise(a + P, P, 102)  # MADV_GUARD_INSTALL (6.13)
out["guard"] = pair_at(a + P)
out["into_guard"] = pair_at(a + P - 4)
libc.mprotect(a + 2 * P, P, 0)
out["prot_none"] = pair_at(a + 2 * P)
libc.mprotect(a + 3 * P, P, 1)
out["into_read_only"] = [pair_at(a + 3 * P - 4), ctypes.string_at(a + 3 * P, 4).hex()]
out["kernel"] = pair_at(0xFFFFFFFFFF600000)
out["wraps"] = pair_at((1 << 64) - 4)
out["null"] = pair_at(0)
ro = os.open("/etc/passwd", os.O_RDONLY)
s = libc.mmap(None, P, 1, 0x01, ro, 0)  # MAP_SHARED, read-only
first = ctypes.string_at(s, 8)
out["shared_read_only"] = [pair_at(s), ctypes.string_at(s, 8) == first]
f = libc.mmap(None, P, 1, 0x02, ro, 0)  # MAP_PRIVATE, read-only: the mem file would copy it and write
out["private_read_only"] = [pair_at(f), ctypes.string_at(f, 8) == first]
# two writable mappings side by side (anonymous, then shared): a pair across them is made
b = libc.mmap(None, 2 * P, 3, 0x22, -1, 0)
libc.mmap(b + P, P, 3, 0x21 | 0x10, -1, 0)  # MAP_SHARED|MAP_ANONYMOUS|MAP_FIXED
out["across_two_writable"] = pair_at(b + P - 4)
out["leaked"] = fds() - before - 3  # (ro, and the pair made)
print(json.dumps(out))
"""


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
def test_a_pair_is_written_only_where_the_caller_could_write_it(monkeypatch, pumps):
    """Tried, through the C pump and through the Python supervisor: a pair's
    numbers aimed at the vDSO, vvar, vsyscall, a guard region (and across
    its edge), a PROT_NONE page, across the edge of a read-only page, a
    kernel address, one that wraps, NULL, a shared read-only file mapping
    and a private one (which the mem file would write through its copy).
    Observed: EFAULT for each, nothing written, no fd left behind; across
    two adjacent writable mappings: made."""
    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)
    out = _run(ODD_PLACES)
    for name in ("[vdso]", "[vvar]", "[vsyscall]"):
        if name in out:
            assert out[name][0] == errno.EFAULT, name
    assert out["[vdso]"][1] != "ffffffffffffffff"
    guard = ["guard", "into_guard"] if out["guard_installed"] == 0 else []
    for name in [*guard, "prot_none", "kernel", "wraps", "null"]:
        assert out[name] == errno.EFAULT, name
    assert out["into_read_only"] == [errno.EFAULT, "00000000"]
    assert out["shared_read_only"] == [errno.EFAULT, True]
    assert out["private_read_only"] == [errno.EFAULT, True]
    assert out["across_two_writable"] == "made"
    assert out["leaked"] == 0


# ---- held: what one sandbox can learn of another through the blank namespace

SNOOP = r"""
import json, os, socket, struct, sys
def read(p):
    with open(p) as f:
        return f.read()
views = {p: read("/proc/net/" + p) for p in ("sockstat", "protocols", "unix", "netlink", "dev", "snmp", "netstat")}
# a netlink message to the holder's port id (its namespace's): never here
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
try:
    n.sendto(struct.pack("IHHII", 16, 3, 0, 1, 0), (int(sys.argv[1]), 0))
    sent = "sent"
except OSError as e:
    sent = e.errno
print(json.dumps({"views": views, "sent": sent}))
"""

HOLDER = r"""
import json, socket, sys
keep = [socket.socketpair() for _ in range(100)]
abstract = []
for i in range(20):
    s = socket.socket(socket.AF_UNIX); s.bind("\0zviz-held-%d" % i); s.listen(); abstract.append(s)
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); n.bind((0, 1))  # RTMGRP_LINK
print(json.dumps({"portid": n.getsockname()[0]}), flush=True)
sys.stdin.read()
"""


def test_a_sandbox_learns_nothing_of_another_through_the_blank_namespace():
    """Tried: while one sandbox holds 200 sockets, 20 abstract servers and
    a route socket in a multicast group, another reads the blank
    namespace's /proc/net (counters included: sockstat, protocols, snmp)
    and sends a netlink message to the first one's port id. Observed: the
    same views as before the first one started, and the message reaches
    nobody (EPERM: a route socket sends to a port id only with
    CAP_NET_ADMIN over its namespace, the sender's own, not its maker's)."""

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as a, zviz.open_sandbox(zviz.Policy.python()) as b:
            r = await b.run([PY, "-c", SNOOP, "1"], timeout=30)
            pristine = json.loads(r.stdout)["views"]
            p = await a.start([PY, "-c", HOLDER], stderr=False)
            line = b""
            while not line.endswith(b"\n"):
                chunk = await p.stdout.receive_some()
                assert chunk, "the holder ended early"
                line += chunk
            portid = json.loads(line)["portid"]
            r = await b.run([PY, "-c", SNOOP, str(portid)], timeout=30)
            during = json.loads(r.stdout)
            await p.stdin.aclose()
            await p.wait()
        return pristine, during

    pristine, during = trio.run(main)
    assert during["views"] == pristine
    assert during["sent"] == errno.EPERM


# ---- held: the host's threads, fds and limits under a hostile storm

STORM = r"""
import ctypes, json, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
signal.signal(signal.SIGUSR1, lambda *a: None)
def worker(stop):
    sv = (ctypes.c_int * 2)()
    while not stop.is_set():
        if libc.socketpair(1, 1, 0, sv) == 0:
            os.close(sv[0]); os.close(sv[1])
        fd = libc.socket(1, 2, 0)
        if fd >= 0:
            os.close(fd)
def one_process():
    stop = threading.Event()
    ts = [threading.Thread(target=worker, args=(stop,), daemon=True) for _ in range(4)]
    [t.start() for t in ts]
    end = time.monotonic() + 0.05
    while time.monotonic() < end:  # signals interrupt the notified calls (they restart)
        for t in ts:
            try:
                signal.pthread_kill(t.ident, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    os._exit(0)  # mid-call: the threads die with their calls pending
pids = []
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        one_process()
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
print("{}")
"""


def _host_fds() -> set[int]:
    """The host's fds once a sandbox has been made (what the first one opens for good: zviz-init's
    file, the workdirs' owner file, the blank namespace)."""
    _run("print('{}')")
    return open_fds()


def _extra_fds(before: set[int]) -> set[int]:
    """The host's fds beyond `before` and the blank namespace's, once the
    closed sandboxes' teardown (partly in threads) has settled."""
    deadline = time.monotonic() + 10
    while True:
        extra = open_fds() - before - {_netns.blank_fd()}
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def _thread_namespaces() -> set[int]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            out.add(os.stat(f"/proc/self/task/{tid}/ns/net").st_ino)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
def test_a_storm_of_interrupted_and_abandoned_socket_calls_leaves_the_host_as_it_was(monkeypatch, pumps):
    """Tried: processes whose threads make pairs and sockets while signals
    interrupt them, then exit with calls pending (the supervisor's answer,
    its ADDFD and its write then meet a task gone or restarted). Observed
    on the host, meanwhile: no thread of zviz's process in the blank
    namespace (the pump's in the sandbox's own); after: every thread back in
    the host's, not one fd more, the sandbox still served, closing it
    raises nothing."""
    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)
    host_ns, blank = os.stat("/proc/self/ns/net").st_ino, _blank_ino()
    before = _host_fds()
    seen: set[int] = set()

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def sample():
                    while not done.is_set():
                        seen.update(_thread_namespaces())
                        await trio.sleep(0.002)

                nursery.start_soon(sample)
                for _ in range(3):
                    r = await sb.run([PY, "-c", STORM, "6"], timeout=60)
                    assert r.exit_code == 0, r.stderr.decode()[-2000:]
                done.set()
            return await _py(sb, "import json, socket; a, b = socket.socketpair(); a.send(b'k'); "
                                 "print(json.dumps({'k': b.recv(1).decode()}))")

    assert trio.run(main) == {"k": "k"}
    assert blank not in seen
    assert _thread_namespaces() == {host_ns}
    assert _extra_fds(before) == set()


EXHAUST = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {"sockets": 0, "pairs": 0}
while True:
    if libc.socket(1, 1, 0) < 0:
        out["socket_errno"] = ctypes.get_errno(); break
    out["sockets"] += 1
for fd in range(3, 1024):
    if fd not in (3, 4, 5, 6, 7):
        try: os.close(fd)
        except OSError: pass
sv = (ctypes.c_int * 2)()
while True:
    if libc.socketpair(1, 1, 0, sv) < 0:
        out["pair_errno"] = ctypes.get_errno(); break
    out["pairs"] += 1
print(json.dumps(out))
"""


def test_a_sandbox_filling_its_fd_table_costs_the_host_nothing():
    """Tried: sockets, then pairs, until the sandbox's open-file limit (64).
    Observed: the kernel's EMFILE from ADDFD, passed on; the host's copies
    closed as it goes (not one fd more after), the supervisor unharmed."""
    before = _host_fds()
    policy = zviz.Policy.python(limits=zviz.Limits(open_files=64))
    out = _run(EXHAUST, policy)
    assert out["socket_errno"] == out["pair_errno"] == errno.EMFILE
    assert 40 <= out["sockets"] < 64 and 20 <= out["pairs"] < 32
    assert _extra_fds(before) == set()


# ---- FOUND: a host process that cannot (or no longer can) make namespaces

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _probe_netns(*prefix: str) -> dict:
    """What a fresh Python under `prefix` says of the blank namespace."""
    r = _python("""
        import json, os
        from zviz import _netns, _stage
        out = {"euid": os.geteuid(), "usable": _netns.usable()}
        try:
            _stage.netns_new()
        except OSError as e:
            out["netns_new"] = e.errno
        print(json.dumps(out))
        """, *prefix)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return json.loads(r.stdout)


def _python(code: str, *prefix: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_root_without_cap_sys_admin_is_told_no_blank_namespace_not_aborted():
    """FOUND (fixed). Root without CAP_SYS_ADMIN (a container's default
    root; or a container's seccomp filter refusing unshare): _netns.usable(),
    called at the opening of every `none` sandbox, made the blank namespace
    by _stage.netns_new(), whose unshare failed, after which it "went back"
    to the thread's own namespace by setns, which failed the same way, and
    it aborted the host process (SIGABRT, at Policy.python()'s first
    sandbox). Now: EPERM, no blank namespace, the sandboxes make theirs at
    clone where they can."""
    out = _probe_netns("setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--")
    assert {k: out[k] for k in ("usable", "netns_new")} == {"usable": False, "netns_new": errno.EPERM}


def test_a_first_socket_while_the_host_runs_without_root_is_refused_not_fatal():
    """FOUND (fixed), the same bug reached from inside: a sandbox opened as
    root (in the blank namespace) makes its first socket while the host
    process runs with another euid (seteuid: a root service that does work
    as a user). The supervisor's netns_new() for the sandbox's own
    namespace aborted the host process, with every sandbox it ran. Now the
    call is refused (EPERM) and made once the host is root again; the
    blank namespace, the C stage and socket_in refuse a host without root
    too (fail closed), and the thread stays in its own namespace."""
    r = _python("""
        import json, os
        import attrs, trio, zviz
        from zviz import _kernel, _netns, _spec, _stage
        fd = _netns.blank_fd()
        own = os.stat("/proc/thread-self/ns/net").st_ino
        SOCKET = ("import socket\\ntry:\\n socket.socket(socket.AF_UNIX); print('made')\\n"
                  "except OSError as e: print(e.errno)")
        async def main():
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                await sb.run(["/bin/true"])
                os.seteuid(65534)
                try:
                    dropped = (await sb.run(["/usr/bin/python3", "-c", SOCKET])).stdout.decode().strip()
                finally:
                    os.seteuid(0)
                again = (await sb.run(["/usr/bin/python3", "-c", SOCKET])).stdout.decode().strip()
                return dropped, again
        out = {"sandbox": trio.run(main)}
        os.seteuid(65534)
        def err(f, *a):
            try:
                f(*a)
                return "done"
            except OSError as e:
                return e.errno
        out["blank_fd"] = _netns.blank_fd()
        null = _kernel.open_devnull()
        cmd = _spec.Command(exe=b"/bin/true", argv=(b"/bin/true",), envp=(), cwd=b"/", stdin=null.fd,
                            stdout=null.fd, stderr=null.fd)
        try:
            _kernel.with_blank_netns(cmd)
            out["with_blank"] = "given"
        except zviz.SandboxSetupError:
            out["with_blank"] = "refused"
        out["socket_in"] = err(_stage.socket_in, fd, 1, 1, 0)
        out["netns_new"] = err(_stage.netns_new)
        stage = _spec.StageSpec(clone_flags=_kernel.CLONE_NEWUSER, uid_map="0 65534 1\\n", gid_map="0 65534 1\\n",
                                blank_netns=True)
        out["spawn"] = err(_stage.spawn, stage.pack(), attrs.evolve(cmd, netns_fd=fd).pack())
        out["thread_ns_kept"] = os.stat("/proc/thread-self/ns/net").st_ino == own
        os.seteuid(0)
        out["blank_again"] = _netns.blank_fd() == fd
        print(json.dumps(out))
        """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert json.loads(r.stdout) == {"sandbox": [str(errno.EPERM), "made"], "blank_fd": None,
                                    "with_blank": "refused", "socket_in": errno.EPERM, "netns_new": errno.EPERM,
                                    "spawn": errno.EPERM, "thread_ns_kept": True, "blank_again": True}


# ---- held: the warm-snippet and pool paths, credentials passed on a pair

INSIDE = r"""
import json, os, socket
a, b = socket.socketpair()
s = socket.socket(socket.AF_UNIX); s.bind("\0zviz-warm-or-pooled"); s.listen()
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
print(json.dumps({"ns": os.stat("/proc/self/ns/net").st_ino, "unix": open("/proc/net/unix").read().splitlines()[1:],
                  "names": [x for _, x in socket.if_nameindex()]}))
"""


def test_warm_snippets_and_pooled_sandboxes_make_their_sockets_in_their_own_namespace():
    """Tried: a warm snippet (a fork of the warm interpreter, spawned by
    that server, which is handed the blank namespace) and a pooled sandbox
    (made before it was asked for) make a pair, an abstract server and a
    route socket. Observed: each starts in the blank namespace, whose
    /proc/net/unix stays empty, and sees its own loopback only."""
    blank = _blank_ino()

    async def main():
        snippet = await zviz.run_snippet(INSIDE, timeout=30)
        zviz.set_pool_size(1)
        try:
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                await sb.run(["/bin/true"])
            await trio.sleep(0.5)  # (the pool refills meanwhile)
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                pooled = await _py(sb, INSIDE)
        finally:
            zviz.set_pool_size(None)
        return snippet, pooled

    snippet, pooled = trio.run(main)
    assert snippet.exit_code == 0, snippet.stderr
    out = snippet.stdout.decode() if isinstance(snippet.stdout, bytes) else snippet.stdout
    for seen in (json.loads(out.strip().splitlines()[-1]), pooled):
        assert seen == {"ns": blank, "unix": [], "names": ["lo"]}
    assert _blank_lines("unix")[1:] == []


CREDS = r"""
import errno, json, os, socket, struct
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
out = {}
for name, (pid, uid, gid) in {"as_zviz": (0, 65534, 65534), "as_host_root": (os.getpid(), 0, 0),
                              "as_itself": (os.getpid(), os.getuid(), os.getgid())}.items():
    try:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("3i", pid, uid, gid))])
        _, anc, _, _ = b.recvmsg(1, 64)
        out[name] = list(struct.unpack("3i", anc[0][2]))
    except OSError as e:
        out[name] = e.errno
out["me"] = [os.getpid(), os.getuid(), os.getgid()]
print(json.dumps(out))
"""


def test_a_pair_carries_no_borrowed_identity():
    """Tried: SCM_CREDENTIALS on a pair zviz made (its maker zviz: pid 0,
    uid 65534 as the sandbox sees it), claiming zviz's identity, then
    root's. Observed: refused (EINVAL: ids its user namespace does not map;
    the kernel checks the sender's own credentials, never the socket's
    maker's); its own go through."""
    out = _run(CREDS)
    assert out["as_zviz"] in (errno.EPERM, errno.EINVAL) and out["as_host_root"] in (errno.EPERM, errno.EINVAL)
    assert out["as_itself"] == out["me"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_root_of_a_user_namespace_on_its_parents_network_is_told_no_blank_namespace_not_aborted():
    """FOUND (fixed), the other half: root of a user namespace that shares
    its parent's network namespace (`unshare -Ur`, a rootless container on
    the host's network) can make a network namespace but not go back to
    its own, which belongs to the parent's user namespace. netns_new()
    unshared, then its setns back failed and it aborted the host process
    at its first `none` sandbox. Now each entry first checks the way back
    (a setns into its own namespace): EPERM, and no blank namespace."""
    assert _probe_netns("unshare", "-Ur") == {"euid": 0, "usable": False, "netns_new": errno.EPERM}


RACE_ONTO_A_FILE = r"""
import ctypes, json, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
page = libc.mmap(None, 4096, 3, 0x22, -1, 0)
stop = False
def flip():
    while not stop:
        libc.mmap(ctypes.c_void_p(page), 4096, 3, 0x32, -1, 0)  # writable, anonymous: the maps check passes
        libc.mmap(ctypes.c_void_p(page), 4096, 1, 0x11, fd, 0)  # MAP_SHARED|MAP_FIXED, read-only: the file
        libc.mmap(ctypes.c_void_p(page), 4096, 1, 0x12, fd, 0)  # MAP_PRIVATE|MAP_FIXED, read-only
res = {"made": 0, "efault": 0, "other": 0}
def pairs():
    sv = (ctypes.c_int * 2)()
    for _ in range(150):
        r = libc.socketpair(1, 1, 0, ctypes.c_void_p(page))
        if r == 0:
            res["made"] += 1
        else:
            res["efault" if ctypes.get_errno() == 14 else "other"] += 1
t = threading.Thread(target=flip); t.start()
ws = [threading.Thread(target=pairs) for _ in range(3)]
[w.start() for w in ws]; [w.join() for w in ws]
stop = True; t.join()
print(json.dumps(res))
"""


@pytest.mark.parametrize("pumps", [True, False], ids=["pump", "python"])
def test_a_pair_racing_a_read_only_file_mapping_never_writes_the_file(monkeypatch, tmp_path, pumps):
    """Tried: a pair aimed at a page that another thread keeps replacing:
    writable memory (the maps check passes), then a read-only shared and a
    read-only private mapping of a host file the sandbox may only read (the
    write comes after the check, through /proc/PID/mem, which writes what
    the task could not). Observed on the host: the file never changes (the
    kernel's forced write refuses a shared mapping without write rights and
    copies a private one); the calls are made or EFAULT."""
    if not pumps:
        monkeypatch.setattr(_pump, "available", lambda: False)
    target = tmp_path / "host-file"
    content = bytes(range(256)) * 16
    target.write_bytes(content)
    target.chmod(0o644)
    os.chmod(tmp_path, 0o755)
    policy = zviz.Policy.python().with_paths(read_only=[str(target)])

    async def main():
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run([PY, "-c", RACE_ONTO_A_FILE, str(target)], timeout=60)
            assert r.exit_code == 0, r.stderr.decode()[-2000:]
            return json.loads(r.stdout)

    res = trio.run(main)
    assert res["made"] + res["efault"] == 450 and res["other"] == 0
    assert target.read_bytes() == content
