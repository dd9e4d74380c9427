"""Workdirs on the host: where they live, who owns them, and how they go.

Layout: one private parent per caller, one workdir per sandbox, and one owner
marker per host process, out of the sandbox's reach:

    $TMPDIR/zviz-<caller uid>/          0700, the caller's
        .owner-<pid>.<start time>       the host process's marker, flock'ed while it lives
        sb-<pid>.<start time>-<random>  a workdir, named after its owner (root: owned by
                                        the sandbox's own uid)
        .sb-...kept / .sb-...abandoned  rare marks: kept for the caller; its removal failed

A root caller's sandbox that must walk to its workdir by path (no mount
namespace, or a listed path holding the parent: the whole host for `zviz
trace`) cannot pass a 0700 root directory. Its workdir goes one level
deeper, behind a gate only its own gid may pass:

    $TMPDIR/zviz-0-walk/                0711 (traverse, never list)
        .owner-<pid>.<start time>
        sb-<pid>.<start time>-<random>/ 0710 root:<sandbox gid> (+ kept/abandoned marks)
            work/                       the workdir

Invariants:
- No other host user can reach a workdir, so a set-id file the sandbox makes
  there is unreachable by others, whatever mode it gives the workdir.
- The sandbox never sees the parent or the markers: the stage binds the
  workdir into the sandbox's root while it still holds the caller's identity.
- A workdir is owned while its owner's marker is locked. The lock goes with
  the host process (crash, SIGKILL), so a later `sweep` (at the next open, or
  `zviz gc`) tells a dead owner's workdir from a live one without trusting
  pids. One marker per process, not per workdir: creating a file per sandbox
  cost ~0.5 ms here, a mkdir/rmdir pair is what a workdir costs anyway.
- Removal never resolves a path the sandbox can change: every step is
  relative to a directory fd we opened with O_NOFOLLOW, permissions are fixed
  with fchmod on such an fd (never chmod of a path string), nothing above the
  workdir (or its gate) is ever changed, and symlinks are unlinked, never
  followed. It is iterative (an explicit stack, at most MAX_FDS directory fds
  at once), so any depth works, and past a small budget it runs in a worker
  thread (see `remove_async`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable

import attrs

from ._disk import unmount_all
from ._errors import SandboxSetupError
from ._hostpaths import real_path, resolve
from ._rmtree import OverBudget, remove_tree

WORK = "work"
OWNER = "owner"
ENTRY_PREFIX = "sb-"
SWEEP_INTERVAL = 300.0  # seconds between automatic sweeps of one process
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def base_path(gated: bool = False) -> str:
    """The caller's private parent of its workdirs (`gated`: root's parent of
    gated workdirs, see the module's docstring)."""
    return os.path.join(tempfile.gettempdir(), f"zviz-{os.geteuid()}" + ("-walk" if gated else ""))


def sandbox_walks(mount_ns: bool, listed: tuple[str, ...],
                  known: dict[str, tuple[bool, str]] | None = None) -> bool:
    """Whether the sandbox will reach its workdir by a path through the
    private parent: without a mount namespace (no new root), or when a listed
    path holds the parent (the whole host for `zviz trace`, or a temp dir
    listed read-write), so that the workdir's mount point inside the new root
    lies below it. A root caller's workdir is then gated (module docstring).
    `known`: `_hostpaths.resolve` of the listed paths, when the caller has it."""
    if not mount_ns:
        return True
    tmp = os.path.realpath(tempfile.gettempdir())
    if known is None:
        known = resolve(listed)
    for p in listed:
        real = known[p][1] if p in known else real_path(p)
        if real == "/" or tmp == real or tmp.startswith(real.rstrip("/") + "/"):
            return True
    return False


def open_base(create: bool, gated: bool = False) -> int | None:
    """An fd of the private parent, checked to be ours and not writable by
    others (a directory someone else planted under that name is refused)."""
    path = base_path(gated)
    mode = 0o711 if gated else 0o700
    if create:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            raise SandboxSetupError("workdir-parent", e.errno or errno.EIO, path,
                                    "cannot make the private parent of workdirs: point TMPDIR at a writable "
                                    "directory") from None
    try:
        fd = os.open(path, _O_DIR)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise SandboxSetupError("workdir-parent", e.errno, path,
                                "it is not a directory: remove it, or set TMPDIR to a private directory") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise SandboxSetupError("workdir-parent", errno.EPERM, path,
                                f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: it is not this "
                                "caller's private directory; remove it, or set TMPDIR to a private directory")
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
    return fd


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


# The owner marker: one per host process and parent, `.owner-<pid>.<start
# time>`, flock'ed for the life of the process (close-on-exec; a forked child
# makes its own). Each workdir's name carries its owner's token. A sweep
# tells a live owner by the lock (never by the pid alone). Per process rather
# than per workdir: a file created per sandbox cost ~0.5 ms here.
_owners: dict[str, tuple[int, int, str]] = {}  # base path -> (pid, fd, token)
_owners_lock = threading.Lock()
OWNER_PREFIX = ".owner-"
KEPT, ABANDONED = "kept", "abandoned"  # per-workdir marks (rare: only when kept, or its removal failed)


def _owner_token(base: int, gated: bool) -> str:
    path, pid = base_path(gated), os.getpid()
    with _owners_lock:
        held = _owners.get(path)
        if held is not None and held[0] == pid:
            return held[2]
        token = f"{pid}.{_start_time(pid)}"
        name = OWNER_PREFIX + token
        for _ in range(10):
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=base)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a sweep that met it holds it a moment at most
                # that sweep may have unlinked it meanwhile: ours must be the linked one
                st = os.fstat(fd)
                try:
                    now = os.stat(name, dir_fd=base, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    os.close(fd)
                    continue
                os.pwrite(fd, f"{pid} {_start_time(pid)}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            if not _owners:
                import atexit

                atexit.register(_drop_owners)
            _owners[path] = (pid, fd, token)
            return token
        raise SandboxSetupError("workdir", errno.EAGAIN, os.path.join(path, name), "the owner marker keeps vanishing")


def _drop_owners() -> None:
    """At exit: remove this process's owner markers that no workdir names
    (a crash leaves them to the next sweep)."""
    for path, (pid, fd, token) in list(_owners.items()):
        if pid != os.getpid():
            continue
        with contextlib.suppress(OSError):
            if not any(n.startswith(f"{ENTRY_PREFIX}{token}-") for n in os.listdir(path)):
                os.unlink(os.path.join(path, OWNER_PREFIX + token))
            os.close(fd)
        del _owners[path]


def _token_of(entry: str) -> str:
    return entry[len(ENTRY_PREFIX):].rsplit("-", 1)[0]


def _mark(entry: str, what: str, gated: bool) -> tuple[str, str]:
    """Where a per-workdir mark lives: (name, relative to the base or the gate)."""
    return (what, "gate") if gated else (f".{entry}.{what}", "base")


@attrs.define(eq=False)
class Workdir:
    """A workdir zviz made, owned by this process until removed, kept or
    abandoned."""

    path: str
    entry: str  # its name in the base
    gated: bool = False

    @property
    def entry_path(self) -> str:
        """What a sweep removes: the workdir, or its gate."""
        return os.path.join(base_path(self.gated), self.entry)

    def _set_mark(self, what: str) -> None:
        base = open_base(create=False, gated=self.gated)
        if base is None:
            return
        try:
            d = os.open(self.entry, _O_DIR, dir_fd=base) if self.gated else base
            try:
                name = _mark(self.entry, what, self.gated)[0]
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d))
            finally:
                if d != base:
                    os.close(d)
        finally:
            os.close(base)

    def keep(self) -> None:
        """Leave the workdir on disk for the caller: sweeps leave it (and its
        mark goes once the caller removed the workdir)."""
        self._set_mark(KEPT)

    def release(self) -> None:
        """Give it up without removing (after a failed removal): the next
        sweep removes it although this process lives on."""
        with contextlib.suppress(OSError):
            self._set_mark(ABANDONED)

    def remove(self, budget: int | None = None) -> None:
        """Remove the workdir (blocking: see remove_async; with a `budget`,
        OverBudget past that many entries). Out of fds (other sandboxes of a
        burst hold them), it waits for some, up to 30 s; on the event loop
        (`budget`), it hands over to the thread instead."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self._remove(budget)
                return
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if budget is not None:
                    raise OverBudget from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _remove(self, budget: int | None) -> None:
        base = open_base(create=False, gated=self.gated)
        if base is None:
            return
        try:
            if not self.gated:
                remove_tree(base, self.entry, budget=budget)
                return
            try:
                entry = os.open(self.entry, _O_DIR, dir_fd=base)
            except FileNotFoundError:
                return
            try:
                remove_tree(entry, WORK, budget=budget)
                for mark in (KEPT, ABANDONED):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(mark, dir_fd=entry)
            finally:
                os.close(entry)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self.entry, dir_fd=base)
        finally:
            os.close(base)


def create(ids: tuple[int, int] | None, *, walk: bool = False) -> Workdir:
    """A fresh workdir in the caller's private parent. `ids`: the sandbox's
    host uid and gid when they differ from the caller's (root callers).
    `walk`: the sandbox will reach its workdir by path (no mount namespace,
    or the whole host as its root): for a root caller, a gated workdir."""
    gated = walk and ids is not None and os.geteuid() == 0
    base = open_base(create=True, gated=gated)
    assert base is not None
    try:
        token = _owner_token(base, gated)
        for _ in range(100):
            name = f"{ENTRY_PREFIX}{token}-{secrets.token_hex(6)}"
            try:
                os.mkdir(name, 0o700, dir_fd=base)
                break
            except FileExistsError:
                continue
        else:
            raise SandboxSetupError("workdir", errno.EEXIST, base_path(gated), "no free name")
        try:
            if not gated:
                if ids is not None:
                    # just made, in our 0700 parent: nobody else can have swapped it
                    os.chown(name, ids[0], ids[1], dir_fd=base, follow_symlinks=False)
                return Workdir(path=os.path.join(base_path(), name), entry=name)
            assert ids is not None
            entry = os.open(name, _O_DIR, dir_fd=base)
            try:
                os.mkdir(WORK, 0o700, dir_fd=entry)
                os.chown(WORK, ids[0], ids[1], dir_fd=entry, follow_symlinks=False)
                os.fchown(entry, 0, ids[1])
                os.fchmod(entry, 0o710)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(WORK, dir_fd=entry)
                raise
            finally:
                os.close(entry)
            return Workdir(path=os.path.join(base_path(True), name, WORK), entry=name, gated=True)
        except BaseException:
            # undo with what needs no new fd (this may be EMFILE)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=base)
            raise
    finally:
        os.close(base)


# ---------------------------------------------------------------- sweeping


@attrs.frozen
class Stale:
    path: str  # the workdir, or its gate
    owner: str  # what the owner marker said, as found ("" if none)
    ids: tuple[int, int] | None  # the sandbox's host uid/gid if they were not the caller's


def sweep(*, dry_run: bool = False, min_age: float = 60.0,
          on_stale: Callable[[Stale], None] | None = None) -> list[Stale]:
    """Find (and unless `dry_run`, remove) the caller's workdirs whose owner
    process is gone (its marker unlocked), or that their owner abandoned;
    kept ones stay until the caller removes them. `on_stale(s)` runs before
    removal (it kills what may still run as the sandbox's uid). A workdir
    whose owner marker is missing is taken only once older than `min_age`."""
    found: list[Stale] = []
    for gated in (False, True) if os.geteuid() == 0 else (False,):
        base = open_base(create=False, gated=gated)
        if base is None:
            continue
        held: list[int] = []
        try:
            names = set(os.listdir(base))
            live, dead = set(), {}
            for n in names:
                if n.startswith(OWNER_PREFIX):
                    token = n[len(OWNER_PREFIX):]
                    held_by_us = _owners.get(base_path(gated), (0, -1, ""))
                    if held_by_us[0] == os.getpid() and held_by_us[2] == token:
                        live.add(token)
                        continue
                    try:
                        fd = os.open(n, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base)
                    except OSError:
                        live.add(token)  # cannot tell: leave its workdirs
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        live.add(token)
                        continue
                    held.append(fd)
                    dead[token] = os.pread(fd, 256, 0).decode(errors="replace").strip()
            for n in sorted(names):
                if not n.startswith(ENTRY_PREFIX):
                    continue
                s = _check(base, n, gated, names, live, dead, min_age, dry_run, on_stale)
                if s is not None:
                    found.append(s)
            if not dry_run:
                # marks whose workdir is gone; markers of dead owners with nothing left
                left = set(os.listdir(base))
                tokens = {_token_of(n) for n in left if n.startswith(ENTRY_PREFIX)}
                for n in left:
                    if n.startswith("." + ENTRY_PREFIX) and n.rsplit(".", 1)[0][1:] not in left:
                        with contextlib.suppress(OSError):
                            os.unlink(n, dir_fd=base)
                    elif n.startswith(OWNER_PREFIX) and n[len(OWNER_PREFIX):] in dead \
                            and n[len(OWNER_PREFIX):] not in tokens:
                        with contextlib.suppress(OSError):
                            os.unlink(n, dir_fd=base)  # under its lock: a new owner never shares a token
        finally:
            for fd in held:
                os.close(fd)
            os.close(base)
    return found


def _check(base: int, name: str, gated: bool, names: set[str], live: set[str], dead: dict[str, str],
           min_age: float, dry_run: bool, on_stale: Callable[[Stale], None] | None) -> Stale | None:
    entry = -1
    try:
        if gated:
            try:
                entry = os.open(name, _O_DIR, dir_fd=base)
            except OSError:
                return None
            marks = set(os.listdir(entry)) & {KEPT, ABANDONED}
            st = os.fstat(entry)
            work = os.stat(WORK, dir_fd=entry, follow_symlinks=False) if WORK in os.listdir(entry) else None
        else:
            marks = {m for m in (KEPT, ABANDONED) if f".{name}.{m}" in names}
            st = work = os.stat(name, dir_fd=base, follow_symlinks=False)
        token = _token_of(name)
        if KEPT in marks and not (gated and work is None):
            return None  # the caller's, until it removes the workdir
        if ABANDONED not in marks:
            if token in live:
                return None  # its owner lives
            if token not in dead and time.time() - st.st_mtime < min_age:
                return None  # no marker seen: may be in the making
        ids = None
        if work is not None and work.st_uid != os.geteuid():
            ids = (work.st_uid, work.st_gid)
        s = Stale(path=os.path.join(base_path(gated), name), owner=dead.get(token, ""), ids=ids)
        if dry_run:
            return s
        if on_stale is not None:
            on_stale(s)
        if os.geteuid() == 0:  # what a dead owner left mounted on it (template overlay, fs.disk tmpfs)
            unmount_all(os.path.join(base_path(gated), name, WORK) if gated else os.path.join(base_path(gated), name),
                        os.fstat(base).st_dev)
        if gated:
            remove_tree(entry, WORK)
            for m in (KEPT, ABANDONED):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(m, dir_fd=entry)
            os.rmdir(name, dir_fd=base)
        else:
            remove_tree(base, name)
            for m in (KEPT, ABANDONED):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f".{name}.{m}", dir_fd=base)
        return s
    except OSError:
        return None  # busy or raced: the next sweep tries again
    finally:
        if entry >= 0:
            os.close(entry)


_sweep_lock = threading.Lock()
_last_sweep = [-SWEEP_INTERVAL]  # monotonic time of this process's last sweep


def sweep_in_background(on_stale: Callable[[Stale], None] | None) -> None:
    """At most every SWEEP_INTERVAL per process, sweep in a daemon thread: an
    open never waits for (possibly large) stale workdirs of a dead host."""
    now = time.monotonic()
    with _sweep_lock:
        if now - _last_sweep[0] < SWEEP_INTERVAL:
            return
        _last_sweep[0] = now

    def run() -> None:
        with contextlib.suppress(Exception):
            sweep(on_stale=on_stale)

    threading.Thread(target=run, name="zviz-sweep", daemon=True).start()
