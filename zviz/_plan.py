"""(Policy, host facts) -> an ordered, inspectable setup plan. Pure: no I/O.

The I/O shell (`_sandbox.py`) gathers the host facts (`Host`: features, ids,
which paths exist and are directories, rlimit ceilings) and hands them in; this
module decides. Planning is per policy and host, spawning per command:
`plan_sandbox` makes a sandbox's `SandboxPlan` (`_planmemo` makes it once
per policy and fills each sandbox's own workdir and ids in); `stage_spec`
turns it into the `StageSpec` every spawn of the sandbox executes
(zviz/_spec.py, the contract with the C stage), and `command_spec` makes
one spawn's `Command`.

Why this module is long: it is the whole planner, one pure function per part
in the order the stage acts (rlimits, the new root and its masks, Landlock,
the sandbox, the memory cgroup), and the two functions that turn a plan into
the stage's input. The new root's planning (`plan_root`, `plan_masks`) is the
part to move out next.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from . import _abi, _linux
from ._errors import PolicyError, SandboxSetupError
from ._policy import Bind, Policy
from ._spec import Command, StageSpec

if TYPE_CHECKING:  # the planner stays pure: no probe, no C extension at import

    from ._probe import KernelFeatures

# Landlock access rights (uapi/linux/landlock.h).
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def handled_fs(abi: int) -> int:
    mask = (1 << 13) - 1
    if abi >= 2:
        mask |= FS_REFER
    if abi >= 3:
        mask |= FS_TRUNCATE
    if abi >= 5:
        mask |= FS_IOCTL_DEV
    return mask


RO = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
RW = (
    RO | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
    | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE
)
# Device nodes the C library and interpreters expect; nothing else under /dev.
DEVICES: dict[str, int] = {
    "/dev/null": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE,
    "/dev/zero": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE,
    "/dev/full": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE,
    "/dev/random": FS_READ_FILE,
    "/dev/urandom": FS_READ_FILE,
}

RLIMIT = {"cpu": 0, "fsize": 1, "core": 4, "nproc": 6, "nofile": 7, "as": 9}
INFINITY = 2**64 - 1
SANDBOX_UID = 1000  # the uid the code sees inside its user namespace
NOBODY = 65534  # the host uid a root caller's sandbox runs as


@attrs.frozen(kw_only=True)
class Host:
    """Facts about the host the plan depends on (gathered by the I/O shell)."""

    features: KernelFeatures
    euid: int
    egid: int
    is_dir: Mapping[str, bool]  # every path the policy names (and devices): exists -> is a dir
    # Listed paths whose real path (every symlink resolved, os.path.realpath)
    # differs -> that real path. The stage binds the real path and follows no
    # symlink on the way (a link swapped in after this check fails the spawn).
    links: Mapping[str, str] = attrs.field(factory=dict)
    rlimit_hard: Mapping[str, int]  # RLIMIT name -> current hard limit
    memory_cgroup: bool = False  # a per-sandbox memory cgroup was made for this sandbox
    memory_cgroup_reason: str = "not probed"  # why not, when not
    sandbox_ids: tuple[int, int] = (NOBODY, NOBODY)  # a root caller's sandbox's own host uid/gid (zviz/_ids.py)
    # zviz's own host directories (real paths): the start-up cache (cached
    # filters, the CLI servers' sockets) and the workdirs' parents. Where a
    # listed path or a bind would show one, the sandbox sees an empty
    # read-only directory: a sandbox of a non-root caller runs as its uid and
    # could otherwise rewrite the filters of later sandboxes or reach other
    # sandboxes' workdirs.
    hidden: tuple[str, ...] = ()
    # this process holds the blank network namespace (zviz/_netns.py: root, seccomp user notification)
    blank_netns: bool = False


@attrs.frozen(kw_only=True)
class LandlockPlan:
    abi: int
    handled_fs: int
    handled_net: int
    scoped: int
    paths: tuple[tuple[str, int], ...]
    ports: tuple[tuple[int, int], ...]


# Host paths a read-write listing may not reach: a path equal to one of these,
# below /proc, /sys or /dev, or holding one of them (a parent such as "/")
# would hand the sandbox the host's system. Checked on the real path.
SYSTEM_PATHS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root",
                "/run", "/sbin", "/sys", "/usr", "/var")
NO_RW_BELOW = ("/proc", "/sys", "/dev")

# What a container runtime masks by default (moby's MaskedPaths and
# ReadonlyPaths), plus host identifiers: files get /dev/null bound over them,
# directories an empty read-only tmpfs; the read-only ones are bound onto
# themselves read-only. Applied inside the new root after /proc is mounted.
MASK_FILE, MASK_DIR, MASK_RDONLY, MASK_PIN = _abi.MASK_FILE, _abi.MASK_DIR, _abi.MASK_RDONLY, _abi.MASK_PIN
PROC_READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
PROC_MASK_FILES = ("/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                   "/proc/sched_debug", "/proc/interrupts", "/proc/cmdline", "/proc/kallsyms", "/proc/modules",
                   "/proc/sys/kernel/random/boot_id", "/proc/config.gz", "/proc/vmallocinfo", "/proc/slabinfo")
PROC_MASK_DIRS = ("/proc/acpi", "/proc/asound", "/proc/scsi", "/proc/pressure", "/proc/driver")
HOST_MASK_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id", "/sys/class/dmi/id/product_uuid",
                   "/sys/class/dmi/id/board_serial", "/sys/class/dmi/id/product_serial")
HOST_MASK_DIRS = ("/sys/firmware", "/sys/devices/virtual/powercap", "/sys/fs/cgroup", "/sys/kernel/debug",
                  "/sys/kernel/security")


def check_listed(policy: Policy, host: Host) -> None:
    """Refuse listings whose real path hands over the host: a read-write path
    that is, holds, or lies below a system path (a symlink to `/` passed
    the old "not '/'" check), and a read-only path that resolves to `/`
    without saying so."""
    rw_binds = [b.source for b in policy.fs.binds if not b.read_only]
    for path in (*policy.fs.read_write, *rw_binds):
        real = host.links.get(path, path)
        shown = path if real == path else f"{path} (-> {real})"
        if any(real == s or _beneath(s, real) for s in SYSTEM_PATHS) or any(_beneath(real, d) for d in NO_RW_BELOW):
            raise PolicyError("fs.read_write", shown,
                              "a directory of your own: not '/', a system directory (" + ", ".join(SYSTEM_PATHS[1:])
                              + "), a parent of one, or anything below /proc, /sys or /dev")
    for path in policy.fs.read_only:
        if path != "/" and host.links.get(path) == "/":
            raise PolicyError("fs.read_only", f"{path} (-> /)",
                              "a path that is not a link to '/' (list '/' itself to mean the whole host)")


# Where the workdir and HOME are inside a new root, whatever their host paths.
WORKSPACE = "/workspace"
HOME = "/home/sandbox"

# Mount operations of the new root (zviz/_abi.h: OP_*), on paths relative to it.
OP_MKDIR, OP_SYMLINK, OP_FILE, OP_MOVE, OP_PROC, OP_TMPFS = (_abi.OP_MKDIR, _abi.OP_SYMLINK, _abi.OP_FILE,
                                                            _abi.OP_MOVE, _abi.OP_PROC, _abi.OP_TMPFS)
STAGING = ("/tmp", "/mnt", "/var/tmp", "/proc")  # where the new root is assembled (any empty-able dir)
DEV_LINKS = {"dev/fd": "/proc/self/fd", "dev/stdin": "/proc/self/fd/0", "dev/stdout": "/proc/self/fd/1",
             "dev/stderr": "/proc/self/fd/2"}


def looked_up(policy: Policy) -> frozenset[str]:
    """The host paths whose facts (`Host.is_dir`, `Host.links`) a plan of
    `policy` reads, besides its workdir's: the listed paths, the binds'
    sources, the devices and the places a new root may be assembled on."""
    return frozenset((*policy.fs.read_only, *policy.fs.read_write, *(b.source for b in policy.fs.binds),
                      *DEVICES, *STAGING))


@attrs.frozen(kw_only=True)
class RootPlan:
    """The sandbox's filesystem: a fresh tmpfs root assembled on `staging`."""

    staging: str
    binds: tuple[tuple[str, bool], ...]  # (host source, read-only), cloned before anything is covered
    ops: tuple[tuple[int, str, str, int], ...]  # (OP_*, path relative to the new root, argument, bind index)
    private_tmp: bool
    masks: tuple[tuple[int, str], ...] = ()  # (MASK_*, absolute path in the new root), after pivot_root
    root_readonly: bool = True  # the root tmpfs is remounted read-only once assembled
    home: bool = False  # HOME is a private tmpfs (with the private /tmp)


@attrs.frozen(kw_only=True)
class SandboxPlan:
    """What every spawn of one sandbox does, in the order the child does it
    (the command itself is not part of it: see `command_spec`)."""

    env: tuple[tuple[str, str], ...]
    cwd: str
    clone_flags: int
    uid_map: str | None
    gid_map: str | None
    deny_setgroups: bool
    drop_groups: bool
    uid: int
    gid: int
    creds_late: bool
    host_uid: int  # who the sandbox is on the host (owner of the files it writes)
    host_gid: int
    mount_ns: bool
    mount_proc: bool
    new_root: RootPlan | None
    loopback_up: bool
    hostname: str | None
    rlimits: tuple[tuple[str, int, int], ...]
    landlock: LandlockPlan | None
    degraded: tuple[str, ...]  # human-readable: which layers are off and why
    memory_cgroup: int | None = None  # bytes: the sandbox's memory cgroup limit (None: no cgroup)
    disk: int | None = None  # bytes: the workdir is a tmpfs of this size, mounted on the host (None: no cap)
    deny_syscalls: tuple[str, ...] = ()  # taken out of the allowlist (e.g. memfd_create without a cgroup)
    workspace: str = WORKSPACE  # the workdir's path inside (its host path without a new root)
    home: str | None = None  # HOME's private tmpfs inside (None: HOME is the workspace)
    # no network namespace of its own but the blank one (zviz/_netns.py); its sockets are made by the supervisor
    blank_netns: bool = False

    def steps(self) -> list[str]:
        """The plan as a readable list of steps (for tests and debugging)."""
        out = []
        if self.clone_flags:
            names = [n for n, f in (("user", _linux.CLONE_NEWUSER), ("pid", _linux.CLONE_NEWPID),
                                    ("mount", _linux.CLONE_NEWNS), ("net", _linux.CLONE_NEWNET),
                                    ("ipc", _linux.CLONE_NEWIPC), ("uts", _linux.CLONE_NEWUTS))
                     if self.clone_flags & f]
            out.append("namespaces: " + ", ".join(names))
            if self.blank_netns:
                out.append("network: the blank namespace; sockets made by the supervisor in one of its own")
        if self.uid_map:
            out.append(f"id maps: uid {self.uid_map.strip()}, gid {self.gid_map.strip() if self.gid_map else '-'}")
        if self.new_root:
            r = self.new_root
            out.append(f"mounts: / private; new root on {r.staging} with {len(r.binds)} bind mounts "
                       f"({sum(1 for _, ro in r.binds if ro)} read-only), /proc, "
                       + ("a private /tmp, " if r.private_tmp else "") + "pivot_root")
        elif self.mount_ns:
            out.append("mounts: / private" + (", fresh /proc" if self.mount_proc else ""))
        if self.uid >= 0:
            out.append(f"credentials: uid {self.uid}, gid {self.gid}, no supplementary groups"
                       if self.drop_groups else f"credentials: uid {self.uid}, gid {self.gid}")
        out.append("rlimits: " + ", ".join(f"{n}={s}" for n, s, _ in self.rlimits))
        if self.landlock:
            out.append(f"landlock ABI {self.landlock.abi}: {len(self.landlock.paths)} path rules, "
                       f"{len(self.landlock.ports)} port rules")
        out.append("no_new_privs")
        out.append("seccomp allowlist, then execve zviz-init (which runs the command)")
        return out


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _rlimits(policy: Policy, host: Host, userns: bool) -> tuple[tuple[str, int, int], ...]:
    lim = policy.limits
    want: list[tuple[str, int | None, int | None]] = [("core", 0, 0)]
    if lim.cpu_s is not None:
        cpu = max(1, int(lim.cpu_s + 0.999))
        want.append(("cpu", cpu, cpu + 1))  # SIGXCPU at soft, SIGKILL one second later
    if lim.memory is not None:
        want.append(("as", lim.memory, lim.memory))
    if lim.file_size is not None:
        want.append(("fsize", lim.file_size, lim.file_size))
    if lim.open_files is not None:
        want.append(("nofile", lim.open_files, lim.open_files))
    # RLIMIT_NPROC counts the tasks of a uid within a user namespace; without
    # one (and not root), it would count every process of the calling user.
    if lim.processes is not None and (userns or host.euid == 0):
        want.append(("nproc", lim.processes, lim.processes))
    out = []
    for name, soft, hard in want:
        ceiling = host.rlimit_hard.get(name, INFINITY)
        hard_v = min(hard if hard is not None else INFINITY, ceiling)
        soft_v = min(soft if soft is not None else INFINITY, hard_v)
        out.append((name, soft_v, hard_v))
    return tuple(out)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def plan_root(policy: Policy, host: Host, workdir: str, with_proc: bool, uid: int = -1, gid: int = -1) -> RootPlan:
    """Which mounts make up the sandbox's root, in the order the stage does them.
    The workdir is at WORKSPACE, each `fs.binds` entry at its target, HOME a
    private tmpfs (owned by the sandbox's `uid`/`gid` inside) with /tmp."""
    staging = next((s for s in STAGING if host.is_dir.get(s)), None)
    if staging is None:
        raise SandboxSetupError("plan", errno.ENOENT, "/tmp", "no directory to assemble the sandbox root on")
    # (target, kind, source, read_only): sorted so parents come before children
    entries: list[tuple[str, str, str, bool]] = []
    listed = dict.fromkeys(policy.fs.read_only, True) | dict.fromkeys(policy.fs.read_write, False)
    for path, ro in listed.items():
        target = host.links.get(path)
        # A link to (below) another listed path that is bound where it is:
        # the same link inside the new root. Anything else: the real path is
        # bound at the listed place (the stage follows no symlink to it).
        inner = next((o for o in listed if o != path and o not in host.links and target and _beneath(target, o)),
                     None)
        if target is not None and inner is not None:
            if not ro and listed[inner]:
                raise PolicyError("fs.read_write", f"{path} (-> {target})",
                                  f"a path that does not resolve into the read-only {inner}")
            entries.append((path, "symlink", os.path.relpath(target, os.path.dirname(path)), ro))
        else:
            entries.append((path, "bind", target or path, ro))
    is_dir = dict(host.is_dir)
    is_dir[WORKSPACE] = True
    entries.append((WORKSPACE, "bind", workdir, False))
    for b in policy.fs.binds:
        is_dir[b.target] = host.is_dir.get(b.source, True)
        entries.append((b.target, "bind", host.links.get(b.source, b.source), b.read_only))
    for dev in DEVICES:
        if dev in host.is_dir:
            entries.append((dev, "bind", dev, False))
    private_tmp = policy.fs.tmp_size is not None and not any(_beneath("/tmp", p) for p in listed)
    if private_tmp:
        opts = f"mode=1777,size={policy.fs.tmp_size},nr_inodes=65536"
        entries.append(("/tmp", "tmpfs", opts, False))
        entries.append(("/dev/shm", "tmpfs", opts, False))  # POSIX semaphores, shm_open
    home = private_tmp and not any(_beneath(HOME, p) or _beneath(p, HOME) for p in listed)
    if home:
        # HOME: caches and dotfiles (matplotlib's, fontconfig's, pip's) stay out of the workspace
        owner = f",uid={uid},gid={gid}" if uid >= 0 and gid >= 0 else ""
        mode = "0700" if owner else "1777"
        entries.append((HOME, "tmpfs", f"mode={mode}{owner},size={policy.fs.tmp_size},nr_inodes=65536", False))
    if with_proc:
        entries.append(("/proc", "proc", "", False))
    entries.sort(key=lambda e: _parts(e[0]))

    binds: list[tuple[str, bool]] = []
    ops: list[tuple[int, str, str, int]] = []
    made: set[str] = set()

    def parents(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                ops.append((OP_MKDIR, d, "", -1))
                made.add(d)

    for target, kind, src, ro in entries:
        rel = "/".join(_parts(target))
        parents(rel)
        if kind == "symlink":
            ops.append((OP_SYMLINK, rel, src, -1))
        elif kind == "bind":
            if is_dir.get(target, True):
                ops.append((OP_MKDIR, rel, "", -1))
            else:
                ops.append((OP_FILE, rel, "", -1))
            binds.append((src, ro))
            ops.append((OP_MOVE, rel, "", len(binds) - 1))
        elif kind == "tmpfs":
            ops.append((OP_MKDIR, rel, "", -1))
            ops.append((OP_TMPFS, rel, src, -1))
        elif kind == "proc":
            ops.append((OP_MKDIR, rel, "", -1))
            ops.append((OP_PROC, rel, "", -1))
        made.add(rel)
    if "dev" in made:
        for link, to in DEV_LINKS.items():
            ops.append((OP_SYMLINK, link, to, -1))
    if len(binds) > _abi.MAX_BINDS or len(ops) > _abi.MAX_MOUNT_OPS:  # the stage's fixed-size tables
        raise PolicyError("fs", f"{len(binds)} bind mounts, {len(ops)} mount operations",
                          f"at most {_abi.MAX_BINDS} bind mounts and {_abi.MAX_MOUNT_OPS} operations: "
                          "list fewer, shallower paths")
    return RootPlan(staging=staging, binds=tuple(binds), ops=tuple(ops), private_tmp=private_tmp,
                    masks=plan_masks(listed, host, with_proc, policy.fs.binds), home=home)


def plan_masks(listed: Mapping[str, bool], host: Host, with_proc: bool,
               binds: tuple[Bind, ...] = ()) -> tuple[tuple[int, str], ...]:
    """Masks inside the new root (the stage skips a path this kernel lacks).
    Read-only binds first, so that a mask inside one (boot_id in /proc/sys)
    lands on top of it."""
    can_null = "/dev/null" in host.is_dir  # files are masked with the sandbox's /dev/null
    bound = [p for p in listed if p not in host.links or not any(
        o != p and _beneath(host.links[p], o) for o in listed)]
    out: list[tuple[int, str]] = []
    if with_proc:
        out += [(MASK_RDONLY, p) for p in PROC_READ_ONLY]
        out += [(MASK_FILE, p) for p in PROC_MASK_FILES if can_null]
        out += [(MASK_DIR, p) for p in PROC_MASK_DIRS]
    # (inside path, host path it shows, writable) of every bind: a listed path shows its real path
    shown = [(b, host.links.get(b, b), not listed[b]) for b in bound]
    shown += [(bd.target, host.links.get(bd.source, bd.source), not bd.read_only) for bd in binds]
    for kind, paths in ((MASK_FILE, HOST_MASK_FILES), (MASK_DIR, (*HOST_MASK_DIRS, *host.hidden))):
        if kind == MASK_FILE and not can_null:
            continue
        out += [(kind, p) for p in paths if any(_beneath(p, b) for b in bound)]
        # a host fact beneath a bind's source, or a listed link's real path, is masked where it is shown
        for inside, src, _rw in shown[len(bound):] + [e for e in shown[:len(bound)] if e[0] != e[1]]:
            out += [(kind, inside + p[len(src):]) for p in paths if _beneath(p, src)]
    # zviz's own directories beneath a writable bind: each directory between the bind and the mask is bound
    # onto itself first (a mount point cannot be renamed or removed: EBUSY), else the sandbox could rename a
    # parent away and make a directory of its own where the host looks for its cache or its workdirs
    pins: list[tuple[int, str]] = []
    for inside, src, rw in shown:
        for p in host.hidden if rw else ():
            if _beneath(p, src):
                parts = p[len(src):].strip("/").split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    pin = (MASK_PIN, inside.rstrip("/") + "/" + "/".join(parts[:i]))
                    if pin not in pins:
                        pins.append(pin)
    return (*pins, *out)


def plan_landlock(policy: Policy, host: Host, workdir: str, mount_proc: bool,
                  private_tmp: bool = False, new_root: bool = False, home: bool = False) -> LandlockPlan | None:
    """The Landlock rules, on the paths as the sandbox sees them (the stage
    adds them after pivot_root): with a new root the workdir is WORKSPACE and
    each bind its target."""
    abi = host.features.landlock_abi
    if abi <= 0:
        return None
    hfs = handled_fs(abi)
    paths: dict[str, int] = {}

    listed = set(policy.fs.read_only) | set(policy.fs.read_write)

    def add(path: str, rights: int) -> None:
        if path not in host.is_dir:
            field = "fs.read_write" if path in policy.fs.read_write else "fs.read_only"
            raise PolicyError(field, path, "a path that exists on this host")
        if not host.is_dir[path]:
            rights &= _FILE_RIGHTS  # Landlock refuses directory rights on files
        # The stage opens each rule's path following no symlink. In the new
        # root a listed path is a mount point where it is listed, unless it
        # became a link to another listed path; on the host's own tree
        # (no new root) it is the real path.
        real = host.links.get(path, path)
        if new_root and (real == path or not any(o != path and _beneath(real, o) for o in listed)):
            real = path
        paths[real] = paths.get(real, 0) | (rights & hfs)

    for p in policy.fs.read_only:
        add(p, RO)
    for p in policy.fs.read_write:
        add(p, RW)
    if new_root:
        paths[WORKSPACE] = RW & hfs
        for b in policy.fs.binds:
            if b.source not in host.is_dir:
                raise PolicyError("fs.binds.source", b.source, "a path that exists on this host")
            rights = RO if b.read_only else RW
            if not host.is_dir[b.source]:
                rights &= _FILE_RIGHTS
            paths[b.target] = paths.get(b.target, 0) | (rights & hfs)
    else:
        add(workdir, RW)
    for dev, rights in DEVICES.items():
        if dev in host.is_dir:
            add(dev, rights)
    if mount_proc:
        paths["/proc"] = (FS_READ_FILE | FS_READ_DIR) & hfs
    if private_tmp:
        paths["/tmp"] = (RW & ~FS_EXECUTE) & hfs  # the sandbox's own tmpfs
        paths["/dev/shm"] = (RW & ~FS_EXECUTE) & hfs
    if home:
        paths[HOME] = (RW & ~FS_EXECUTE) & hfs  # like /tmp: data, not programs
    if new_root:
        # The root is the sandbox's own tmpfs holding only the policy's paths:
        # listing it (and walking its directories) reveals nothing of the host.
        paths["/"] = paths.get("/", 0) | (FS_READ_DIR & hfs)

    handled_net = 0
    ports: list[tuple[int, int]] = []
    if abi >= 4 and policy.net.mode != "loopback":
        # none: no TCP at all. allow: connect only to the listed ports (the
        # supervisor performs each connect; this is the in-kernel backstop).
        handled_net = NET_BIND_TCP | NET_CONNECT_TCP
        if policy.net.mode == "allow":
            ports = sorted({(e.port, NET_CONNECT_TCP) for e in policy.net.allow})
        elif policy.net.mode == "domains":  # the egress proxy's port on the sandbox's loopback
            from . import _egressproto  # (only for domains: its request parsers cost ~6 ms of import)

            ports = [(_egressproto.PROXY_PORT, NET_CONNECT_TCP)]
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    return LandlockPlan(abi=abi, handled_fs=hfs, handled_net=handled_net, scoped=scoped,
                        paths=tuple(paths.items()), ports=tuple(ports))


def plan_sandbox(policy: Policy, host: Host, *, workdir: str,
                 extra_env: Mapping[str, str] | None = None) -> SandboxPlan:
    f = host.features
    ns = policy.namespaces
    degraded: list[str] = []
    is_root = host.euid == 0
    userns = ns.user and f.userns
    if ns.user and not f.userns:
        degraded.append(f"user namespace unavailable ({f.userns_reason})")
    can_ns = userns or is_root  # without a user namespace only root may create the others
    flags = 0
    if userns:
        flags |= _linux.CLONE_NEWUSER
    want = [(ns.pid, _linux.CLONE_NEWPID, "pid"), (ns.mount, _linux.CLONE_NEWNS, "mount"),
            (ns.ipc, _linux.CLONE_NEWIPC, "ipc"), (ns.uts, _linux.CLONE_NEWUTS, "uts"),
            (ns.net, _linux.CLONE_NEWNET, "net")]
    for on, flag, name in want:
        if on and can_ns:
            flags |= flag
        elif on:
            degraded.append(f"{name} namespace off (needs a user namespace or root)"
                            + (": the sandbox can bind the host's abstract unix socket names and read the "
                               "host's interfaces through AF_UNIX socket ioctls" if name == "net" else ""))
    if not flags & _linux.CLONE_NEWPID:
        degraded.append("no pid namespace: teardown kills the sandbox's processes by its own host uid" if is_root else
                        "no pid namespace: a process that leaves the process group (setsid) can outlive teardown "
                        "(run as root for a per-sandbox uid, or keep namespaces.pid)")
    # net.mode = "none": no namespace per sandbox (its making and freeing are most of a fresh sandbox's
    # kernel time). The sandbox starts in the blank one, shared and always empty, and each socket it asks
    # for is made by the supervisor in a namespace of its own, made at its first (zviz/_netns.py).
    blank_netns = (bool(flags & _linux.CLONE_NEWNET) and policy.net.mode == "none" and ns.lazy_net
                   and host.blank_netns and f.seccomp_notify and f.seccomp_addfd)
    if blank_netns:
        flags &= ~_linux.CLONE_NEWNET
    if policy.net.mode in ("loopback", "allow", "domains") and not flags & _linux.CLONE_NEWNET:
        # checked here, not in Policy: a policy's validity must not depend on who builds it
        fix = "a host where network namespaces can be created (user namespaces, or root)"
        if not ns.user and not is_root:
            fix = "namespaces.user = true, on " + fix
        raise PolicyError("net.mode", policy.net.mode, fix)

    uid_map: str | None
    gid_map: str | None
    if userns:
        host_uid, host_gid = host.sandbox_ids if is_root else (host.euid, host.egid)
        uid_map = f"{SANDBOX_UID} {host_uid} 1\n"
        gid_map = f"{SANDBOX_UID} {host_gid} 1\n"
        uid = gid = SANDBOX_UID
        deny_setgroups = not is_root  # an unprivileged gid_map needs setgroups denied
        drop_groups = is_root
        creds_late = False
    elif is_root:
        host_uid, host_gid = host.sandbox_ids
        uid_map = gid_map = None
        uid, gid = host.sandbox_ids
        deny_setgroups, drop_groups, creds_late = False, True, True
    else:
        host_uid, host_gid = host.euid, host.egid
        uid_map = gid_map = None
        uid = gid = -1
        deny_setgroups = drop_groups = creds_late = False

    check_listed(policy, host)
    mount_ns = bool(flags & _linux.CLONE_NEWNS)
    mount_proc = mount_ns and bool(flags & _linux.CLONE_NEWPID)
    whole_host = "/" in policy.fs.read_only  # `zviz trace` and deliberate policies: the host, read-only
    new_root = plan_root(policy, host, workdir, mount_proc, uid, gid) if mount_ns and not whole_host else None
    if policy.fs.binds and new_root is None:
        raise PolicyError("fs.binds", [f"{b.source}:{b.target}" for b in policy.fs.binds],
                          "a new root to bind them in (a mount namespace, and no '/' in fs.read_only)")
    workspace = WORKSPACE if new_root is not None else workdir
    home = HOME if new_root is not None and new_root.home else None
    if whole_host:
        degraded.append("fs.read_only lists '/': the whole host filesystem is readable (no new root)")
    if not mount_ns:
        degraded.append("the host's filesystem stays visible (no mount namespace): Landlock alone guards it")

    env = dict(policy.env)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("HOME", home or workspace)
    if not (new_root and new_root.private_tmp):
        env.setdefault("TMPDIR", workspace)  # no private /tmp: temp files go to the workdir
    env["PWD"] = workspace
    if policy.net.mode == "domains" and policy.net.way == "proxy":  # every client that honours these (network.md)
        from . import _egressproto

        for k, v in _egressproto.proxy_environment().items():
            env.setdefault(k, v)
    if extra_env:
        env.update(extra_env)

    ll = plan_landlock(policy, host, workdir, mount_proc, private_tmp=bool(new_root and new_root.private_tmp),
                       new_root=new_root is not None, home=home is not None)
    if ll is None:
        degraded.append(f"Landlock unavailable ({f.landlock_reason}): commands of one sandbox are not separated "
                        "from each other (same uid: /proc/PID/environ, mem, and for a non-root caller the stdio "
                        "pipes through /proc/PID/fd)")
    elif ll.abi < 4 and policy.net.mode != "loopback":
        degraded.append(f"Landlock ABI {ll.abi} < 4: no TCP port rules (the seccomp socket filter remains)")
    if ll is not None and ll.abi < 6:
        degraded.append(f"Landlock ABI {ll.abi} < 6: abstract unix sockets and signals are not scoped "
                        "(commands of one sandbox can signal each other)"
                        + ("" if flags & _linux.CLONE_NEWNET or blank_netns
                           else " (the host's abstract sockets are reachable)"))
    if not f.seccomp_notify:
        degraded.append("no seccomp user notification: denials are answered in the kernel and not reported")
    memory_cgroup, deny = plan_memory(policy, host, degraded)
    disk = None
    if policy.fs.disk is not None:
        if host.euid == 0:
            disk = policy.fs.disk
        else:
            degraded.append("fs.disk is not enforced: a size-capped workdir needs root (zviz mounts a tmpfs on it)")
    return SandboxPlan(
        env=tuple(sorted(env.items())), cwd=workspace,
        clone_flags=flags, uid_map=uid_map, gid_map=gid_map, deny_setgroups=deny_setgroups,
        drop_groups=drop_groups, uid=uid, gid=gid, creds_late=creds_late,
        host_uid=host_uid, host_gid=host_gid, mount_ns=mount_ns, mount_proc=mount_proc, new_root=new_root,
        loopback_up=bool(flags & _linux.CLONE_NEWNET) and policy.net.mode == "loopback",
        blank_netns=blank_netns,
        hostname="zviz" if flags & _linux.CLONE_NEWUTS else None,
        rlimits=_rlimits(policy, host, userns), landlock=ll, degraded=tuple(degraded),
        memory_cgroup=memory_cgroup, deny_syscalls=deny, disk=disk, workspace=workspace, home=home,
    )


def plan_memory(policy: Policy, host: Host, degraded: list[str]) -> tuple[int | None, tuple[str, ...]]:
    """The sandbox's total memory: `limits.memory` is also the limit of a
    memory cgroup holding every process of the sandbox, which charges what
    RLIMIT_AS does not see (memfd and shared memory, tmpfs files, pipe and
    socket buffers, page cache). Without one, memfd_create is refused unless
    the policy opts back in (limits.memfd_without_cgroup)."""
    limit = policy.limits.memory
    if limit is None:
        return None, ()
    if host.memory_cgroup:
        return limit, ()
    deny: tuple[str, ...] = ()
    what = "memory is bounded per process only (RLIMIT_AS), pipe and socket buffers and page cache are not"
    if not policy.limits.memfd_without_cgroup and "memfd_create" in policy.syscalls.names():
        deny = ("memfd_create",)
        what += ", and memfd_create is refused (limits.memfd_without_cgroup = true allows it, unbounded)"
    elif "memfd_create" in policy.syscalls.names():
        what += ", and memfd_create is allowed and unbounded (limits.memfd_without_cgroup)"
    degraded.append(f"no memory cgroup ({host.memory_cgroup_reason}): {what}")
    return None, deny


def stage_spec(plan: SandboxPlan, *, bpf: bytes, seccomp_flags: int) -> StageSpec:
    """What the C stage does for every spawn of the sandbox planned by `plan`."""
    root, ll = plan.new_root, plan.landlock
    return StageSpec(
        clone_flags=plan.clone_flags, uid_map=plan.uid_map, gid_map=plan.gid_map,
        deny_setgroups=plan.deny_setgroups, drop_groups=plan.drop_groups, uid=plan.uid, gid=plan.gid,
        creds_late=plan.creds_late, mount_ns=plan.mount_ns, mount_proc=plan.mount_proc,
        staging=root.staging if root else None, binds=root.binds if root else (), mount_ops=root.ops if root else (),
        masks=root.masks if root else (), root_readonly=bool(root and root.root_readonly),
        loopback_up=plan.loopback_up, blank_netns=plan.blank_netns, hostname=plan.hostname, setsid=True,
        pdeathsig=int(signal.SIGKILL),
        rlimits=tuple((RLIMIT[n], soft, hard) for n, soft, hard in plan.rlimits),
        landlock_abi=ll.abi if ll else 0, ll_fs=ll.handled_fs if ll else 0, ll_net=ll.handled_net if ll else 0,
        ll_scoped=ll.scoped if ll else 0, ll_paths=ll.paths if ll else (), ll_ports=ll.ports if ll else (),
        bpf=bpf, seccomp_flags=seccomp_flags,
        # its own cgroup namespace whenever it may make one (a user namespace, or root): the host's
        # cgroup tree stays out of /proc/self/cgroup
        cgroup_ns=bool(plan.clone_flags & _linux.CLONE_NEWUSER) or plan.creds_late,
    )


def zygote_stage_spec(stage: StageSpec) -> StageSpec:
    """The variant that starts a sandbox's zygote: no rlimits of its own (each
    run gets them: the zygote's CPU time must not count), and, with Landlock,
    the ruleset of each command's own domain (docs/security-model.md)."""
    return attrs.evolve(stage, rlimits=(), command_ruleset=stage.landlock_abi > 0)


def command_spec(plan: SandboxPlan, *, exe: bytes, argv: tuple[bytes, ...], envp: tuple[bytes, ...],
                 stdio: tuple[int, int, int], status_fd: int, init_fd: int, track: tuple[int, int] = (-1, 0),
                 cgroup_fd: int = -1) -> Command:
    """One command's spawn: zviz-init (exec'd by `init_fd`) runs `exe` with `argv`
    (in the sandbox's memory cgroup, whose cgroup.procs is `cgroup_fd`)."""
    if not argv:
        raise PolicyError("argv", argv, "a non-empty command")
    return Command(exe=exe, argv=(b"zviz-init", str(_abi.STATUS_FD).encode(), exe, *argv), envp=envp,
                   cwd=plan.cwd.encode(), stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], init_fd=init_fd,
                   status_fd=status_fd, track_map_fd=track[0], track_value=track[1], cgroup_fd=cgroup_fd)


def zygote_command(plan: SandboxPlan, stage: StageSpec, *, ctrl_fd: int, devnull: int, init_fd: int,
                   track: tuple[int, int] = (-1, 0), cgroup_fd: int = -1) -> Command:
    """The spawn of a sandbox's zygote: zviz-init --zygote CTRL_FD RULESET_FD|-."""
    ruleset = str(_abi.COMMAND_RULESET_FD).encode() if stage.command_ruleset else b"-"
    return Command(exe=b"zviz-init", argv=(b"zviz-init", b"--zygote", str(_abi.STATUS_FD).encode(), ruleset),
                   envp=tuple(f"{k}={v}".encode() for k, v in plan.env), cwd=plan.cwd.encode(), stdin=devnull,
                   stdout=devnull, stderr=devnull, init_fd=init_fd, status_fd=ctrl_fd, track_map_fd=track[0],
                   track_value=track[1], cgroup_fd=cgroup_fd)


def host_path(plan: SandboxPlan, policy: Policy, workdir: str, inside: str) -> str | None:
    """The host path the sandbox's view shows at `inside` (an absolute inside
    path), or None where the view shows none of the host (its own tmpfs: /tmp,
    HOME, the empty root). Without a new root the view is the host's."""
    if plan.new_root is None:
        return inside
    inside = os.path.normpath(inside)
    table = [(plan.workspace, workdir), *((b.target, b.source) for b in policy.fs.binds),
             *((p, p) for p in (*policy.fs.read_only, *policy.fs.read_write)), *((d, d) for d in DEVICES)]
    best: tuple[str, str] | None = None
    for at, src in table:
        if _beneath(inside, at) and (best is None or len(at) > len(best[0])):
            best = (at, src)
    if best is None:
        return None
    return best[1] + inside[len(best[0]):] if inside != best[0] else best[1]
