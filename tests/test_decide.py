"""The notification decision table. Pure: records are made up here."""

import ast
import errno
import pathlib
import socket
import struct

from hypothesis import given, settings, strategies as st

import zviz
from zviz import _decide, _kernel
from zviz._syscall_table import X86_64

X86 = _decide.AUDIT_ARCH_X86_64


def test_no_continue_answer_exists():
    # The unsafe answer is inexpressible: the decision table has no such type.
    names = {n.lower() for n in dir(_decide)}
    assert not any("continue" in n for n in names)


def continue_paths(path, source):
    """Every way `source` (a module of zviz) could answer a notification with
    SECCOMP_USER_NOTIF_FLAG_CONTINUE, except the one the learning mode owns:
    `_kernel.notif_continue_learning`, called only from the supervisor's
    learner branch. Returns the offending lines."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def enclosing(node, kind):
        while node in parents:
            node = parents[node]
            if isinstance(node, kind):
                yield node

    def func_name(node):
        return next((f.name for f in enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef))), None)

    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if "CONTINUE" in ident.upper() and ident != "notif_continue_learning":
                bad.append((path, node.lineno, ident))
            in_respond = path.name == "_kernel.py" and func_name(node) in (None, "_respond")
            if ident == "IOCTL_NOTIF_SEND" and not in_respond:
                bad.append((path, node.lineno, "a SEND outside _kernel._respond"))
        if isinstance(node, ast.Call):
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if callee == "_respond":
                flags = node.args[4] if len(node.args) > 4 else None
                if not (isinstance(flags, ast.Constant) and flags.value == 0) and not (
                        path.name == "_kernel.py" and func_name(node) == "notif_continue_learning"):
                    bad.append((path, node.lineno, "_respond with flags"))
            if callee == "notif_continue_learning":
                guarded = any("_learner" in ast.unparse(i.test) for i in enclosing(node, ast.If))
                if not (path.name == "_supervisor.py" and guarded):
                    bad.append((path, node.lineno, "CONTINUE outside the learner branch"))
    return bad


def test_continue_only_in_the_learning_mode_anywhere_in_zviz():
    root = pathlib.Path(zviz.__file__).parent
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 15
    bad = [b for m in modules for b in continue_paths(m, m.read_text())]
    assert not bad
    for c in sorted(root.rglob("*.c")) + sorted(root.rglob("*.h")):
        assert "FLAG_CONTINUE" not in c.read_text(), c


def test_continue_scan_catches_what_it_is_for():
    k, s = pathlib.Path("_kernel.py"), pathlib.Path("_supervisor.py")
    assert continue_paths(pathlib.Path("_x.py"), "def f(l, n):\n    _kernel.notif_continue_learning(l, n)\n")
    assert continue_paths(s, "def f(l, n):\n    _kernel.notif_continue_learning(l, n)\n")  # unguarded
    assert not continue_paths(s, "def f(self, l, n):\n    if self._learner(n):\n"
                                 "        _kernel.notif_continue_learning(l, n)\n")
    assert continue_paths(k, "def notif_send(l, n):\n    return _respond(l, n, 0, 0, 1)\n")
    assert not continue_paths(k, "def notif_send(l, n):\n    return _respond(l, n, 0, 0, 0)\n")
    assert continue_paths(pathlib.Path("_x.py"), "FLAG = SECCOMP_USER_NOTIF_FLAG_CONTINUE\n")
    assert continue_paths(pathlib.Path("_x.py"), "fcntl.ioctl(fd, _kernel.IOCTL_NOTIF_SEND, buf)\n")


def test_dangerous_denied_eperm_others_enosys():
    assert _decide.decide(X86_64["ptrace"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["mount"], X86, [0] * 6, net_allow=True) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["io_uring_setup"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["acct"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["mq_open"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.ENOSYS)
    assert _decide.decide(X86_64["socket"], X86, [17, 3, 0, 0, 0, 0], net_allow=False) == _decide.Deny(errno.EACCES)
    # a routing option under net.mode = "allow" (the filter notifies it): a network refusal
    assert _decide.decide(X86_64["setsockopt"], X86, [3, 41, 57, 0, 0, 0], net_allow=True) == _decide.Deny(errno.EACCES)


def test_other_arch_denied():
    assert _decide.decide(X86_64["read"], 0x40000003, [0] * 6, net_allow=True) == _decide.Deny(errno.EPERM)


def test_connect_reads_then_performs_only_listed():
    ask = _decide.decide(X86_64["connect"], X86, [5, 0x1000, 16, 0, 0, 0], net_allow=True)
    assert ask == _decide.ReadSockaddr(addr=0x1000, size=16)
    sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("127.0.0.1") + b"\0" * 8
    allowed = frozenset({("127.0.0.1", 8080)})
    assert _decide.decide_connect(5, sa, allowed) == _decide.PerformConnect(5, socket.AF_INET, "127.0.0.1", 8080)
    other = sa[:2] + struct.pack("!H", 8081) + sa[4:]
    assert _decide.decide_connect(5, other, allowed) == _decide.Deny(errno.EACCES)
    unix = struct.pack("=H", socket.AF_UNIX) + b"/run/docker.sock\0"
    assert _decide.decide_connect(5, unix, allowed) == _decide.Deny(errno.EACCES)
    v6mapped = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 8080) + b"\0" * 4
                + socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1") + b"\0" * 4)
    assert isinstance(_decide.decide_connect(5, v6mapped, allowed), _decide.PerformConnect)
    assert _decide.decide(X86_64["connect"], X86, [5, 0x1000, 4096, 0, 0, 0], net_allow=True) == _decide.Deny(
        errno.EINVAL)


def test_decode_names_and_arguments():
    d = _decide.decode(X86_64["unshare"], [0x10000000 | 0x20000000, 0, 0, 0, 0, 0])
    assert d.name == "unshare" and "CLONE_NEWUSER" in d.detail and "CLONE_NEWPID" in d.detail
    d = _decide.decode(X86_64["ptrace"], [16, 1234, 0, 0, 0, 0])
    assert d.detail == "request=ATTACH, pid=1234"
    d = _decide.decode(X86_64["mount"], [1, 2, 3, 0, 0, 0], {0: "none", 1: "/mnt", 2: "tmpfs"})
    assert "/mnt" in d.detail
    d = _decide.decode(999, [0] * 6)
    assert d.name == "syscall_unknown" and d.nr == 999 and "nr=999" in d.detail
    d = _decide.decode(X86_64["fchmodat"], [-100 & (2**64 - 1), 0x1000, 0o6755, 0, 0, 0])
    assert d.detail == "mode=0o6755"
    assert _decide.decode(X86_64["recvmsg"], [3, 0, 0x41, 0, 0, 0]).detail == "fd=3, flags=MSG_OOB|MSG_DONTWAIT"
    assert _decide.decode(X86_64["ioctl"], [3, 0xFFFFFFFFC0606610, 0, 0, 0, 0]).detail == "fd=3, request=PAGEMAP_SCAN"
    assert _decide.decode(X86_64["socketpair"], [2, 1, 0, 0, 0, 0]).detail.startswith("family=AF_INET,")


def test_unknown_numbers_share_one_bucket():
    names = {_decide.syscall_name(nr) for nr in range(0, 0x40000000, 9973)}
    assert names <= set(X86_64) | {"syscall_unknown"}
    counter: dict[str, int] = {}
    for nr in range(100_000):
        key = _decide.counter_key(counter, _decide.syscall_name(nr))
        counter[key] = counter.get(key, 0) + 1
    assert len(counter) <= len(X86_64) + 1
    full = {f"k{i}": 1 for i in range(_decide.COUNTER_KEYS_MAX)}
    assert _decide.counter_key(full, "ptrace") == "syscall_unknown" and _decide.counter_key(full, "k1") == "k1"
    assert len(_decide.decode(X86_64["mount"], [0] * 6, {0: "x" * 5000, 1: "y" * 5000}).detail) <= _decide.DETAIL_MAX


def test_argument_refusals_answer_their_errno():
    def ans(name, *args):
        return _decide.decide(X86_64[name], X86, list(args) + [0] * (6 - len(args)), net_allow=False)
    assert ans("chmod", 0x1000, 0o4755) == _decide.Deny(errno.EPERM)
    assert ans("openat", 0, 0x1000, 0o101, 0o2755) == _decide.Deny(errno.EPERM)
    assert ans("openat", 0, 0x1000, 0, 0o2755) == _decide.Deny(errno.ENOSYS)  # no O_CREAT: not the mode
    assert ans("recvfrom", 3, 0, 0, 1) == _decide.Deny(errno.EOPNOTSUPP)
    assert ans("sendmsg", 3, 0, 1 | (1 << 40)) == _decide.Deny(errno.EOPNOTSUPP)
    assert ans("fcntl", 3, 1026) == _decide.Deny(errno.EINVAL)
    assert ans("fcntl", 3, (7 << 32) | 1024) == _decide.Deny(errno.EINVAL)  # the kernel reads F_SETLEASE
    assert ans("ioctl", 3, 0xC0686611) == _decide.Deny(errno.ENOTTY)
    assert ans("pipe2", 0x1000, 0o200) == _decide.Deny(errno.ENOPKG)
    assert ans("socketpair", 2, 1) == _decide.Deny(errno.EACCES)
    assert ans("mknod", 0x1000, 0o140644) == _decide.Deny(errno.EPERM)


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=80, max_size=80))
def test_fuzz_notification_decoder(raw):
    n = _kernel.notif_decode(raw)
    d = _decide.decode(n.nr, n.args)
    assert isinstance(d.name, str) and isinstance(d.detail, str)
    ans = _decide.decide(n.nr, n.arch, n.args, net_allow=True)
    assert isinstance(ans, (_decide.Deny, _decide.ReadSockaddr))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=140))
def test_fuzz_sockaddr(raw):
    ans = _decide.decide_connect(3, raw, frozenset({("127.0.0.1", 80)}))
    assert isinstance(ans, (_decide.Deny, _decide.PerformConnect))


def test_calls_on_other_tasks_are_not_permitted():
    def ans(name, *args):
        return _decide.decide(X86_64[name], X86, list(args) + [0] * (6 - len(args)), net_allow=False)
    assert ans("prlimit64", 1, 7) == _decide.Deny(errno.EPERM)
    assert ans("prlimit64", 0, 7) == _decide.Deny(errno.ENOSYS)  # its own: only refused if not allowed at all
    assert ans("sched_setscheduler", 1, 5) == _decide.Deny(errno.EPERM)
    assert ans("sched_setscheduler", 0, 1) == _decide.Deny(errno.EPERM)  # SCHED_FIFO
    assert ans("setpriority", 1, 0, 19) == _decide.Deny(errno.EPERM)  # PRIO_PGRP
    assert ans("setpriority", 0, 1, 19) == _decide.Deny(errno.EPERM)
    assert ans("ioprio_set", 1, 0, 0) == _decide.Deny(errno.ENOSYS)
