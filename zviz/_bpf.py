"""Syscall rules -> a seccomp BPF program (bytes), compiled by libseccomp.

Pure in the sense that matters: a function of its (hashable) inputs, cached, and
it touches no process state (the filter is exported, never loaded here). The C
stage loads the bytes in the child, last, right before execve.

What the program does, for the native x86_64 ABI only:
- any other architecture (i386 via `int 0x80`) and any x32 call
  (nr >= 0x40000000) kills the process: libseccomp emits both checks for a
  filter whose only architecture is x86_64 (SCMP_FLTATR_ACT_BADARCH);
- allowed syscalls pass in-kernel (the kernel's action cache makes most of them
  free); argument checks read registers only, never memory:
    socket/socketpair(family, type): AF_UNIX always; AF_INET/AF_INET6 per
                           network mode (socket only: no inet pairs exist);
                           AF_NETLINK/NETLINK_ROUTE sockets with a network
                           namespace of its own (`_argrules.ROUTE_SOCKET`)
    clone(flags):          no CLONE_NEW* flags
    the rest (`_argrules.py`): no set-id bits by chmod/open/mknod, no MSG_OOB,
    no notification pipes, leases, dnotify or procfs page-table ioctls, no
    MSG_FASTOPEN when connects are supervised, limits and scheduling of
    other tasks (pid 1 never)
- with a supervisor, everything else is a user notification (the supervisor
  records it and answers EPERM or ENOSYS, see _decide.py); without one, the
  kernel answers ENOSYS (EPERM for the dangerous ones) itself.
"""

from __future__ import annotations

import errno
import functools
import tempfile
from typing import Any

import attrs

from . import _argrules, _syscalls

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM = 1
SOCK_TYPE_MASK = 0xF
MSG_FASTOPEN = _argrules.MSG_FASTOPEN
CLONE_NS_FLAGS = (
    0x00020000  # NEWNS
    | 0x02000000  # NEWCGROUP
    | 0x04000000  # NEWUTS
    | 0x08000000  # NEWIPC
    | 0x10000000  # NEWUSER
    | 0x20000000  # NEWPID
    | 0x40000000  # NEWNET
    | 0x00000080  # NEWTIME
)
# spelled here, by network mode; every other argument rule is _argrules' (SELF_ONLY there)
_SPECIAL = {"socket", "socketpair", "clone", "connect"}
# Called after the filter is loaded, by the stage (hand the listener over,
# close it, exec zviz-init by fd, report a failure) and by zviz-init (fork the
# program, exec it, reap, report): always allowed, whatever the policy says,
# or the spawn would wait on a notification nobody can answer yet.
STAGE_NEEDS = frozenset({"sendmsg", "close", "execveat", "execve", "write", "exit_group", "exit", "clone", "wait4"})
# ... and, in a sandbox with a zygote (zviz/_zygote.py), what zviz-init calls
# to serve a request, run a command and clean up after it: wait for requests
# and SIGCHLD, receive the fds, apply the run's rlimits and stdio, list and
# kill what a program left behind. (kill reaches only this sandbox's
# processes: Landlock's signal scope, and the pid namespace.)
ZYGOTE_NEEDS = frozenset({"recvmsg", "read", "poll", "ppoll", "rt_sigprocmask", "signalfd4", "prctl", "openat",
                          "kill", "fcntl", "dup2", "close_range", "prlimit64", "getpid", "getdents64",
                          "sched_setaffinity", "mmap", "munmap", "clock_gettime", "setsid",
                          "landlock_restrict_self"})


@attrs.frozen
class FilterSpec:
    allow: frozenset[str]
    net_mode: str  # none | loopback | allow | any (zviz trace only: every family, connect in-kernel)
    notify: bool  # a supervisor listens: denials are notifications
    learning: bool = False
    zygote: bool = False  # zviz-init serves many commands (ZYGOTE_NEEDS)
    pid_ns: bool = False  # task ids are the sandbox's own (scheduling of its other tasks, pid 1 never)
    netns: bool = False  # a network namespace of its own: NETLINK_ROUTE sockets (it sees only its `lo`)


@functools.lru_cache(maxsize=64)
def compile_filter(spec: FilterSpec) -> bytes:
    """The BPF program for `spec`, compiled once per distinct spec."""
    import pyseccomp as sc

    deny_unknown = sc.NOTIFY if spec.notify else sc.ERRNO(errno.ENOSYS)
    # learning (zviz trace): the program's own execve is notified too, so its
    # path is learned (the stage execs zviz-init with execveat, still allowed)
    allow = spec.allow | (STAGE_NEEDS - {"execve"} if spec.learning else STAGE_NEEDS)
    if spec.zygote:
        allow |= ZYGOTE_NEEDS
    f = sc.SyscallFilter(defaction=deny_unknown)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    try:
        f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)  # binary tree over syscall numbers
    except (OSError, RuntimeError, ValueError):
        pass

    conditional = _argrules.rules(net_mode=spec.net_mode, pid_ns=spec.pid_ns)
    for name in sorted(allow - _SPECIAL - conditional.keys()):
        f.add_rule(sc.ALLOW, name)
    for name, alternatives in sorted(conditional.items()):
        if name in allow:
            for alt in alternatives:
                f.add_rule(sc.ALLOW, name, *_conditions(sc, alt))
    if not spec.notify:  # with a supervisor the default action already notifies
        for name in sorted(_syscalls.DANGEROUS - allow - _syscalls.SILENT_ENOSYS):
            if _known(name):
                f.add_rule(sc.ERRNO(errno.EPERM), name)
    if spec.notify:  # without a supervisor ENOSYS is already the default (clone3 included:
        # glibc falls back to clone only on ENOSYS)
        for name in sorted(_syscalls.SILENT_ENOSYS - spec.allow):
            f.add_rule(sc.ERRNO(errno.ENOSYS), name)

    if "socket" in allow:
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, AF_UNIX))
        if spec.net_mode == "any":
            f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.NE, AF_UNIX))
        if spec.net_mode == "loopback":
            f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, AF_INET))
            f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, AF_INET6))
        elif spec.net_mode == "allow":
            for fam in (AF_INET, AF_INET6):
                f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, fam),
                           sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, SOCK_STREAM))
        if spec.netns and spec.net_mode != "any":  # (zviz trace's "any" allows every family already)
            for alt in _argrules.ROUTE_SOCKET:
                f.add_rule(sc.ALLOW, "socket", *_conditions(sc, alt))
    if "socketpair" in allow:  # the same family rule: a pair of another family reaches its create code
        if spec.net_mode == "any":
            f.add_rule(sc.ALLOW, "socketpair")
        else:
            f.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, AF_UNIX))
    if "clone" in allow:
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NS_FLAGS, 0))
    if "connect" in allow:
        if spec.net_mode == "allow" and spec.notify:
            pass  # the default action notifies: the supervisor performs it, never CONTINUEs
        elif spec.net_mode != "allow":
            f.add_rule(sc.ALLOW, "connect")
        else:
            f.add_rule(sc.ERRNO(errno.EACCES), "connect")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def _conditions(sc: Any, alt: _argrules.Alternative) -> list[Any]:
    return [sc.Arg(i, sc.EQ, v) if m == _argrules.FULL else sc.Arg(i, sc.MASKED_EQ, m, v) for i, m, v in alt]


def _known(name: str) -> bool:
    from ._syscall_table import LIBSECCOMP_MAX_KNOWN, X86_64

    return X86_64.get(name, 10**6) <= LIBSECCOMP_MAX_KNOWN


def disassemble(prog: bytes) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) per instruction (for tests and debugging)."""
    import struct

    return [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
