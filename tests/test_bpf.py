"""The seccomp program: compiled once, native ABI only, argument checks on registers."""

import struct

from zviz import _bpf, _syscalls
from zviz._syscall_table import X86_64

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
    code, jt, jf, k = ins[1]
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
    assert _bpf.MSG_FASTOPEN in consts  # sendto/sendmsg flags checked
    assert _bpf.CLONE_NS_FLAGS in consts  # clone flags checked


def test_groups_known_and_disjoint_from_dangerous():
    for name, members in _syscalls.GROUPS.items():
        assert members <= X86_64.keys(), name
    assert not (_syscalls.DANGEROUS & _syscalls.GROUPS["@python"])
    assert struct.calcsize("=HBBI") == 8
