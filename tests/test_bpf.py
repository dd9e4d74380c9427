"""The seccomp program: compiled once, native ABI only, argument checks on registers."""

import struct

import attrs
import pytest

from zviz import _argrules, _bpf, _linux, _syscalls
from zviz._syscall_table import X86_64

from . import bpfsim

BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
RET_KILL_PROCESS = 0x80000000
AUDIT_ARCH_X86_64 = 0xC000003E


def prog(**kw):
    spec = _bpf.FilterSpec(allow=kw.get("allow", _syscalls.GROUPS["@python"]), net_mode=kw.get("net", "none"),
                           notify=kw.get("notify", True))
    return _bpf.disassemble(_bpf.compile_filter(spec))


def test_checks_arch_first_and_kills_others():
    ins = prog()
    assert ins[0] == (BPF_LD_W_ABS, 0, 0, 4)  # load seccomp_data.arch
    code, _jt, jf, k = ins[1]
    assert code == BPF_JEQ_K and k == AUDIT_ARCH_X86_64
    # the mismatch branch lands on KILL_PROCESS (i386 via int 0x80 never runs)
    target = ins[2 + jf]
    assert target == (BPF_RET_K, 0, 0, RET_KILL_PROCESS)


def test_x32_numbers_are_killed():
    ins = prog()
    # after loading nr: if nr >= 0x40000000 (the x32 bit) -> bad arch -> kill
    idx = next(i for i, x in enumerate(ins) if x[0] == BPF_JGE_K and x[3] == 0x40000000)
    assert ins[idx - 1] == (BPF_LD_W_ABS, 0, 0, 0)


def test_compiled_once_per_spec():
    spec = _bpf.FilterSpec(allow=frozenset({"read", "write", "exit_group"}), net_mode="none", notify=True)
    a = _bpf.compile_filter(spec)
    b = _bpf.compile_filter(_bpf.FilterSpec(allow=frozenset({"exit_group", "write", "read"}), net_mode="none",
                                            notify=True))
    assert a is b  # cached: no per-spawn compilation


def test_variants_differ_where_they_must():
    base = _bpf.compile_filter(_bpf.FilterSpec(allow=_syscalls.GROUPS["@python"], net_mode="none", notify=True))
    allow = _bpf.compile_filter(_bpf.FilterSpec(allow=_syscalls.GROUPS["@python"], net_mode="allow", notify=True))
    quiet = _bpf.compile_filter(_bpf.FilterSpec(allow=_syscalls.GROUPS["@python"], net_mode="none", notify=False))
    assert len({base, allow, quiet}) == 3
    consts = {k for *_, k in _bpf.disassemble(allow)}
    assert _bpf.MSG_FASTOPEN | _argrules.MSG_OOB in consts  # sendto/sendmsg flags checked
    assert _bpf.CLONE_NS_FLAGS in consts  # clone flags checked


def test_groups_known_and_disjoint_from_dangerous():
    # (the table's only check: a typo in it is caught here)
    for name, members in _syscalls.GROUPS.items():
        assert members <= X86_64.keys(), name
    assert X86_64.keys() >= _syscalls.DANGEROUS
    assert X86_64.keys() >= _syscalls.SILENT_ENOSYS
    assert not (_syscalls.DANGEROUS & _syscalls.GROUPS["@python"])


def test_disassemble_reads_struct_sock_filter():
    # struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }, native order
    raw = struct.pack("=HBBI", BPF_JEQ_K, 1, 2, 0xC000003E) + struct.pack("=HBBI", BPF_RET_K, 0, 0, 0x7FFF0000)
    assert _bpf.disassemble(raw) == [(BPF_JEQ_K, 1, 2, 0xC000003E), (BPF_RET_K, 0, 0, 0x7FFF0000)]
    ins = prog()
    assert ins[-1][0] == BPF_RET_K and all(len(i) == 4 for i in ins)


# ---- the argument rules, run on the compiled program (tests/bpfsim.py)

G = 0xDEADBEEF << 32  # garbage in the high half of a register


def _verdict(spec, name, *args):
    ret, _ = bpfsim.run(_bpf.compile_filter(spec), X86_64[name], args)
    return {bpfsim.ALLOW: "allow", bpfsim.NOTIFY: "refuse"}.get(ret, hex(ret))


PY = _bpf.FilterSpec(allow=_syscalls.GROUPS["@python"] | {"creat"}, net_mode="none", notify=True, zygote=True,
                     pid_ns=True)
AT = 2**64 - 100  # AT_FDCWD


@pytest.mark.parametrize(("call", "want"), [
    (("chmod", 0x1000, 0o755), "allow"), (("chmod", 0x1000, 0o4755), "refuse"), (("chmod", 0x1000, 0o2700), "refuse"),
    (("chmod", 0x1000, G | 0o755), "allow"),  # the kernel reads 16 bits of a umode_t
    (("chmod", 0x1000, G | 0o6755), "refuse"), (("chmod", 0x1000, 0o1777), "allow"),
    (("fchmod", 3, 0o4755), "refuse"), (("fchmodat", AT, 0x1000, 0o2755), "refuse"),
    (("fchmodat2", AT, 0x1000, 0o4755, 0x100), "refuse"), (("fchmodat2", AT, 0x1000, 0o755, 0x100), "allow"),
    (("open", 0x1000, 0o101, 0o644), "allow"), (("open", 0x1000, 0o101, 0o4755), "refuse"),
    (("open", 0x1000, 0, 0o4755), "allow"),  # the mode is not read without O_CREAT/O_TMPFILE
    (("open", 0x1000, G | 0o101, 0o4755), "refuse"),
    (("openat", AT, 0x1000, 0o2000101, 0o6755), "refuse"), (("openat", AT, 0x1000, 0o20200002, 0o4755), "refuse"),
    (("openat", AT, 0x1000, 0o2000000, 0), "allow"), (("creat", 0x1000, 0o4755), "refuse"),
    (("creat", 0x1000, 0o755), "allow"),
    (("mknod", 0x1000, 0o010644, 0), "allow"), (("mknod", 0x1000, 0o100644, 0), "allow"),
    (("mknod", 0x1000, 0o140644, 0), "refuse"), (("mknod", 0x1000, 0o104755, 0), "refuse"),
    (("mknod", 0x1000, 0o020644, 0x103), "refuse"), (("mknodat", AT, 0x1000, 0o012644, 0), "refuse"),
    (("sendto", 3, 0, 1, 0x40), "allow"), (("sendto", 3, 0, 1, 1), "refuse"), (("sendto", 3, 0, 1, G | 1), "refuse"),
    (("recvfrom", 3, 0, 1, 1 | 2), "refuse"), (("recvmsg", 3, 0, 0x40000000), "allow"),
    (("recvmsg", 3, 0, 1), "refuse"),
    (("sendmsg", 3, 0, 1), "refuse"), (("sendmmsg", 3, 0, 1, 1), "refuse"), (("recvmmsg", 3, 0, 1, 1, 0), "refuse"),
    (("pipe2", 0x1000, 0o2000000), "allow"), (("pipe2", 0x1000, 0o200), "refuse"),
    (("pipe2", 0x1000, G | 0o200), "refuse"),
    (("fcntl", 3, 1, 0), "allow"), (("fcntl", 3, 1030, 0), "allow"), (("fcntl", 3, 1025, 0), "allow"),
    (("fcntl", 3, 1024, 1), "refuse"), (("fcntl", 3, 1026, 1), "refuse"), (("fcntl", 3, (1 << 32) | 1024, 1), "refuse"),
    (("fcntl", 3, G | 1026, 1), "refuse"),
    (("ioctl", 1, 0x5401, 0), "allow"), (("ioctl", 1, 0xFFFFFFFF80045430, 0), "allow"),  # sign-extended TIOCGPTN
    (("ioctl", 1, 0xC0606610, 0), "refuse"), (("ioctl", 1, 0xC0686611, 0), "refuse"),
    (("ioctl", 1, 0xFFFFFFFFC0606610, 0), "refuse"), (("ioctl", 1, G | 0xC0686611, 0), "refuse"),
    (("ioctl", 1, 0xC0686612, 0), "allow"),
    (("socketpair", 1, 1, 0), "allow"), (("socketpair", 2, 1, 0), "refuse"), (("socketpair", 40, 1, 0), "refuse"),
    (("socketpair", 16, 3, 0), "refuse"), (("socketpair", (1 << 32) | 2, 1, 0), "refuse"),
    (("socketpair", G | 1, 1, 0), "refuse"),  # fail closed
    (("sched_setscheduler", 0, 0, 0x1000), "allow"), (("sched_setscheduler", 0, 1, 0x1000), "refuse"),
    (("sched_setscheduler", 1, 5, 0x1000), "refuse"), (("sched_setscheduler", 1, 0, 0x1000), "refuse"),
    (("sched_setscheduler", (1 << 32) | 1, 5, 0x1000), "refuse"), (("sched_setscheduler", G | 1, 0, 0), "refuse"),
    (("sched_setscheduler", 2, 0, 0x1000), "allow"), (("sched_setscheduler", 4321, 3, 0x1000), "allow"),
    (("sched_setscheduler", 4321, 5, 0x1000), "allow"), (("sched_setscheduler", 4321, 2, 0x1000), "refuse"),
    (("sched_setscheduler", 4321, (1 << 32) | 5, 0x1000), "refuse"),
    (("sched_setscheduler", 4321, 0x40000000, 0x1000), "refuse"),  # SCHED_RESET_ON_FORK: not needed
    (("sched_setscheduler", 2**22 + 1, 0, 0), "refuse"), (("sched_setscheduler", 2**64 - 1, 0, 0), "refuse"),
    (("read", 0, 0, 1), "allow"),
])
def test_argument_rules_on_the_compiled_program(call, want):
    assert _verdict(PY, *call) == want


def test_sched_of_other_tasks_needs_a_pid_namespace():
    no_ns = attrs.evolve(PY, pid_ns=False)
    assert _verdict(no_ns, "sched_setscheduler", 0, 0, 0x1000) == "allow"
    assert _verdict(no_ns, "sched_setscheduler", 4321, 0, 0x1000) == "refuse"  # a host pid


def test_fastopen_and_oob_both_refused_in_allow_mode():
    spec = attrs.evolve(PY, net_mode="allow")
    assert _verdict(spec, "sendto", 3, 0, 1, _bpf.MSG_FASTOPEN, 0x1000, 16) == "refuse"
    assert _verdict(spec, "sendto", 3, 0, 1, _argrules.MSG_OOB) == "refuse"
    assert _verdict(spec, "sendto", 3, 0, 1, 0x40) == "allow"
    anymode = attrs.evolve(PY, net_mode="any")
    assert _verdict(anymode, "socketpair", 2, 1, 0) == "allow"  # zviz trace: every family
    assert _verdict(attrs.evolve(PY, net_mode="loopback"), "socketpair", 2, 1, 0) == "refuse"


def test_hot_calls_stay_short():
    """The argument checks cost a few BPF instructions on the hot path."""
    prog = _bpf.compile_filter(PY)
    steps = {name: bpfsim.run(prog, X86_64[name], args)[1]
             for name, args in (("read", (0, 0, 1)), ("openat", (AT, 0x1000, 0o2000000, 0)), ("ioctl", (1, 0x5401)),
                                ("recvfrom", (3, 0, 1, 0x40)), ("newfstatat", (AT, 0x1000, 0x2000, 0)))}
    assert all(n <= steps["read"] + 16 for n in steps.values()), steps
    assert len(prog) // 8 < 1024  # far under BPF_MAXINSNS (4096)


def test_routing_socket_options_refused_in_allow_mode():
    """allow mode: the sandbox's connected sockets are the supervisor's (host
    namespace): IP_OPTIONS and the IPv6 routing/extension headers are
    refused, with or without garbage in the high halves; ordinary options pass."""
    spec = attrs.evolve(PY, net_mode="allow")
    for level, opt in ((41, 57), (41, 5), (41, 6), (41, 54), (41, 59), (0, 4)):
        for g in (0, G):
            assert _verdict(spec, "setsockopt", 3, level | g, opt | g, 0x1000, 40) == "refuse", (level, opt, g)
    for level, opt in ((1, 9), (6, 1), (41, 26), (41, 67), (0, 1), (0, 10), (6 | G, 1), (41, 200 | G)):
        assert _verdict(spec, "setsockopt", 3, level, opt, 0x1000, 4) == "allow", (level, opt)
    assert _verdict(spec, "setsockopt", 3, 17, 1, 0x1000, 4) == "refuse"  # another level: refused whole
    assert _verdict(PY, "setsockopt", 3, 41, 57, 0x1000, 40) == "allow"  # none mode: its own namespace's sockets


def test_landlock_restrict_self_only_on_the_command_ruleset_fd_and_only_with_a_zygote():
    """zviz-init enters each command's Landlock domain with
    landlock_restrict_self(COMMAND_RULESET_FD, 0); nothing else passes."""
    fd = _linux.COMMAND_RULESET_FD
    assert _verdict(PY, "landlock_restrict_self", fd, 0) == "allow"
    for args in ((fd, 1), (fd - 1, 0), (G | fd, 0), (-1 & (2**64 - 1), 0), (fd, G)):
        assert _verdict(PY, "landlock_restrict_self", *args) == "refuse", args
    assert _verdict(PY, "landlock_create_ruleset", 0, 0, 0) == "refuse"
    assert _verdict(attrs.evolve(PY, zygote=False), "landlock_restrict_self", fd, 0) == "refuse"
    no_notify = attrs.evolve(PY, notify=False)  # denied in the kernel, EPERM as DANGEROUS, (7, 0) still allowed
    assert _verdict(no_notify, "landlock_restrict_self", fd, 0) == "allow"
    assert _verdict(no_notify, "landlock_restrict_self", fd, 1) not in ("allow", "refuse")


def test_netlink_route_sockets_only_with_a_network_namespace_of_its_own():
    """socket(AF_NETLINK, SOCK_RAW or SOCK_DGRAM [| SOCK_NONBLOCK | SOCK_CLOEXEC],
    NETLINK_ROUTE) passes when the sandbox has its own network namespace
    (getifaddrs sees only its lo); any other protocol, type, flag or garbage
    in a high half is refused, as is a netlink socketpair; without the
    namespace (degraded) every netlink socket is refused."""
    nl, raw, dgram = _argrules.AF_NETLINK, _argrules.SOCK_RAW, _argrules.SOCK_DGRAM
    flags = _argrules.SOCK_NONBLOCK | _argrules.SOCK_CLOEXEC
    for net_mode in ("none", "loopback", "allow"):
        spec = attrs.evolve(PY, net_mode=net_mode, netns=True)
        for typ in (raw, dgram, raw | flags, dgram | _argrules.SOCK_CLOEXEC, raw | _argrules.SOCK_NONBLOCK):
            assert _verdict(spec, "socket", nl, typ, 0) == "allow", (net_mode, typ)
            assert _verdict(attrs.evolve(spec, netns=False), "socket", nl, typ, 0) == "refuse", (net_mode, typ)
        for args in ((nl, raw, 4),  # NETLINK_SOCK_DIAG
                     (nl, raw, 9), (nl, raw, 15), (nl, raw, 6), (nl, raw, 16),  # audit, uevents, xfrm, generic
                     (nl, raw, G), (nl, raw, 1 << 32),  # a protocol with garbage above its int
                     (nl, 1, 0), (nl, 5, 0), (nl, 10, 0),  # SOCK_STREAM, SOCK_SEQPACKET, SOCK_PACKET
                     (nl, raw | 0x100, 0), (nl, raw | 0x40000000, 0),  # flags the kernel refuses anyway
                     (nl, G | raw, 0), (nl, (1 << 32) | raw, 0), (nl, (1 << 32) | dgram | flags, 0),
                     (G | nl, raw, 0), ((1 << 32) | nl, raw, 0), (nl + 1, raw, 0), (17, raw, 0)):  # AF_PACKET
            assert _verdict(spec, "socket", *args) == "refuse", (net_mode, args)
        for typ in (raw, dgram):
            assert _verdict(spec, "socketpair", nl, typ, 0, 0x1000) == "refuse"
        assert _verdict(spec, "socket", 1, 1, 0) == "allow"  # AF_UNIX as before
    assert _verdict(attrs.evolve(PY, netns=True), "socket", 2, 1, 0) == "refuse"  # none mode: still no AF_INET

