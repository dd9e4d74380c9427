"""Syscall groups: the vocabulary of `Policy.syscalls.allow` (pure data).

A policy allows names (`"openat"`) and groups (`"@file-read"`). Everything not
allowed is denied. Syscalls in `DANGEROUS` are what an escape attempt uses; when
denied they are reported as events with decoded arguments (answered EPERM).
Others that are denied get ENOSYS, the answer a program expects from a kernel
that lacks the call, so libraries fall back instead of failing.

Some allowed calls carry argument conditions that the BPF filter checks on
registers (never on memory): see `_bpf.py` (socket families, clone flags) and
`_argrules.py` (set-id modes, MSG_OOB, fcntl and ioctl commands, calls on
other tasks).
"""

from __future__ import annotations

from ._syscall_table import X86_64

GROUPS: dict[str, frozenset[str]] = {
    # Needed by every dynamically linked program to start, run and exit.
    "@basic": frozenset(
        """
        read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2
        close close_range lseek fstat newfstatat stat lstat statx fstatfs statfs
        openat open access faccessat faccessat2 readlink readlinkat getdents64 getdents
        getcwd chdir fchdir fcntl dup dup2 dup3 pipe pipe2 ioctl
        mmap munmap mprotect mremap madvise brk msync mincore
        rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack rt_sigsuspend
        rt_sigtimedwait rt_sigpending restart_syscall
        getpid getppid gettid getuid geteuid getgid getegid getgroups getresuid getresgid
        getpgrp getpgid getsid getrlimit prlimit64 getrusage sysinfo uname times umask
        clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time getrandom
        futex set_robust_list get_robust_list set_tid_address arch_prctl rseq
        sched_yield sched_getaffinity sched_getparam sched_getscheduler
        sched_get_priority_max sched_get_priority_min getpriority
        exit exit_group prctl capget membarrier fadvise64 getcpu
        """.split()
    ),
    # Creating processes and threads, and waiting for them. clone is checked:
    # no namespace flags (see _bpf.py). clone3 is answered ENOSYS in-kernel
    # (its flags live in memory), and glibc falls back to clone.
    # sched_setscheduler: unprivileged policies only, never on pid 1
    # (pthread_setschedparam, as libzmq calls it; see _argrules.py).
    "@process": frozenset(
        """
        clone fork vfork execve execveat wait4 waitid kill tgkill tkill
        setpgid setsid sched_setaffinity setpriority sched_setscheduler
        """.split()
    ),
    # Event loops, timers and signals as fds.
    "@events": frozenset(
        """
        poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait
        epoll_pwait epoll_pwait2 eventfd eventfd2 timerfd_create timerfd_settime
        timerfd_gettime signalfd signalfd4 alarm getitimer setitimer timer_create
        timer_settime timer_gettime timer_getoverrun timer_delete
        """.split()
    ),
    # Changing files (where Landlock lets the path be changed: the workdir).
    "@file-write": frozenset(
        """
        mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2 link linkat
        symlink symlinkat chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat
        truncate ftruncate fallocate fsync fdatasync sync_file_range utime utimes
        utimensat futimesat flock sendfile copy_file_range splice tee memfd_create mknod mknodat
        """.split()
    ),
    "@xattr-read": frozenset("getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr".split()),
    # Sockets. socket() is checked by family (and type) according to the network
    # policy; connect may be answered by the supervisor (host:port allowlist).
    "@network": frozenset(
        """
        socket socketpair connect accept accept4 bind listen sendto recvfrom sendmsg
        recvmsg sendmmsg recvmmsg shutdown getsockname getpeername setsockopt getsockopt
        """.split()
    ),
}
GROUPS["@python"] = GROUPS["@basic"] | GROUPS["@process"] | GROUPS["@events"] | GROUPS[
    "@file-write"
] | GROUPS["@xattr-read"] | GROUPS["@network"]
GROUPS["@shell"] = GROUPS["@python"]

# What an escape attempt reaches for. Never allowed by any preset; a policy that
# lists one of these in `allow` is refused unless it says `allow_dangerous`.
DANGEROUS: frozenset[str] = frozenset(
    """
    ptrace process_vm_readv process_vm_writev process_madvise mount umount2 pivot_root
    chroot unshare setns bpf io_uring_setup io_uring_enter io_uring_register
    perf_event_open keyctl add_key request_key userfaultfd init_module finit_module
    delete_module kexec_load kexec_file_load reboot syslog personality
    open_by_handle_at name_to_handle_at swapon swapoff acct quotactl settimeofday
    clock_settime clock_adjtime adjtimex sethostname setdomainname iopl ioperm
    fanotify_init pidfd_getfd kcmp fsopen fsconfig fsmount fspick open_tree move_mount
    mount_setattr lookup_dcookie vhangup uselib ustat sysfs _sysctl nfsservctl
    setuid setgid setreuid setregid setresuid setresgid setgroups setfsuid setfsgid
    migrate_pages move_pages mbind set_mempolicy get_mempolicy
    create_module get_kernel_syms query_module quotactl_fd landlock_create_ruleset
    landlock_add_rule landlock_restrict_self clone3
    """.split()
)

# Answered ENOSYS in the kernel without notifying the supervisor: routine
# probes of new interfaces by libc (reporting them would be noise). clone3 is
# also in DANGEROUS: its flags live in memory, so a policy that allowed it
# would let the code create namespaces past the clone flag check.
SILENT_ENOSYS: frozenset[str] = frozenset({"clone3"})


def expand(entries: tuple[str, ...]) -> frozenset[str]:
    """Names and @groups -> names. Unknown entries raise KeyError(entry)."""
    out: set[str] = set()
    for entry in entries:
        if entry.startswith("@"):
            if entry not in GROUPS:
                raise KeyError(entry)
            out |= GROUPS[entry]
        else:
            if entry not in X86_64:
                raise KeyError(entry)
            out.add(entry)
    return frozenset(out)


# The table's invariants (every name known, DANGEROUS outside @python) are
# checked by tests/test_bpf.py, not by asserts that `python -O` strips.

X86_64_NAMES: frozenset[str] = frozenset(X86_64)
