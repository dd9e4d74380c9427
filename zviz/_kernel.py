"""The kernel shim: the only module that touches raw fds, ioctls and the C stage.

Everything here returns owning objects (`OwnedFd`), never bare ints that could
leak. The seccomp user-notification structures are packed and unpacked here
(x86_64 layout, checked against SECCOMP_GET_NOTIF_SIZES at import of the
supervisor).

Why this module is long: it is every call into the kernel that the os module
does not offer (ctypes, ioctls, the C stage), kept in one place on purpose so
that raw fds have one owner: pidfds, seccomp notifications, openat2,
per-thread filesystem ids and kills by uid all live here for that reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import attrs
import sniffio

from . import _linux, _netns, _stage
from ._errors import SandboxSetupError
from ._plan import RLIMIT
from ._spec import Command, StageSpec

# ---------------------------------------------------------------- owning fds


class OwnedFd:
    """An fd with exactly one owner. `close()` is idempotent; `detach()` hands
    the number over to a new owner."""

    __slots__ = ("_fd", "label")

    def __init__(self, fd: int, label: str) -> None:
        self._fd = fd
        self.label = label

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.label} fd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        fd, self._fd = self._fd, -1
        return fd

    def __repr__(self) -> str:
        return f"<OwnedFd {self.label} {self._fd if self._fd >= 0 else 'closed'}>"

    def __del__(self) -> None:  # last resort; owners close explicitly
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass


def notify_closing(fd: int) -> None:
    """`anyio.notify_closing(fd)` (a task waiting on `fd` wakes up) when an
    event loop runs in this thread; with none (a teardown after the loop has
    gone) there is no waiter to wake."""
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return
    anyio.notify_closing(fd)


def pipe(label: str) -> tuple[OwnedFd, OwnedFd]:
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except OSError as e:
        raise host_fd_shortage(label, e) from None
    return OwnedFd(r, label + "-r"), OwnedFd(w, label + "-w")


def dup_above_stdio(fd: int, label: str) -> OwnedFd:
    """A close-on-exec copy numbered > 2, so the child's dup2 onto 0..2 never
    clobbers an fd it still needs."""
    return OwnedFd(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), label)


def open_devnull() -> OwnedFd:
    try:
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise host_fd_shortage("devnull", e) from None
    owned = dup_above_stdio(fd, "devnull")
    os.close(fd)
    return owned


# ---------------------------------------------------------------- spawn

# The stage's step names, indexed by step number (zviz/_abi.h ZVIZ_STEPS).
STEPS: tuple[str | None, ...] = _stage.STEPS

HINTS = {
    "mount-proc": "the host's /proc has over-mounts (a container?); set namespaces.pid = false",
    "mount-bind": "a policy path cannot be bind-mounted (does it exist? ELOOP: a symlink appeared in it after "
                  "open_sandbox checked it, and zviz binds only the checked path)",
    "landlock-open": "a policy path does not exist or cannot be opened",
    "execve": "zviz-init could not be executed (is the package built? `zviz check`)",
    "rlimit": "a limit is above the hard limit of the calling process",
}

from ._linux import (  # noqa: E402  (re-exported for the shell)
    CLONE_NEWCGROUP as CLONE_NEWCGROUP,
    CLONE_NEWIPC as CLONE_NEWIPC,
    CLONE_NEWNET as CLONE_NEWNET,
    CLONE_NEWNS as CLONE_NEWNS,
    CLONE_NEWPID as CLONE_NEWPID,
    CLONE_NEWUSER as CLONE_NEWUSER,
    CLONE_NEWUTS as CLONE_NEWUTS,
    STATUS_FD as STATUS_FD,
)

INIT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zviz_init")
# struct status_record (zviz/_abi.h): magic, wstatus, struct rusage
_STATUS = struct.Struct("=Ii" + "qq" "qq" + "14q")
STATUS_MAGIC: int = _stage.STATUS_MAGIC


_init_fd: OwnedFd | None = None


def init_fd() -> OwnedFd:
    """An O_PATH fd of zviz-init: the stage execs it by fd, so it runs even
    where its directory is hidden, outside the policy's paths, or unreachable
    after the caller dropped privileges. One per process, opened on first use
    and kept (like a loaded library), never one per sandbox."""
    global _init_fd  # noqa: PLW0603 - one per process, like a loaded library
    if _init_fd is not None:
        return _init_fd
    try:
        _init_fd = OwnedFd(os.open(INIT_PATH, os.O_PATH | os.O_CLOEXEC), "zviz-init")
        return _init_fd
    except FileNotFoundError:
        from ._errors import FeatureUnavailable

        raise FeatureUnavailable(
            "zviz-init", f"{INIT_PATH} is missing (the package was not built)",
            "reinstall zviz with a C compiler available: pip install -e . (or pip install zviz)") from None


@attrs.frozen
class InitStatus:
    wstatus: int
    utime: float
    stime: float
    maxrss_kb: int


def read_init_status(fd: OwnedFd) -> InitStatus | None:
    """The main program's wait status and usage, as zviz-init reported it
    (None if init was killed before it could)."""
    try:
        data = os.read(fd.fd, _STATUS.size)
    except (BlockingIOError, OSError):
        return None
    if len(data) != _STATUS.size:
        return None
    magic, ws, us, uus, ss, sus, maxrss, *_ = _STATUS.unpack(data)
    if magic != STATUS_MAGIC:
        return None
    return InitStatus(wstatus=ws, utime=us + uus / 1e6, stime=ss + sus / 1e6, maxrss_kb=maxrss)


@attrs.frozen
class Spawned:
    pid: int
    pidfd: OwnedFd
    listener: OwnedFd | None
    ns_pid: int = -1  # a zygote's run: its run-init's pid inside the sandbox


def spawn(stage: StageSpec, packed: bytes, command: Command) -> Spawned:
    """Run the C stage: `packed` is `stage.pack()` (made once per sandbox).
    Turns its failure reports into SandboxSetupError, naming the path. Blocks
    until the child has exec'd: an event loop's code spawns with `start_spawn`."""
    if stage.blank_netns:
        command = with_blank_netns(command)
    with _stage_errors(stage, command):
        pid, pidfd, listener = _stage.spawn(packed, command.pack())
    return _spawned(pid, pidfd, listener)


class PendingSpawn:
    """A stage child between its clone and its exec (`start_spawn`). It sets
    itself up (namespaces, root, filters: ~1.2 ms) while the caller's thread
    goes on; `await wait()` gives it as `spawn` would, and a wait that ends
    any other way (cancelled) kills and reaps it. `kill()` may come meanwhile
    (a teardown): the wait then sees it dead."""

    __slots__ = ("_command", "_pending", "_stage")

    def __init__(self, pending: _stage.PendingSpawn, stage: StageSpec, command: Command) -> None:
        self._pending, self._stage, self._command = pending, stage, command

    def kill(self) -> None:
        # by its pidfd: something else may have reaped it (a host's waitpid(-1)), its number another's now
        _stage.pending_kill(self._pending)

    def abort(self) -> None:
        """SIGKILL and reap it now (idempotent): a spawn nobody will wait for."""
        _stage.spawn_abort(self._pending)

    async def wait(self) -> Spawned:
        fd, _pid = _stage.pending_info(self._pending)
        try:
            await anyio.wait_readable(fd)  # EOF at its exec, or its failed step's record
        except BaseException:
            _stage.spawn_abort(self._pending)
            raise
        with _stage_errors(self._stage, self._command):
            pid, pidfd, listener = _stage.spawn_finish(self._pending)
        return _spawned(pid, pidfd, listener)


def start_spawn(stage: StageSpec, packed: bytes, command: Command) -> PendingSpawn:
    """`spawn` in two halves: the clone and the child let go now (~0.25 ms),
    the rest by `await .wait()`. Raises as `spawn` does for what fails before."""
    if stage.blank_netns:
        command = with_blank_netns(command)
    with _stage_errors(stage, command):
        pending = _stage.spawn_start(packed, command.pack())
    return PendingSpawn(pending, stage, command)


@contextlib.contextmanager
def _stage_errors(stage: StageSpec, command: Command) -> Iterator[None]:
    try:
        yield
    except _stage.SetupError as e:
        raise setup_failure(stage, command, e.args) from None
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise host_fd_shortage("spawn", e) from None
        raise


def _spawned(pid: int, pidfd: int, listener: int) -> Spawned:
    return Spawned(
        pid=pid,
        pidfd=OwnedFd(pidfd, f"pidfd-{pid}"),
        listener=OwnedFd(listener, f"listener-{pid}") if listener >= 0 else None,
    )


def with_blank_netns(command: Command, slot: int | None = None) -> Command:
    """`command` with this process's blank network namespace (zviz/_netns.py)
    as its netns_fd (or `slot`: the number it gets in a warm server)."""
    fd = _netns.blank_fd()
    if fd is None:  # (planned with it: this process could make one then)
        raise SandboxSetupError("blank-netns", errno.EPERM, None,
                                "this process can no longer make or enter network namespaces (did it drop "
                                "root?): open the sandbox again")
    return attrs.evolve(command, netns_fd=fd if slot is None else slot)


def stage_path() -> str:
    """The C stage's file: a warm snippet's fork server (_warmboot.py) loads it too."""
    return _stage.__file__ or ""


def setup_failure(stage: StageSpec, command: Command, args: tuple[Any, ...]) -> SandboxSetupError:
    """The error for a stage's SetupError `args` (step, errno, index, path),
    naming the path the failed step worked on and what to do."""
    step, err, index, path = args
    if step.startswith("id-map-"):  # written by the parent
        hint = ""
        if err == errno.EACCES and _not_dumpable():
            hint = ("this process changed its uid without exec, so it is not dumpable and may "
                    "not write its children's id maps: exec after setuid, or call "
                    "prctl(PR_SET_DUMPABLE, 1)")
        return SandboxSetupError(step, err, path, hint)
    if step == "cgroup":
        return SandboxSetupError("cgroup", err, path, "the sandbox could not join its memory cgroup (ENODEV: it was "
                                 "removed meanwhile); nothing ran. To run without one, set limits.memory=None")
    if step == "spawn":
        return SandboxSetupError("spawn", err, None, path or "")
    return SandboxSetupError(step, err, _step_path(stage, command, step, index), HINTS.get(step, ""))


_RLIMIT_NAMES = {num: name for name, num in RLIMIT.items()}


def _step_path(stage: StageSpec, command: Command, step: str, index: int) -> str | None:
    """What the failed step was working on: its `index` points into the spec's tables."""
    def at(table: tuple[Any, ...], i: int) -> Any:
        return table[i] if 0 <= i < len(table) else None

    if step in ("landlock-open", "landlock-rule"):
        rule = at(stage.ll_paths, index)
        return rule[0] if rule else None
    if step == "mount-bind":
        bind = at(stage.binds, index)
        return bind[0] if bind else None
    if step == "mount-mask":
        mask = at(stage.masks, index)
        return mask[1] if mask else None
    if step in ("mount-op", "mount-proc"):
        op = at(stage.mount_ops, index)
        return "/" + op[1] if op else None
    if step == "rlimit":
        rl = at(stage.rlimits, index)
        return _RLIMIT_NAMES.get(rl[0], str(rl[0])) if rl else None
    if step == "execve":
        return command.exe.decode(errors="replace")
    if step == "chdir":
        return command.cwd.decode(errors="replace") if command.cwd else None
    return None


def _not_dumpable() -> bool:
    import ctypes

    PR_GET_DUMPABLE = 3
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
    except OSError:
        return False


def pidfd_kill(pidfd: OwnedFd, sig: int = signal.SIGKILL) -> None:
    if pidfd.closed:
        return
    try:
        signal.pidfd_send_signal(pidfd.fd, sig)
    except ProcessLookupError:
        pass


def pidfd_exited(pidfd: OwnedFd) -> bool:
    """Has the process behind `pidfd` exited? (A poll with no timeout.)"""
    p = select.poll()
    p.register(pidfd.fd, select.POLLIN)
    return bool(p.poll(0))


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()  # field 3 (state) onwards


def child_pidfd(parent: int, parent_pidfd: OwnedFd, wait_s: float = 0.0) -> tuple[OwnedFd, int] | None:
    """A pidfd of the first-started child of `parent` (a zviz-init: its child is
    the program; later children are orphans of the run it adopted) and that
    child's pid in its own (innermost) pid namespace; None if it has none
    (after up to `wait_s` of looking again while `parent` lives: a zviz-init
    forks its program ~0.1-0.3 ms after the host has its pidfd).

    Race-free against pid reuse: the child's pidfd is opened first, then its
    /proc entry read, then both it and its parent checked alive: a process
    alive before and after the read was the one /proc showed, and its parent
    (whose pidfd we hold) cannot have been replaced while alive."""
    deadline = time.monotonic() + wait_s
    while True:
        found = _child_pidfd(parent, parent_pidfd)
        if found is not None or time.monotonic() >= deadline or pidfd_exited(parent_pidfd):
            return found
        time.sleep(0.0002)  # (a bounded wait, on the loop's thread: only in this race, and ~0.3 ms)


def _child_pidfd(parent: int, parent_pidfd: OwnedFd) -> tuple[OwnedFd, int] | None:
    if parent <= 0:
        return None
    try:
        with open(f"/proc/{parent}/task/{parent}/children", "rb") as f:
            kids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None
    ranked = []
    for kid in kids:
        fields = _stat_fields(kid)
        if fields is not None and len(fields) > 19:
            ranked.append((int(fields[19]), kid))  # starttime (field 22), then pid
    for _start, kid in sorted(ranked):
        try:
            fd = OwnedFd(os.pidfd_open(kid), "program-pidfd")
        except OSError:
            continue
        try:
            fields = _stat_fields(kid)
            nspid = None
            with open(f"/proc/{kid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:"):
                        nspid = int(line.split()[-1])
            alive = not pidfd_exited(fd) and not pidfd_exited(parent_pidfd)
            if alive and fields is not None and int(fields[1]) == parent and nspid is not None:
                return fd, nspid
        except (OSError, ValueError):
            pass
        fd.close()
        return None
    return None


def pidfd_getfd(pidfd: OwnedFd, target_fd: int) -> OwnedFd:
    return OwnedFd(_stage.pidfd_getfd(pidfd.fd, target_fd), f"taken-{target_fd}")


def landlock_abi() -> int:
    """Landlock ABI version, or -errno (EOPNOTSUPP: disabled; ENOSYS: not built)."""
    return _stage.landlock_abi()


def seccomp_notif_sizes() -> tuple[int, int, int]:
    return _stage.notif_sizes()


def seccomp_action_avail(action: int) -> bool:
    return _stage.seccomp_action_avail(action)


# ---------------------------------------------------------------- seccomp user notification

SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2

_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]: 80 bytes
_RESP = struct.Struct("=QqiI")  # id, val, error, flags: 24 bytes
_ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags: 24 bytes
_U64 = struct.Struct("=Q")


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (ord("!") << 8) | nr


IOCTL_NOTIF_RECV = _iowr(0, _NOTIF.size)
IOCTL_NOTIF_SEND = _iowr(1, _RESP.size)
IOCTL_NOTIF_ID_VALID = _iow(2, 8)
IOCTL_NOTIF_ADDFD = _iow(3, _ADDFD.size)
IOCTL_NOTIF_SET_FLAGS = _iow(4, 8)


@attrs.frozen
class Notification:
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


def notif_recv(listener: OwnedFd) -> Notification | None:
    """One notification, or None if it vanished (the task died: ENOENT)."""
    buf = bytearray(_NOTIF.size)  # zeroed every time: the kernel insists (EINVAL otherwise)
    try:
        fcntl.ioctl(listener.fd, IOCTL_NOTIF_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(id=nid, pid=pid, nr=nr, arch=arch, args=tuple(args))


def notif_decode(buf: bytes) -> Notification:
    """Decode a raw record (used by the fuzz tests of the decoder)."""
    if len(buf) != _NOTIF.size:
        raise ValueError(f"a seccomp_notif record is {_NOTIF.size} bytes, got {len(buf)}")
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(id=nid, pid=pid, nr=nr, arch=arch, args=tuple(args))


def _respond(listener: OwnedFd, nid: int, val: int, error: int, flags: int) -> bool:
    buf = bytearray(_RESP.pack(nid, val, -error if error else 0, flags))
    try:
        fcntl.ioctl(listener.fd, IOCTL_NOTIF_SEND, buf, True)
    except OSError as e:
        if e.errno == errno.ENOENT:  # the target died or was interrupted
            return False
        raise
    return True


def notif_send(listener: OwnedFd, nid: int, *, val: int = 0, error: int = 0) -> bool:
    """Answer a notification: `error` is a positive errno (sent negated).
    False when the target is gone or was interrupted (ENOENT)."""
    return _respond(listener, nid, val, error, 0)


def notif_continue_learning(listener: OwnedFd, nid: int) -> bool:
    """Let the call run (SECCOMP_USER_NOTIF_FLAG_CONTINUE). Only `zviz trace`'s
    learning mode uses this, and that mode is not a security boundary: a
    decision never depends on what was read from the child's memory there; it
    only records it. The enforcing supervisor has no way to send it."""
    return _respond(listener, nid, 0, 0, 1)


def notif_id_valid(listener: OwnedFd, nid: int) -> bool:
    try:
        fcntl.ioctl(listener.fd, IOCTL_NOTIF_ID_VALID, bytearray(_U64.pack(nid)), True)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def notif_set_sync_wakeup(listener: OwnedFd) -> bool:
    """SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (6.6+): wake the supervisor on the
    same CPU; False where the kernel lacks it."""
    try:
        fcntl.ioctl(listener.fd, IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTTY):
            return False
        raise
    return True


def notif_addfd(listener: OwnedFd, nid: int, src: int, target_fd: int, *, cloexec: bool) -> bool:
    """Install `src` in the notifying task's fd table as number `target_fd`
    (SECCOMP_ADDFD_FLAG_SETFD: an open `target_fd` is closed and replaced
    atomically, as dup2 would). The task does the install itself when it
    wakes, still inside the notified call, which stays blocked until we
    answer it. False when the task is gone or was interrupted (ENOENT)."""
    buf = bytearray(_ADDFD.pack(nid, SECCOMP_ADDFD_FLAG_SETFD, src, target_fd, os.O_CLOEXEC if cloexec else 0))
    try:
        fcntl.ioctl(listener.fd, IOCTL_NOTIF_ADDFD, buf, True)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def notif_addfd_new(listener: OwnedFd, nid: int, src: int, *, cloexec: bool) -> int | None:
    """Install `src` as the lowest free fd of the notifying task; its number,
    or None when the task is gone or was interrupted (ENOENT). Its own limits
    (EMFILE) raise OSError."""
    buf = bytearray(_ADDFD.pack(nid, 0, src, 0, os.O_CLOEXEC if cloexec else 0))
    try:
        return int(fcntl.ioctl(listener.fd, IOCTL_NOTIF_ADDFD, buf, True))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


PIDFD_THREAD = os.O_EXCL  # linux 6.9+: a pidfd for one thread (readable when that thread exits)


def pidfd_open_task(tid: int) -> OwnedFd:
    """A pidfd for the notifying task: a thread pidfd where the kernel has
    them (any thread can notify; its pidfd turns readable when it exits),
    else the process's (only a thread-group leader has one)."""
    try:
        return OwnedFd(os.pidfd_open(tid, PIDFD_THREAD), f"pidfd-task-{tid}")
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return OwnedFd(os.pidfd_open(tid), f"pidfd-task-{tid}")


def fd_cloexec(tid: int, fd: int) -> bool:
    """Whether `fd` of task `tid` is close-on-exec (its fdinfo `flags:` are octal)."""
    with open(f"/proc/{tid}/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    return False


def host_fd_shortage(step: str, err: OSError) -> OSError:
    """An EMFILE/ENFILE met on the host side, as `ResourceExhausted` that names
    the limit and the fix; any other error unchanged."""
    from ._errors import ResourceExhausted

    if err.errno == errno.EMFILE:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return ResourceExhausted(step, errno.EMFILE, None,
                                 limit=f"file descriptors of this process (RLIMIT_NOFILE soft limit {soft}, "
                                 f"hard {hard})",
                                 fix="raise it (`ulimit -n`, resource.setrlimit) or run fewer sandboxes or "
                                 "connections at once (ZVIZ_MAX_SANDBOXES)")
    if err.errno == errno.ENFILE:
        return ResourceExhausted(step, errno.ENFILE, None)
    return err


def read_child_memory(pid: int, addr: int, size: int) -> bytes:
    """Read from the sandboxed task's memory (for decoding and deciding only;
    anything read here may change before the task resumes, so a decision based
    on it is never answered with CONTINUE)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)


def read_child_string(pid: int, addr: int, limit: int = 4096) -> str | None:
    if addr == 0:
        return None
    try:
        data = read_child_memory(pid, addr, limit)
    except (OSError, ValueError, OverflowError):
        return None
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


# ---------------------------------------------------------------- host mounts (fs.disk)

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8


def _libc() -> Any:  # a ctypes.CDLL: its functions are looked up by name
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(path: str, options: str) -> None:
    """mount -t tmpfs -o OPTIONS zviz PATH (nosuid, nodev), in this process's
    mount namespace. Root only."""
    import ctypes

    if _libc().mount(b"zviz", os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
        err = ctypes.get_errno()
        raise SandboxSetupError("mount-disk", err, path, "fs.disk needs root (a tmpfs is mounted on the workdir)")


def mount_template(lower: str, upper: str, work: str, target: str, owner: tuple[int, int],
                   ids: tuple[int, int]) -> tuple[int, int, bytes | None]:
    """A template's overlay on `target` (zviz/_snapshot.py; the C stage's
    stage_mount_template): (-1, 0, helper) or (failing step, errno, None).
    The helper goes to `reap_template_helper`, exactly once."""
    return _stage.mount_template(os.fsencode(lower), os.fsencode(upper), os.fsencode(work), os.fsencode(target),
                                 owner[0], owner[1], ids[0], ids[1])


def reap_template_helper(helper: bytes) -> None:
    _stage.reap_template_helper(helper)


FICLONE = 0x40049409


def ficlone(dst: int, src: int) -> None:
    """Make `dst` share `src`'s data (a reflink); OSError where the
    filesystem has none (EOPNOTSUPP, EXDEV, EINVAL)."""
    import fcntl

    fcntl.ioctl(dst, FICLONE, src)


def umount_detach(path: str) -> None:
    """Lazily unmount PATH, never following a symlink there. Errors are
    ignored: teardown must not raise."""
    _libc().umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW)


# ---------------------------------------------------------------- resolving paths in a sandbox's view

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
_NR_OPENAT2 = 437
_open_how = struct.Struct("=QQQ")
_libc_obj: Any = None


def _c() -> Any:
    global _libc_obj  # noqa: PLW0603 - loaded once, on first use
    if _libc_obj is None:
        import ctypes

        _libc_obj = ctypes.CDLL(None, use_errno=True)
        _libc_obj.syscall.restype = ctypes.c_long
    return _libc_obj


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int, label: str) -> OwnedFd:
    """openat2(2): open `path` relative to `dirfd` under the `resolve` rules
    (RESOLVE_IN_ROOT: `dirfd` is the root for `/`, `..` and absolute symlinks).
    Raises OSError with `path` as its filename."""
    import ctypes

    libc = _c()
    how = ctypes.create_string_buffer(_open_how.pack(flags | os.O_CLOEXEC, mode, resolve), _open_how.size)
    while True:
        fd = libc.syscall(ctypes.c_long(_NR_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                          how, ctypes.c_size_t(_open_how.size))
        if fd >= 0:
            return OwnedFd(fd, label)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):  # EAGAIN: a rename raced the lookup (RESOLVE_IN_ROOT)
            raise OSError(err, os.strerror(err), path)


def mount_id(fd: int) -> int:
    """The id of the mount `fd` is on (its fdinfo's mnt_id)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOENT, "no mnt_id in fdinfo", f"/proc/self/fdinfo/{fd}")


def reopen(fd: OwnedFd, flags: int, label: str) -> OwnedFd:
    """Open the inode an O_PATH fd holds, with `flags` (permission checked
    again with the calling thread's credentials)."""
    return OwnedFd(os.open(f"/proc/self/fd/{fd.fd}", flags | os.O_CLOEXEC), label)


class ThreadFsIds:
    """Within a `with` block, the calling thread's filesystem uid and gid are
    `uid`/`gid` (setfsuid/setfsgid are per thread): files are created as them
    and permissions checked as them; a root thread drops its file capabilities
    meanwhile. For a worker thread only: restored on exit."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self._old: tuple[int, int] | None = None

    def __enter__(self) -> ThreadFsIds:
        libc = _c()
        if self.uid != os.geteuid() or self.gid != os.getegid():
            old_gid = libc.setfsgid(self.gid)
            old_uid = libc.setfsuid(self.uid)
            self._old = (old_uid, old_gid)
            if libc.setfsuid(self.uid) != self.uid or libc.setfsgid(self.gid) != self.gid:
                self.__exit__()
                raise OSError(errno.EPERM, "setfsuid failed")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            libc = _c()
            libc.setfsuid(self._old[0])
            libc.setfsgid(self._old[1])
            self._old = None


# ---------------------------------------------------------------- by uid


def kill_uid(uid: int, gid: int) -> bool:
    """SIGKILL every process whose real or saved uid is `uid` (a sandbox's own
    host uid: nothing else runs as it). One pass suffices: see _stage.c.
    Returns whether anything was signalled."""
    if uid < 65536 or gid < 65536:
        # zviz's own ids live far above every system and login id (_ids.py):
        # never kill(-1) as anything else, whatever a lease file says
        raise ValueError(f"kill_uid: refusing uid {uid}/gid {gid}, outside zviz's range")
    return bool(_stage.kill_uid(uid, gid))


# ---------------------------------------------------------------- sockets in a sandbox's network namespace

IFF_UP = 0x1
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914


_CAN_ENTER_NETNS: dict[tuple[int, str], bool] = {}


def can_enter_netns() -> bool:
    """Whether this process may setns into a network namespace (CAP_SYS_ADMIN,
    and no seccomp filter of its own refusing setns, as a container's may):
    tried on a thread of its own, into its own namespace, once per set of
    credentials (a process that drops its privileges is asked again)."""

    try:
        with open("/proc/self/status", "rb") as f:
            caps = next((ln.split()[1].decode() for ln in f if ln.startswith(b"CapEff:")), "")
    except OSError:
        caps = ""
    key = (os.geteuid(), caps)
    known = _CAN_ENTER_NETNS.get(key)
    if known is not None:
        return known
    ok: list[bool] = []

    def probe() -> None:
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            ok.append(False)
            return
        try:
            ok.append(_c().setns(fd, _linux.CLONE_NEWNET) == 0)
        finally:
            os.close(fd)

    t = threading.Thread(target=probe, name="zviz-netns-probe")
    t.start()
    t.join()
    _CAN_ENTER_NETNS[key] = bool(ok and ok[0])
    return _CAN_ENTER_NETNS[key]


def sockets_in_netns(pidfd: OwnedFd, make: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    """`make()`'s sockets, created inside the network namespace of the process
    behind `pidfd` (its loopback brought up first). A socket belongs for good
    to the namespace it was created in, whoever holds it later. setns is per
    thread: the work runs on a thread of its own that ends with it, so no
    thread of this process is ever left in the sandbox's namespace. Needs
    CAP_SYS_ADMIN here and over the namespace (`can_enter_netns`)."""
    import ctypes

    out: list[socket.socket] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            ours = os.stat("/proc/thread-self/ns/net")
            if _c().setns(pidfd.fd, _linux.CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into the sandbox's network namespace: {os.strerror(err)}")
            theirs = os.stat("/proc/thread-self/ns/net")
            if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):  # never a socket on the host's network
                raise OSError(errno.EINVAL, "the sandbox has no network namespace of its own")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                req = struct.pack("16sH14x", b"lo", 0)
                flags = struct.unpack_from("16sH", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
                if not flags & IFF_UP:
                    fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
            out.extend(make())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failure.append(e)

    t = threading.Thread(target=work, name="zviz-netns")
    t.start()
    t.join()
    if failure:
        for s in out:
            s.close()
        raise failure[0]
    return out


# ---------------------------------------------------------------- closing off the caller's path

_closer_queue: queue.SimpleQueue[int | threading.Event] | None = None


def _forget_closer() -> None:
    global _closer_queue  # noqa: PLW0603 - a forked child has no closer thread
    _closer_queue = None


os.register_at_fork(after_in_child=_forget_closer)


def close_later(fd: int | OwnedFd) -> None:
    """Close `fd` on zviz's closer thread (one per process, started on first
    use; in order): for the last reference to something whose release the
    kernel does synchronously in the closing thread, waiting for an RCU grace
    period (a detached overlay: zviz/_disk.py; a dead sandbox's mount
    namespace, 0.3 ms and more: zviz/_runner.py). Nothing may be read through
    `fd` after this. If the process exits first, the kernel closes it."""
    global _closer_queue  # noqa: PLW0603 - one per process, started on first use
    n = fd.detach() if isinstance(fd, OwnedFd) else fd
    if n < 0:
        return
    if _closer_queue is None:
        q: queue.SimpleQueue[int | threading.Event] = queue.SimpleQueue()

        def run() -> None:
            while True:
                item = q.get()
                if isinstance(item, threading.Event):
                    item.set()
                else:
                    with contextlib.suppress(OSError):
                        os.close(item)

        threading.Thread(target=run, name="zviz-closer", daemon=True).start()
        _closer_queue = q
    _closer_queue.put(n)


def closes_marker() -> threading.Event | None:
    """An event set once every fd handed to `close_later` so far is closed
    (None: there is no closer thread, nothing pending)."""
    if _closer_queue is None:
        return None
    done = threading.Event()
    _closer_queue.put(done)
    return done


def settle_closes(timeout: float = 10.0) -> bool:
    """Wait until every fd handed to `close_later` so far is closed (tests)."""
    done = closes_marker()
    return True if done is None else done.wait(timeout)
