"""The contract between Python and the spawn path, as values. Pure: no I/O.

Two frozen values, packed into the two buffers that zviz/_stage_py.c parses
(layouts in zviz/_abi.h, mirrored here; tests/test_abi.py checks each struct
format against the extension's LAYOUTS):

- `StageSpec`: what every spawn of one sandbox does: namespaces and id maps,
  the new root, credentials, rlimits, Landlock, the seccomp program. Made
  by `_plan.stage_spec` from a `SandboxPlan` (once per policy: `_planmemo`);
  variants (the zygote's, the tracer's) with `attrs.evolve`. `pack()` is
  what the sandbox keeps and hands to every spawn; `pack_with_holes()` the
  same with chosen strings left to fill in per sandbox.
- `Command`: one spawn: what to exec, its argv and environment, its fds.
  Made by `_plan.command_spec` per spawn.

A failing setup step comes back as `_stage.SetupError(step, errno, index,
path)`; `index` points into the tables of the StageSpec (bind, mount op,
Landlock path, rlimit), and `_kernel.spawn` names the path from it.
"""

from __future__ import annotations

import struct

import attrs

from . import _abi

# struct spec_header: magic, flags, clone_flags, uid, gid, pdeathsig, landlock_abi,
# seccomp_flags, pad, ll_fs, ll_net, ll_scoped, staging, hostname, uid_map, gid_map,
# n_binds, n_ops, n_masks, n_rlimits, n_ll_paths, n_ll_ports, bpf_off, bpf_len
SPEC_HEADER = struct.Struct("=IIQqqiiIIQQQIIIIIIIIIIII")
SPEC_BIND = struct.Struct("=II")  # src, read_only
SPEC_OP = struct.Struct("=IIIi")  # kind, path, arg, bind
SPEC_MASK = struct.Struct("=II")  # kind, path
SPEC_RLIMIT = struct.Struct("=IIQQ")  # res, pad, soft, hard
SPEC_PATH = struct.Struct("=IIQ")  # path, pad, access
SPEC_PORT = struct.Struct("=QQ")  # port, access
# struct command_header: magic, n_argv, n_envp, fd_in, fd_out, fd_err, init_fd,
# status_fd, track_map_fd, track_value, cgroup_fd, netns_fd, exe, cwd
COMMAND_HEADER = struct.Struct("=IIIiiiiiiIiiII")


class _Strings:
    """The string area of a buffer: each string once, NUL-terminated, at an
    offset from the buffer's start (0 is never a string: the header is there)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.parts: list[bytes] = []
        self.size = 0
        self.seen: dict[bytes, int] = {}

    def add(self, s: bytes | str | None) -> int:
        if s is None:
            return 0
        b = s.encode() if isinstance(s, str) else s
        if b"\0" in b:
            raise ValueError(f"a string for the stage holds a NUL byte: {b[:60]!r}")
        off = self.seen.get(b)
        if off is None:
            off = self.seen[b] = self.base + self.size
            self.parts.append(b + b"\0")
            self.size += len(b) + 1
        return off


def _check(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise ValueError(f"{n} {what}: the stage takes at most {limit}")


@attrs.frozen(kw_only=True)
class StageSpec:
    """What every spawn of one sandbox does, in the child's order (zviz/_stage.c)."""

    clone_flags: int = 0
    uid_map: str | None = None
    gid_map: str | None = None
    deny_setgroups: bool = False
    drop_groups: bool = False
    uid: int = -1  # -1: keep
    gid: int = -1
    creds_late: bool = False  # root without a user namespace: credentials after the mounts
    mount_ns: bool = False
    mount_proc: bool = False
    staging: str | None = None  # a new root is assembled there (None: no new root)
    binds: tuple[tuple[str, bool], ...] = ()  # (host source, read-only)
    mount_ops: tuple[tuple[int, str, str, int], ...] = ()  # (OP_*, path, argument, bind index)
    masks: tuple[tuple[int, str], ...] = ()  # (MASK_*, absolute path in the new root), after pivot_root
    root_readonly: bool = False  # the root tmpfs is remounted read-only once assembled
    cgroup_ns: bool = False  # a cgroup namespace of its own, rooted at its cgroup (after joining it)
    loopback_up: bool = False
    # no network namespace of its own: the child starts in the blank one (zviz/_netns.py) that the
    # spawning process holds (Command.netns_fd); its sockets are made by the supervisor
    blank_netns: bool = False
    hostname: str | None = None
    setsid: bool = False
    pdeathsig: int = 0
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_* number, soft, hard)
    landlock_abi: int = 0  # 0: no Landlock
    ll_fs: int = 0
    ll_net: int = 0
    ll_scoped: int = 0
    ll_paths: tuple[tuple[str, int], ...] = ()
    ll_ports: tuple[tuple[int, int], ...] = ()
    command_ruleset: bool = False  # a zygote: leave the ruleset of the commands' own domains
    bpf: bytes = b""
    seccomp_flags: int = 0

    def pack(self) -> bytes:
        """The sandbox's buffer (zviz/_abi.h, "the sandbox's part")."""
        return self.pack_with_holes(()).fill(())

    def pack_with_holes(self, holes: tuple[str, ...]) -> Holey:
        """The buffer with the strings `holes` left to be filled in later
        (`Holey.fill`): each is put after every other string, in that order,
        and every field that points at one is noted. The rest of the buffer
        is the same whatever fills the holes (the per-policy memo,
        zviz/_planmemo.py, packs once and fills each sandbox's own workdir
        and id maps in)."""
        _check(len(self.binds), _abi.MAX_BINDS, "bind mounts")
        _check(len(self.mount_ops), _abi.MAX_MOUNT_OPS, "mount operations")
        _check(len(self.masks), _abi.MAX_MASKS, "masks")
        _check(len(self.rlimits), _abi.MAX_RLIMITS, "rlimits")
        _check(len(self.ll_paths), _abi.MAX_LL_PATHS, "Landlock path rules")
        _check(len(self.ll_ports), _abi.MAX_LL_PORTS, "Landlock port rules")
        if len(self.bpf) % 8:
            raise ValueError("a seccomp program is a whole number of 8-byte instructions")
        tables = (SPEC_HEADER.size + SPEC_BIND.size * len(self.binds) + SPEC_OP.size * len(self.mount_ops)
                  + SPEC_MASK.size * len(self.masks) + SPEC_RLIMIT.size * len(self.rlimits)
                  + SPEC_PATH.size * len(self.ll_paths) + SPEC_PORT.size * len(self.ll_ports))
        bpf_off = (tables + 7) & ~7
        strings = _Strings(bpf_off + len(self.bpf))
        hole_index = {h: i for i, h in enumerate(holes)}
        relocations: list[tuple[int, int]] = []  # (where in the buffer, which hole)

        def ref(s: str | None, at: int) -> int:
            i = hole_index.get(s) if s is not None else None
            if i is None:
                return strings.add(s)
            relocations.append((at, i))
            return 0

        body = bytearray()
        at = SPEC_HEADER.size
        for src, ro in self.binds:
            body += SPEC_BIND.pack(ref(src, at), ro)
            at += SPEC_BIND.size
        for kind, path, arg, bind in self.mount_ops:
            body += SPEC_OP.pack(kind, ref(path, at + 4), ref(arg, at + 8), bind)
            at += SPEC_OP.size
        for kind, path in self.masks:
            body += SPEC_MASK.pack(kind, ref(path, at + 4))
            at += SPEC_MASK.size
        for res, soft, hard in self.rlimits:
            body += SPEC_RLIMIT.pack(res, 0, soft, hard)
            at += SPEC_RLIMIT.size
        for path, access in self.ll_paths:
            body += SPEC_PATH.pack(ref(path, at), 0, access)
            at += SPEC_PATH.size
        for port, access in self.ll_ports:
            body += SPEC_PORT.pack(port, access)
        flags = ((_abi.SPEC_MOUNT_NS if self.mount_ns else 0) | (_abi.SPEC_MOUNT_PROC if self.mount_proc else 0)
                 | (_abi.SPEC_NEW_ROOT if self.staging is not None else 0)
                 | (_abi.SPEC_LOOPBACK_UP if self.loopback_up else 0) | (_abi.SPEC_SETSID if self.setsid else 0)
                 | (_abi.SPEC_CREDS_LATE if self.creds_late else 0)
                 | (_abi.SPEC_DROP_GROUPS if self.drop_groups else 0)
                 | (_abi.SPEC_DENY_SETGROUPS if self.deny_setgroups else 0)
                 | (_abi.SPEC_COMMAND_RULESET if self.command_ruleset else 0)
                 | (_abi.SPEC_ROOT_READONLY if self.root_readonly else 0)
                 | (_abi.SPEC_CGROUP_NS if self.cgroup_ns else 0)
                 | (_abi.SPEC_BLANK_NETNS if self.blank_netns else 0))
        header = SPEC_HEADER.pack(
            _abi.SPEC_MAGIC, flags, self.clone_flags, self.uid, self.gid, self.pdeathsig, self.landlock_abi,
            self.seccomp_flags, 0, self.ll_fs, self.ll_net, self.ll_scoped, ref(self.staging, _AT_STAGING),
            ref(self.hostname, _AT_STAGING + 4), ref(self.uid_map, _AT_STAGING + 8),
            ref(self.gid_map, _AT_STAGING + 12), len(self.binds),
            len(self.mount_ops), len(self.masks), len(self.rlimits), len(self.ll_paths), len(self.ll_ports), bpf_off,
            len(self.bpf))
        prefix = b"".join((header, body, b"\0" * (bpf_off - tables), self.bpf, *strings.parts))
        return Holey(prefix, tuple(relocations), len(holes))


# where the header's string fields start (staging, hostname, uid_map, gid_map: 4 bytes each)
_AT_STAGING = struct.calcsize("=IIQqqiiIIQQQ")
_U32 = struct.Struct("=I")


@attrs.frozen
class Holey:
    """A packed StageSpec whose hole strings are still to be filled in."""

    prefix: bytes  # everything up to the holes' strings, which come last
    relocations: tuple[tuple[int, int], ...]  # (where a field points at hole i, i)
    holes: int

    def fill(self, values: tuple[str, ...]) -> bytes:
        """The buffer with `values` in the holes, in order."""
        if len(values) != self.holes:
            raise ValueError(f"{len(values)} strings for {self.holes} holes")
        if not self.holes:
            return self.prefix
        buf = bytearray(self.prefix)
        offsets = []
        for v in values:
            b = v.encode()
            if b"\0" in b:
                raise ValueError(f"a string for the stage holds a NUL byte: {b[:60]!r}")
            offsets.append(len(buf))
            buf += b + b"\0"
        for at, i in self.relocations:
            _U32.pack_into(buf, at, offsets[i])
        return bytes(buf)


@attrs.frozen(kw_only=True)
class Command:
    """One spawn: exec `exe` (or zviz-init by `init_fd`, which then runs
    argv[2] with argv[3:]) with `argv` and `envp`, on these fds."""

    exe: bytes
    argv: tuple[bytes, ...]
    envp: tuple[bytes, ...]
    cwd: bytes | None
    stdin: int
    stdout: int
    stderr: int
    init_fd: int = -1  # -1: exec exe directly
    status_fd: int = -1  # placed on STATUS_FD (-1: closed)
    track_map_fd: int = -1  # the eBPF monitor's map of tracked pids (-1: none)
    track_value: int = 0
    cgroup_fd: int = -1  # the sandbox's memory cgroup's cgroup.procs: the parent puts the child there (-1: none)
    netns_fd: int = -1  # the blank network namespace (StageSpec.blank_netns): the parent enters it around clone

    def pack(self) -> bytes:
        """The spawn's buffer (zviz/_abi.h, "the command's part")."""
        if not self.argv:
            raise ValueError("a command needs a non-empty argv")
        # on every spawn's path: plain offsets, no deduplication
        strs = (*self.argv, *self.envp, self.exe) + (() if self.cwd is None else (self.cwd,))
        n = len(self.argv) + len(self.envp)
        blob = b"\0".join(strs) + b"\0"
        if blob.count(b"\0") != len(strs):
            raise ValueError("a string for the stage holds a NUL byte")
        offs, pos = [], COMMAND_HEADER.size + 4 * n
        for st in strs:
            offs.append(pos)
            pos += len(st) + 1
        header = COMMAND_HEADER.pack(
            _abi.COMMAND_MAGIC, len(self.argv), len(self.envp), self.stdin, self.stdout, self.stderr, self.init_fd,
            self.status_fd, self.track_map_fd, self.track_value, self.cgroup_fd, self.netns_fd, offs[n],
            offs[n + 1] if self.cwd is not None else 0)
        return header + struct.pack(f"={n}I", *offs[:n]) + blob
