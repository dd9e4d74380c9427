"""The notification decision table. Pure: records are made up here."""

import errno
import socket
import struct

from hypothesis import given, settings, strategies as st

from zviz import _decide, _kernel
from zviz._syscall_table import X86_64

X86 = _decide.AUDIT_ARCH_X86_64


def test_no_continue_answer_exists():
    # The unsafe answer is inexpressible: the module has no such type.
    names = {n.lower() for n in dir(_decide)}
    assert not any("continue" in n for n in names)


def test_dangerous_denied_eperm_others_enosys():
    assert _decide.decide(X86_64["ptrace"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["mount"], X86, [0] * 6, net_allow=True) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["io_uring_setup"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["acct"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.EPERM)
    assert _decide.decide(X86_64["mq_open"], X86, [0] * 6, net_allow=False) == _decide.Deny(errno.ENOSYS)
    assert _decide.decide(X86_64["socket"], X86, [17, 3, 0, 0, 0, 0], net_allow=False) == _decide.Deny(errno.EACCES)


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
    assert _decide.decode(999, [0] * 6).name == "syscall_999"


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
