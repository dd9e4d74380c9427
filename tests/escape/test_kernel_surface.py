"""Kernel surface and ABI bypasses: each forbidden call fails, is reported by
name, and changes nothing on the host."""

import signal

import pytest

DANGEROUS_TRIED = {
    "mount", "unshare", "setns", "chroot", "pivot_root", "bpf", "io_uring_setup", "perf_event_open", "keyctl",
    "add_key", "userfaultfd", "init_module", "finit_module", "delete_module", "kexec_load", "reboot", "syslog",
    "personality", "swapon", "acct", "open_by_handle_at", "name_to_handle_at", "settimeofday", "sethostname",
    "setuid", "ptrace", "process_vm_readv", "pidfd_getfd", "fsopen", "open_tree", "landlock_restrict_self",
}


def _mounts():
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_every_dangerous_syscall_fails_and_is_reported(attack):
    before = _mounts()
    r = attack("syscalls")
    lines = [ln for ln in r["stdout"].splitlines() if ": " in ln]
    assert lines and all(": FAILED" in ln for ln in lines), [ln for ln in lines if "FAILED" not in ln]
    assert set(r["denials"]) >= DANGEROUS_TRIED - {"setns"} or set(r["denials"]) >= DANGEROUS_TRIED
    names = {name for name, _ in r["events"]}
    assert "mount" in names and "bpf" in names and "io_uring_setup" in names
    assert _mounts() == before


def test_namespace_creation_via_clone(attack):
    r = attack("clone-ns")
    assert "clone3-newuser: FAILED Function not implemented" in r["stdout"]  # glibc falls back to clone
    assert "clone-newuser: FAILED" in r["stdout"] and "clone-newpid: FAILED" in r["stdout"]
    assert r["denials"].get("clone") == 2


# x86_64 numbers for x32 (ptrace 101, unshare 272, bpf 321, setns 308, io_uring_setup 425,
# keyctl 250, reboot 169); i386 numbers for int 0x80 (ptrace 26, unshare 310, bpf 357,
# setns 346, socketcall 102, keyctl 288, reboot 88). Then the calls whose arguments
# the native filter checks (test_filter_hardening.py), which another ABI must not
# reach unchecked: x32 chmod 90, socketpair 53, fcntl 72, ioctl 514, recvmsg 519,
# pipe2 293, sched_setscheduler 144, mknod 133; i386 chmod 15, mknod 14, ioctl 54,
# fcntl 55, pipe2 331, sched_setscheduler 156, fchmodat2 452.
X32_CALLS = ["getpid", "mount", "101", "272", "321", "308", "425", "250", "169",
             "90", "53", "72", "514", "519", "293", "144", "133"]
INT80_CALLS = ["getpid", "mount", "26", "310", "357", "346", "102", "288", "88",
               "15", "14", "54", "55", "331", "156", "452"]


@pytest.mark.parametrize(("abi", "call"), [("x32", c) for c in X32_CALLS] + [("int80", c) for c in INT80_CALLS])
def test_other_abis_kill_the_process(attack, abi, call):
    before = _mounts()
    r = attack(abi, call)
    assert r["signal"] == signal.SIGSYS, r
    assert "RETURNED" not in r["stdout"]
    assert _mounts() == before


def test_ptrace_and_process_vm_writev_into_the_supervisor(attack):
    import os

    me = os.getpid()
    r = attack("ptrace", str(me))
    assert "ptrace-attach: FAILED" in r["stdout"] and "ptrace-seize: FAILED" in r["stdout"]
    r = attack("vmwrite", str(me))
    assert "process_vm_writev: FAILED" in r["stdout"]
    with open("/proc/self/status") as f:
        assert "TracerPid:\t0" in f.read()


def test_tiocsti_has_no_terminal_to_reach(attack):
    r = attack("tiocsti")
    assert r["stdout"].count("FAILED") == 4, r["stdout"]
