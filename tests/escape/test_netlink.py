"""rtnetlink from inside: a NETLINK_ROUTE socket is allowed only in a sandbox
with a network namespace of its own, where it can read that namespace's
`lo` and change nothing (every RTM_NEW*/RTM_DEL* needs CAP_NET_ADMIN over the
namespace's owning user namespace, which the sandbox's uid does not have).
Other netlink protocols, netlink socketpairs, and every netlink socket of a
sandbox without its own namespace (it would read the host's interfaces) are
refused by the filter and reported.

Host-side evidence: the sandbox's namespace, entered from the host with
`nsenter` while the sandbox lives, still has only `lo`, UP, with 127.0.0.1/8,
no added address, route or link; the host's own interfaces were not listed
inside."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess

import pytest
import trio

import zviz
from zviz import _netns

from ..conftest import IS_ROOT

SCRIPT = r'''
import ctypes, ctypes.util, errno, os, socket, struct

def show(label, fn):
    try:
        print(f"{label}: OK {fn()}")
    except OSError as e:
        print(f"{label}: FAILED {errno.errorcode.get(e.errno, e.errno)}")

class ifaddrs(ctypes.Structure):
    pass
ifaddrs._fields_ = [("next", ctypes.POINTER(ifaddrs)), ("name", ctypes.c_char_p), ("flags", ctypes.c_uint),
                    ("addr", ctypes.c_void_p), ("netmask", ctypes.c_void_p), ("broad", ctypes.c_void_p),
                    ("data", ctypes.c_void_p)]

def getifaddrs():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    head = ctypes.POINTER(ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs")
    names, p = set(), head
    while p:
        names.add(p.contents.name.decode())
        p = p.contents.next
    libc.freeifaddrs(head)
    return ",".join(sorted(names))

print("CapEff:", [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0])
show("if_nameindex", lambda: ",".join(n for _, n in socket.if_nameindex()))
show("getifaddrs", getifaddrs)

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 1, 4, 0x200, 0x400
RTM_NEWLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE = 16, 20, 21, 24

def attr(kind, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)

def request(kind, body, flags=0):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        msg = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0) + body
        s.sendto(msg, (0, 0))
        data = s.recv(65536)
        typ = struct.unpack_from("=H", data, 4)[0]
        assert typ == 2, typ  # NLMSG_ERROR: the ack
        err = struct.unpack_from("=i", data, 16)[0]
        return "ack ok" if err == 0 else "refused " + errno.errorcode.get(-err, str(-err))
    finally:
        s.close()

IFF_UP = 1
lo = 1  # the first interface of a fresh namespace
ten = socket.inet_aton("10.9.9.9")
show("set lo down", lambda: request(RTM_NEWLINK, struct.pack("=BxHiII", 0, 0, lo, 0, IFF_UP)))
show("set lo up", lambda: request(RTM_NEWLINK, struct.pack("=BxHiII", 0, 0, lo, IFF_UP, IFF_UP)))
show("add address", lambda: request(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, lo)
                                     + attr(2, ten) + attr(1, ten), NLM_F_CREATE | NLM_F_EXCL))
show("delete 127.0.0.1", lambda: request(RTM_DELADDR, struct.pack("=BBBBI", socket.AF_INET, 8, 0, 254, lo)
                                          + attr(2, socket.inet_aton("127.0.0.1"))))
show("add route", lambda: request(RTM_NEWROUTE, struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 3, 253,
                                                             1, 0) + attr(1, ten) + attr(4, struct.pack("=i", lo)),
                                  NLM_F_CREATE | NLM_F_EXCL))
show("add dummy link", lambda: request(RTM_NEWLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0)
                                        + attr(3, b"zvizdummy0\0") + attr(18, attr(1, b"dummy\0")),
                                       NLM_F_CREATE | NLM_F_EXCL))
show("add veth pair", lambda: request(RTM_NEWLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0)
                                       + attr(3, b"zvizveth0\0") + attr(18, attr(1, b"veth\0")),
                                      NLM_F_CREATE | NLM_F_EXCL))
for proto, name in ((4, "sock_diag"), (9, "audit"), (15, "uevent"), (16, "generic"), (6, "xfrm")):
    show(f"netlink {name}", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto).close())
show("netlink route stream", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_STREAM, 0).close())
show("netlink route dgram", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0).close())
show("netlink socketpair", lambda: socket.socketpair(socket.AF_NETLINK, socket.SOCK_RAW, 0))
'''


NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1)


def _lines(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _host_view(pid: int) -> dict[str, str]:
    """The sandbox's network namespace, as the host's `ip` sees it from inside it."""
    out = {}
    for key, cmd in (("link", ["ip", "-o", "link"]), ("addr", ["ip", "-o", "addr"]), ("route", ["ip", "route"]),
                     ("route6", ["ip", "-6", "route"])):
        r = subprocess.run(["nsenter", "-t", str(pid), "-n", *cmd], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        out[key] = r.stdout
    return out


async def _scenario(policy: zviz.Policy) -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str] | None]:
    async with zviz.open_sandbox(policy) as sb:
        r = await sb.run(["python3", "-c", SCRIPT], timeout=60)
        assert r.ok, r.stderr.decode()
        events = [(e.syscall, e.detail) for e in sb.events_so_far()]
        host = _host_view(sb._zygote.pid) if IS_ROOT and sb._zygote is not None and shutil.which("nsenter") else None
        if host is not None:  # who owns the sandbox's network namespace: its own user namespace
            z = sb._zygote.pid
            net = os.open(f"/proc/{z}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                owner = fcntl.ioctl(net, NS_GET_USERNS)
            finally:
                os.close(net)
            try:
                host["owner_is_sandbox_userns"] = str(os.fstat(owner).st_ino == os.stat(f"/proc/{z}/ns/user").st_ino)
                host["owner_is_hosts"] = str(os.fstat(owner).st_ino == os.stat("/proc/self/ns/user").st_ino)
            finally:
                os.close(owner)
            blank = _netns.blank_fd()
            host["blank"] = str(blank is not None and os.fstat(blank).st_ino == os.stat(f"/proc/{z}/ns/net").st_ino)
        return _lines(r.stdout.decode()), events, host


@pytest.mark.parametrize("mode", ["none", "loopback", "allow"])
def test_route_netlink_reads_only_the_sandboxs_loopback_and_changes_nothing(mode):
    net = zviz.Network(mode=mode, allow=["127.0.0.1:9"] if mode == "allow" else ())
    got, events, host = trio.run(_scenario, zviz.Policy.python(net=net))
    assert got["if_nameindex"] == "OK lo" and got["getifaddrs"] == "OK lo", got
    assert got["CapEff"] == "0000000000000000", got
    host_names = {n for _, n in socket.if_nameindex()}
    assert host_names - {"lo"}, "this host has only lo: the test cannot tell whose interfaces it listed"
    for label in ("set lo down", "set lo up", "add address", "delete 127.0.0.1", "add route", "add dummy link",
                  "add veth pair"):
        assert got[label] == "OK refused EPERM", (label, got)  # the kernel's answer: no CAP_NET_ADMIN
    for label in ("netlink sock_diag", "netlink audit", "netlink uevent", "netlink generic", "netlink xfrm",
                  "netlink route stream", "netlink socketpair"):
        assert got[label] == "FAILED EACCES", (label, got)  # the filter's
    assert got["netlink route dgram"].startswith("OK")
    sockets = [d for n, d in events if n in ("socket", "socketpair")]
    assert sum("AF_NETLINK" in d for d in sockets) == 7, sockets
    if not IS_ROOT:
        pytest.skip("the host-side view of the sandbox's namespace needs root (nsenter)")
    assert host is not None
    assert [line.split(":")[1].strip() for line in host["link"].splitlines()] == ["lo"], host
    lo_up = "UP" in host["link"].split("<", 1)[1].split(">", 1)[0].split(",")
    assert lo_up == (mode == "loopback"), host  # as zviz left it: up (127.0.0.1/8) only for the private loopback
    assert ("127.0.0.1/8" in host["addr"]) == (mode == "loopback") and "10.9.9.9" not in host["addr"], host
    assert "10.9.9.9" not in host["route"] and "zviz" not in host["link"], host
    if mode == "none" and _netns.usable():  # the zygote is in the blank namespace, the host's (zviz/_netns.py)
        assert host["blank"] == "True" and host["owner_is_hosts"] == "True", host
    else:
        assert host["owner_is_sandbox_userns"] == "True" and host["blank"] == "False", host


def test_no_netlink_without_a_network_namespace_of_its_own():
    policy = zviz.Policy.python(namespaces=zviz.Namespaces(net=False))
    got, events, _ = trio.run(_scenario, policy)
    assert got["if_nameindex"] == "FAILED EACCES" and got["getifaddrs"] == "FAILED EACCES", got
    assert any(n == "socket" and "AF_NETLINK" in d for n, d in events), events
