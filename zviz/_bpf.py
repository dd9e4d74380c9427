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
                           (with the blank network namespace none in-kernel:
                           all notified, the supervisor makes them)
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
SOCK_STREAM, SOCK_DGRAM = 1, 2
SOCKADDR_IN_LEN, SOCKADDR_IN6_LEN = 16, 28
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
    # none | loopback | allow | domains (TCP sockets, connect in-kernel: the egress proxy listens in the
    # sandbox's network namespace) | direct (domains, way "direct": TCP and UDP sockets; a connect with an
    # IPv4 or IPv6 address's length and every listen notified, the pump performs them) | any (zviz trace
    # only: every family, connect in-kernel)
    net_mode: str
    notify: bool  # a supervisor listens: denials are notifications
    learning: bool = False
    zygote: bool = False  # zviz-init serves many commands (ZYGOTE_NEEDS)
    pid_ns: bool = False  # task ids are the sandbox's own (scheduling of its other tasks, pid 1 never)
    netns: bool = False  # a network namespace of its own: NETLINK_ROUTE sockets (it sees only its `lo`)
    # the blank network namespace (zviz/_netns.py): no socket is made in-kernel; every socket and
    # socketpair call is notified, and the supervisor makes those of the families above in the
    # sandbox's own namespace
    blank_netns: bool = False


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
    if spec.net_mode == "direct" and spec.notify:
        # A socket the sandbox was handed is the host's (a connection made for it): it must never
        # listen (a server on the host's network). listen is notified; the pump lets the sandbox's own
        # sockets listen (zviz/_pump.c).
        allow -= {"listen"}
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

    if spec.blank_netns:
        if not spec.notify or spec.net_mode != "none":
            raise ValueError("the blank network namespace needs a supervisor and net.mode = 'none'")
        allow = allow - {"socket", "socketpair"}  # (the default action notifies them)
    if "socket" in allow:
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, AF_UNIX))
        if spec.net_mode == "any":
            f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.NE, AF_UNIX))
        if spec.net_mode == "loopback":
            f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, AF_INET))
            f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, AF_INET6))
        elif spec.net_mode in ("allow", "domains", "direct"):
            for fam in (AF_INET, AF_INET6):
                for kind in (SOCK_STREAM, SOCK_DGRAM) if spec.net_mode == "direct" else (SOCK_STREAM,):
                    f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, fam),
                               sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, kind))
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
        elif spec.net_mode == "direct":
            # An address of sockaddr_in's or sockaddr_in6's length is notified: the pump performs it (out to
            # an allowed name, or inside the sandbox's namespace). Any other length is the kernel's: unix
            # sockets; a TCP connect so spelled meets Landlock, which allows the sandbox no TCP connect of
            # its own (in any namespace: a host socket it holds cannot be pointed elsewhere).
            for alt in _argrules.DIRECT_CONNECT_IN_KERNEL:
                f.add_rule(sc.ALLOW, "connect", *_conditions(sc, alt))
        elif spec.net_mode != "allow":
            f.add_rule(sc.ALLOW, "connect")
        else:
            f.add_rule(sc.ERRNO(errno.EACCES), "connect")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


# ---- the compiled program on disk (zviz/_diskcache.py), for the next process

AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_KILL_PROCESS = 0x80000000
BPF_MAXINSNS = 4096
# the instructions libseccomp emits: ld [k] (seccomp_data), and #k, jeq/jgt/jge/jset #k, ja, ret #k
_LD_ABS, _AND_K, _JA, _RET_K = 0x20, 0x54, 0x05, 0x06
_JUMPS_K = frozenset({0x15, 0x25, 0x35, 0x45})
_SECCOMP_DATA_SIZE = 64


def check_program(prog: bytes) -> bool:
    """Whether `prog` has the shape of a program compile_filter makes: whole
    instructions, at most the kernel's BPF_MAXINSNS, only libseccomp's
    instructions, every jump inside the program, the last one a return, and
    first `ld arch; jeq x86_64` whose other branch kills the process. (A program
    read back from the cache must pass this as well as the entry's digest.)"""
    n, rest = divmod(len(prog), 8)
    if rest or not 2 <= n <= BPF_MAXINSNS:
        return False
    ins = disassemble(prog)
    for i, (code, jt, jf, k) in enumerate(ins):
        if code == _LD_ABS:
            ok = k < _SECCOMP_DATA_SIZE and k % 4 == 0
        elif code in _JUMPS_K:
            ok = i + 1 + max(jt, jf) < n
        elif code == _JA:
            ok = i + 1 + k < n
        else:
            ok = code in (_AND_K, _RET_K)
        if not ok:
            return False
    (c0, _, _, k0), (c1, _, jf1, k1) = ins[0], ins[1]
    if (c0, k0) != (_LD_ABS, 4) or (c1, k1) != (0x15, AUDIT_ARCH_X86_64) or ins[-1][0] != _RET_K:
        return False
    bad_arch = ins[2 + jf1]
    return bad_arch[0] == _RET_K and bad_arch[3] == SECCOMP_RET_KILL_PROCESS


def spec_key(spec: FilterSpec) -> tuple[object, ...]:
    """`spec` as a value whose repr is the same in every process (a frozenset's
    order depends on string hashing, which differs from one process to the next)."""
    return tuple(sorted(v) if isinstance(v, frozenset) else v for v in attrs.astuple(spec, recurse=False))


@functools.lru_cache(maxsize=64)
def program(spec: FilterSpec) -> bytes:
    """compile_filter(spec), through the cache on disk: a new process (`zviz run`)
    neither imports libseccomp (~25 ms with its library lookup) nor compiles.
    The entry's key holds everything the program depends on: the spec, zviz's
    version and the source files of the rules, pyseccomp's file, the machine;
    the libseccomp library file that compiled it is checked on every hit."""
    import os
    from importlib.util import find_spec

    from . import _abi, _diskcache, _linux, _syscall_table

    found = find_spec("pyseccomp")
    # every module whose values reach the program (the rules, the tables, the fd numbers they name)
    sources = [m.__file__ for m in (_argrules, _syscalls, _syscall_table, _linux, _abi)] + [__file__]
    sources.append(found.origin if found is not None and found.origin else "pyseccomp?")
    name = _diskcache.key("bpf", spec_key(spec), os.uname().machine,
                          [_diskcache.file_stamp(p) for p in sources if p])
    cached = _diskcache.load(name, fresh=_library_is_unchanged)
    if cached is not None and check_program(cached):
        return cached
    prog = compile_filter(spec)
    _diskcache.store(name, prog, stamp=_library_stamp())
    return prog


def _library_stamp() -> list[object] | None:
    """The identity of the libseccomp this process loaded (from /proc/self/maps)."""
    from . import _diskcache

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").partition("/")[2]
                if "/libseccomp.so" in "/" + path:
                    return _diskcache.file_stamp("/" + path)
    except OSError:
        pass
    return None


def _library_is_unchanged(stamp: object) -> bool:
    from . import _diskcache

    return (isinstance(stamp, list) and len(stamp) > 1 and isinstance(stamp[0], str)
            and _diskcache.file_stamp(stamp[0]) == stamp)


def _conditions(sc: Any, alt: _argrules.Alternative) -> list[Any]:
    return [sc.Arg(i, sc.EQ, v) if m == _argrules.FULL else sc.Arg(i, sc.MASKED_EQ, m, v) for i, m, v in alt]


def _known(name: str) -> bool:
    from ._syscall_table import LIBSECCOMP_MAX_KNOWN, X86_64

    return X86_64.get(name, 10**6) <= LIBSECCOMP_MAX_KNOWN


def disassemble(prog: bytes) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) per instruction (for tests and debugging)."""
    import struct

    return [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
