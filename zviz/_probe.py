"""What this host supports -> `KernelFeatures` (probed once per process).

Probes act (they try the real thing in a throwaway child) rather than read
version numbers: a sysctl, an LSM or a container runtime can forbid what the
kernel version says exists.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

import attrs

from . import _kernel
from ._errors import FeatureUnavailable
from ._spec import Command, StageSpec


@attrs.frozen(kw_only=True)
class KernelFeatures:
    kernel: str
    landlock_abi: int  # 0: none
    landlock_reason: str
    userns: bool
    userns_reason: str
    seccomp_notify: bool
    seccomp_addfd: bool
    sync_wakeup: bool
    wait_killable_recv: bool
    pidfd: bool
    cgroup_v2: str | None  # a writable cgroup v2 directory zviz may use, or None
    cgroup_reason: str
    is_root: bool

    def missing(self) -> list[tuple[str, str, str]]:
        """(feature, consequence, fix) for each missing piece."""
        out = []
        if self.landlock_abi <= 0:
            out.append(("landlock", "no in-kernel path and TCP-port rules: the filesystem is "
                        "protected only by the mount namespace and file permissions",
                        "boot a kernel >= 5.13 with CONFIG_SECURITY_LANDLOCK=y and 'landlock' in lsm="))
        elif self.landlock_abi < 4:
            out.append(("landlock-net", "no TCP port rules (Landlock ABI < 4)", "kernel >= 6.7"))
        elif self.landlock_abi < 6:
            out.append(("landlock-scope", "abstract unix sockets and signals are not scoped "
                        "(Landlock ABI < 6)", "kernel >= 6.12"))
        if not self.userns:
            out.append(("user namespaces", "sandboxes run without namespaces: they see the host's "
                        "processes and /tmp (" + self.userns_reason + ")",
                        "sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces>0, or "
                        "an AppArmor profile allowing userns (Ubuntu 24.04)"))
        if not self.seccomp_notify:
            out.append(("seccomp user notification", "denials cannot be reported and net.mode "
                        "= 'allow' is unavailable", "kernel >= 5.5"))
        if not self.sync_wakeup:
            out.append(("SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP", "answered calls are ~4x slower",
                        "kernel >= 6.6"))
        if self.cgroup_v2 is None:
            out.append(("cgroup v2", "pids and cpu limits come from rlimits only (the memory limit uses a v1 "
                        "memory cgroup where one can be made: see 'memory cgroup per sandbox') (" +
                        self.cgroup_reason + ")", "a unified cgroup hierarchy with a delegated, "
                        "writable subtree (systemd-run --user --scope -p Delegate=yes)"))
        return out


def _probe_userns() -> tuple[bool, str]:
    if os.environ.get("ZVIZ_TEST_NO_USERNS") == "1":
        # Test hook: simulates a host that forbids user namespaces (see tests).
        return False, "disabled by ZVIZ_TEST_NO_USERNS=1"
    # The only part of the probe that costs (a spawn, ~1 ms and more in a fresh
    # process): a success is kept on disk for the next process (zviz/_diskcache.py),
    # keyed by what decides it. Only a success: a stale one fails closed (the
    # sandbox's setup reports the error), while a stale failure would make
    # every sandbox run without namespaces; so a failure is always probed again.
    from . import _diskcache

    name = _diskcache.key("userns", _userns_facts())
    if _diskcache.load(name) == b"ok":
        return True, "ok"
    found = _spawn_in_userns()
    if found[0]:
        _diskcache.store(name, b"ok")
    return found


def _userns_facts() -> tuple[object, ...]:
    """What decides whether this process may make a user namespace: the boot,
    the kernel, who we are and in which user namespace, the sysctls that allow
    it, our seccomp state, the interpreter (an AppArmor profile is per binary),
    and the probe's own code."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return "?"

    status = [ln for ln in read("/proc/self/status").splitlines() if ln.startswith(("Seccomp", "NoNewPrivs"))]
    try:
        ns = os.stat("/proc/self/ns/user").st_ino
    except OSError:
        ns = -1
    from . import _diskcache

    return (read("/proc/sys/kernel/random/boot_id"), os.uname().release, os.uname().machine, os.geteuid(),
            os.getegid(), ns, status, os.path.realpath(sys.executable),
            [read(f"/proc/sys/{p}") for p in ("user/max_user_namespaces", "kernel/unprivileged_userns_clone",
                                              "kernel/apparmor_restrict_unprivileged_userns")],
            _diskcache.file_stamp(__file__))


def _spawn_in_userns() -> tuple[bool, str]:
    null = _kernel.open_devnull()
    try:
        uid, gid = os.geteuid(), os.getegid()
        stage = StageSpec(clone_flags=_kernel.CLONE_NEWUSER, uid_map=f"0 {uid} 1\n", gid_map=f"0 {gid} 1\n",
                          deny_setgroups=uid != 0)
        true = Command(exe=b"/bin/true", argv=(b"/bin/true",), envp=(), cwd=b"/", stdin=null.fd, stdout=null.fd,
                       stderr=null.fd)
        try:
            sp = _kernel.spawn(stage, stage.pack(), true)
        except OSError as e:  # SandboxSetupError too
            return False, f"creating a user namespace failed: {errno.errorcode.get(e.errno or 0, e.errno)} ({e})"
        os.waitpid(sp.pid, 0)
        sp.pidfd.close()
        return True, "ok"
    finally:
        null.close()


def _probe_cgroup() -> tuple[str | None, str]:
    # zviz uses cgroup v2 only where a delegated subtree is writable and has the
    # memory and pids controllers enabled for its children.
    base = os.environ.get("ZVIZ_CGROUP")
    candidates = [base] if base else []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line.strip()[3:]
                    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                        candidates.append(os.path.join(root, rel.lstrip("/")))
    except OSError:
        return None, "cannot read /proc/self/cgroup"
    for c in candidates:
        try:
            with open(os.path.join(c, "cgroup.controllers")) as f:
                ctrls = f.read().split()
        except OSError:
            continue
        if "memory" in ctrls and "pids" in ctrls and os.access(c, os.W_OK):
            return c, "ok"
        return None, f"{c} has controllers {ctrls or 'none'} (hybrid hierarchy: memory and pids are on v1)"
    return None, "no cgroup v2 hierarchy found for this process"


@functools.cache
def probe() -> KernelFeatures:
    abi = _kernel.landlock_abi()
    if abi > 0:
        ll_reason = f"ABI {abi}"
    elif abi == -errno.EOPNOTSUPP:
        ll_reason = "built in but disabled at boot (add 'landlock' to the lsm= kernel parameter)"
    else:
        ll_reason = "not in this kernel (CONFIG_SECURITY_LANDLOCK)"
    try:
        _kernel.seccomp_notif_sizes()
        notify = _kernel.seccomp_action_avail(_kernel.SECCOMP_RET_USER_NOTIF)
    except OSError:
        notify = False
    release = os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    userns, userns_reason = _probe_userns()
    cg, cg_reason = _probe_cgroup()
    return KernelFeatures(
        kernel=release,
        landlock_abi=max(abi, 0),
        landlock_reason=ll_reason,
        userns=userns,
        userns_reason=userns_reason,
        seccomp_notify=notify,
        seccomp_addfd=notify and (major, minor) >= (5, 9),
        sync_wakeup=notify and (major, minor) >= (6, 6),
        wait_killable_recv=(major, minor) >= (5, 19),
        pidfd=hasattr(os, "pidfd_open"),
        cgroup_v2=cg,
        cgroup_reason=cg_reason,
        is_root=os.geteuid() == 0,
    )


DEBIAN_DIST = "/usr/lib/python3/dist-packages"  # Debian's python3-bpfcc installs bcc here


def bcc_status() -> tuple[bool, str]:
    """(available, reason): whether the eBPF monitor (zviz.ebpf) could run
    here, and why not. Checks without importing bcc."""
    try:
        check_bcc()
    except FeatureUnavailable as e:
        return False, f"{e.reason}; fix: {e.fix}"
    return True, "ok (bcc importable, tracefs mounted, kernel headers present)"


def check_bcc() -> None:
    """Raise FeatureUnavailable, with the fix, if the eBPF monitor cannot run here."""
    import importlib.util

    if os.geteuid() != 0:
        raise FeatureUnavailable("eBPF monitor", "it needs root (CAP_BPF, CAP_PERFMON)", "run as root")
    if importlib.util.find_spec("bcc") is None and not os.path.isdir(os.path.join(DEBIAN_DIST, "bcc")):
        raise FeatureUnavailable("eBPF monitor", "bcc is not installed",
                                 "apt-get install python3-bpfcc (or ./scripts/setup-ebpf.sh)")
    if not os.path.exists("/sys/kernel/tracing/events/raw_syscalls"):
        raise FeatureUnavailable("eBPF monitor", "tracefs is not mounted at /sys/kernel/tracing",
                                 "mount -t tracefs nodev /sys/kernel/tracing (or ./scripts/setup-ebpf.sh)")
    build = f"/lib/modules/{os.uname().release}/build/include"
    if not os.path.exists(build):
        raise FeatureUnavailable("eBPF monitor", f"no kernel headers at {build}",
                                 "apt-get install linux-headers-$(uname -r), or ./scripts/setup-ebpf.sh, which links "
                                 "Debian's linux-headers-amd64 when no package matches this kernel")


if __name__ == "__main__":  # pragma: no cover
    print(probe(), file=sys.stderr)
