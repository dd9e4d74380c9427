"""Host uids and gids of a root caller's sandboxes: one per live sandbox.

A root caller's sandbox runs on the host as a uid of its own, taken from a
reserved range (ZVIZ_HOST_IDS="START:COUNT", default 1879048192:65536, i.e.
0x70000000..0x7000FFFF: above systemd's container range, below 2^31, used by
no distribution for anything). The gid is the same number. Two sandboxes
never share a uid while both live, so file permissions separate them even in
a directory both may write (a 0700 workdir is the sandbox's alone), and the
uid is a handle that reaches every process of the sandbox, in every mode
(`_kernel.kill_uid`), which teardown uses where there is no pid namespace.

Leases: /run/zviz/ids/ (root's, 0700) holds one file per uid in use, named by
the uid and flock'ed by the holder. Allocation is round-robin from a
persistent counter (`next`), so a uid comes back only after the whole range
went round. The file is unlinked (under the lock) when the holder finishes
cleanly: every process of the uid killed and its workdir removed. If it stays:
- "kept PATH": the holder kept its workdir (files of that uid): the uid is
  not handed out while PATH exists;
- "held PID START ENTRY" but unlocked: the holder died. The uid is not handed
  out while ENTRY (the dead holder's workdir) exists; once a sweep removed it,
  the next holder first kills whatever still runs as the uid.
A workdir the caller gives keeps its uid: `path-<hash>` names the uid of
its last sandbox, which the next sandbox on it takes again when free (runs
on one directory do not use the range up, and its files stay accessible).
What is not guaranteed: files the sandbox left outside its workdir (in a
read-write path of its policy) keep its uid, and zviz cannot know of them: a
later sandbox given the same uid (after COUNT others) owns them. A process
outside zviz that takes a uid of the range is killed with the sandbox.

Non-root callers cannot map other uids (that takes newuidmap and a
subordinate range): their sandboxes run as the caller's own uid, as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Collection

import attrs

from . import _kernel
from ._errors import PolicyError, ResourceExhausted, SandboxSetupError

ENV = "ZVIZ_HOST_IDS"
DEFAULT_START = 0x70000000
DEFAULT_COUNT = 65536
LEASE_DIR = "/run/zviz/ids"
COUNTER = "next"


def id_range() -> range:
    """The reserved range, from ZVIZ_HOST_IDS ("START:COUNT") or the default."""
    text = os.environ.get(ENV, "")
    if not text:
        return range(DEFAULT_START, DEFAULT_START + DEFAULT_COUNT)
    start_s, sep, count_s = text.partition(":")
    try:
        start, count = int(start_s), int(count_s)
    except ValueError:
        start = count = -1
    if not sep or start < 65536 or count < 1 or start + count > 2**32 - 2:
        raise PolicyError(ENV, text, "START:COUNT with START >= 65536 and START + COUNT < 2**32 - 1 "
                          f"(default {DEFAULT_START}:{DEFAULT_COUNT})")
    return range(start, start + count)


@attrs.define(eq=False)
class Lease:
    """The host uid/gid of one sandbox. For a non-root caller, its own ids
    (nothing is held)."""

    uid: int
    gid: int
    fd: int = -1  # the flock'ed lease file (root only)

    @property
    def separate(self) -> bool:
        """True when the sandbox is a uid of its own (root callers)."""
        return self.fd >= 0

    def kill_all(self) -> bool:
        """SIGKILL every process running as this uid (see _kernel.kill_uid)."""
        if not self.separate:
            return False
        return _kernel.kill_uid(self.uid, self.gid)

    def note_entry(self, entry: str) -> None:
        if self.fd >= 0:  # the file is empty here (fresh, or emptied by _try)
            os.pwrite(self.fd, f"held {os.getpid()} {entry}\n".encode(), 0)

    def release(self, kept: str | None = None) -> None:
        """Hand the uid back. `kept`: the path of a workdir left on disk
        (its files are this uid's), which keeps the uid out of use."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if kept is not None:
                _write(fd, f"kept {kept}\n")
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(LEASE_DIR, str(self.uid)))
        finally:
            os.close(fd)


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _open_dir() -> int:
    for d, mode in (("/run/zviz", 0o755), (LEASE_DIR, 0o700)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, mode)
    try:
        fd = os.open(LEASE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxSetupError("host-ids", e.errno or errno.EIO, LEASE_DIR, "cannot open the uid lease directory") \
            from None
    st = os.fstat(fd)
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise SandboxSetupError("host-ids", errno.EPERM, LEASE_DIR,
                                f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; it must be root's "
                                "and 0700: remove it and let zviz make it")
    return fd


def acquire(workdir: str | None = None) -> Lease:
    """A uid/gid of its own for a new sandbox (root), or the caller's.
    `workdir`: a workdir the caller gave (it keeps its files, so it keeps
    its uid: the uid of its last sandbox is taken again when free)."""
    if os.geteuid() != 0:
        return Lease(uid=os.geteuid(), gid=os.getegid())
    ids = id_range()
    d = _open_dir()
    try:
        if workdir is not None:
            uid = _uid_of_path(d, workdir)
            if uid is not None and uid in ids:
                fd = _try(d, uid, reuse_for=workdir)
                if fd >= 0:
                    return Lease(uid=uid, gid=uid, fd=fd)
        c = os.open(COUNTER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d)
        try:
            fcntl.flock(c, fcntl.LOCK_EX)
            raw = os.pread(c, 32, 0).strip()
            n = int(raw) % len(ids) if raw.isdigit() else 0
            for i in range(len(ids)):
                k = (n + i) % len(ids)
                fd = _try(d, ids[k])
                if fd >= 0:
                    os.pwrite(c, b"%10d\n" % ((k + 1) % len(ids)), 0)  # fixed width: no truncate
                    if workdir is not None:
                        _remember_path(d, workdir, ids[k])
                    return Lease(uid=ids[k], gid=ids[k], fd=fd)
        finally:
            os.close(c)
    finally:
        os.close(d)
    raise ResourceExhausted("host-ids", errno.EAGAIN, LEASE_DIR,
                            limit=f"host uids for sandboxes ({ENV}: {len(ids)} in use or held by kept workdirs)",
                            fix=f"widen {ENV}, remove kept workdirs you no longer need and run `zviz gc`, "
                            "or run fewer sandboxes at once") from None


def _path_key(path: str) -> str:
    import hashlib

    return "path-" + hashlib.sha256(path.encode(errors="surrogateescape")).hexdigest()[:32]


def _uid_of_path(d: int, path: str) -> int | None:
    return _uid_of_path_file(d, _path_key(path))


def _remember_path(d: int, path: str, uid: int) -> None:
    fd = os.open(_path_key(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=d)
    try:
        os.write(fd, b"%d\n" % uid)
    finally:
        os.close(fd)


def _try(d: int, uid: int, reuse_for: str | None = None) -> int:
    """The lease of `uid`, flock'ed, or -1 if it is taken or must stay unused
    (`reuse_for`: unless what keeps it is that workdir itself)."""
    name = str(uid)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise ResourceExhausted("host-ids", e.errno, LEASE_DIR) from None
        return -1
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return -1
        # a holder that finished unlinked the file under its lock: ours must
        # still be the one under that name
        st = os.fstat(fd)
        try:
            now = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            os.close(fd)
            return -1
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            os.close(fd)
            return -1
        record = os.pread(fd, 8192, 0).decode(errors="replace").split()
        if record:
            # an earlier holder left something: a kept workdir, or it died
            path = record[1] if record[0] == "kept" and len(record) > 1 else record[-1]
            mine = reuse_for is not None and path == reuse_for  # the same workdir: its files are this uid's
            if record[0] in ("kept", "held") and path.startswith("/") and os.path.lexists(path) and not mine:
                os.close(fd)
                return -1
            _kernel.kill_uid(uid, uid)  # whatever the dead holder left running
            _write(fd, "")
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def reclaim(uid: int, gid: int) -> None:
    """Before a dead host's workdir of `uid` is removed: kill what still runs
    as it, unless the uid is held by a live sandbox again."""
    if os.geteuid() != 0 or uid not in id_range():
        return
    try:
        fd = os.open(os.path.join(LEASE_DIR, str(uid)), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _kernel.kill_uid(uid, gid)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a live holder: not ours to kill
    finally:
        os.close(fd)
    _kernel.kill_uid(uid, gid)


def _uid_of_path_file(d: int, name: str) -> int | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    except OSError:
        return None
    try:
        raw = os.read(fd, 32).strip()
    finally:
        os.close(fd)
    return int(raw) if raw.isdigit() else None


def sweep_leases(*, dry_run: bool = False, gone: Collection[str] = ()) -> list[str]:
    """Remove lease files nobody holds whose workdir is gone (`zviz gc`).
    `gone`: workdirs to take as gone (a dry run's: what it would remove)."""
    if os.geteuid() != 0 or not os.path.isdir(LEASE_DIR):
        return []
    out = []
    swept = set()
    d = _open_dir()
    try:
        for name in os.listdir(d):
            if not name.isdigit():
                continue
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                record = os.pread(fd, 8192, 0).decode(errors="replace").split()
                path = record[-1] if record else ""
                if path.startswith("/") and os.path.lexists(path) and path not in gone:
                    continue
                out.append(f"{LEASE_DIR}/{name}")
                swept.add(name)
                if not dry_run:
                    _kernel.kill_uid(int(name), int(name))
                    os.unlink(name, dir_fd=d)
            finally:
                os.close(fd)
        # then the workdir -> uid notes whose uid is no longer leased
        names = set(os.listdir(d)) - swept
        for name in sorted(names):
            if name.startswith("path-"):
                uid = _uid_of_path_file(d, name)
                if uid is None or str(uid) not in names:
                    out.append(f"{LEASE_DIR}/{name}")
                    if not dry_run:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=d)
    finally:
        os.close(d)
    return out
