"""The workdir on the host side: file transfer in and out, and what a
workdir the caller gives must allow. The sandboxed code controls the
workdir's contents and may plant symlinks, fifos or unreadable directories
there: every open walks it without following a symlink. (Where workdirs live,
who owns them and their removal: _workdir.py; the sandbox's host uid:
_ids.py.)"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ._errors import PolicyError, SandboxSetupError


def open_beneath(workdir: str, relpath: str, flags: int, mode: int = 0o644) -> int:
    """Open `relpath` beneath the workdir without following any symlink (the
    sandboxed code controls the workdir and may plant one)."""
    if not isinstance(relpath, str) or not relpath or "\0" in relpath:
        raise PolicyError("path", relpath, "a relative path inside the workdir")
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if relpath.startswith("/") or not parts or ".." in parts:
        raise PolicyError("path", relpath, "a relative path inside the workdir, without '..'")
    dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            if flags & os.O_CREAT:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=dirfd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            os.close(dirfd)
            dirfd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dirfd)
    finally:
        os.close(dirfd)


def write_file(workdir: str, relpath: str, data: bytes | bytearray | memoryview, mode: int,
               owner: tuple[int, int]) -> None:
    """`Sandbox.write_file` without the checkpoint. `owner`: the sandbox's
    host uid and gid (the file is made theirs)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("data must be bytes")
    if not isinstance(mode, int) or mode & ~0o777:
        raise PolicyError("mode", mode, "permission bits within 0o777 (no set-id, no sticky)")
    fd = open_beneath(workdir, relpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SandboxSetupError("write-file", errno.EINVAL, relpath, "not a regular file")
        os.set_blocking(fd, True)
        view = memoryview(bytes(data))
        while view:
            view = view[os.write(fd, view):]
        if owner[0] != os.geteuid():
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def read_file(workdir: str, relpath: str, max_bytes: int) -> bytes:
    """`Sandbox.read_file` without the checkpoint."""
    fd = open_beneath(workdir, relpath, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SandboxSetupError("read-file", errno.EINVAL, relpath, "not a regular file")
        if st.st_size > max_bytes:
            raise SandboxSetupError("read-file", errno.EFBIG, relpath, f"larger than max_bytes={max_bytes}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= max_bytes:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
            total += len(b)
    finally:
        os.close(fd)
    return b"".join(chunks)[:max_bytes]


def check_workdir_reachable(path: str, uid: int) -> None:
    """The sandbox runs as `uid` on the host: it must be able to reach and
    write a workdir the caller gave (a root caller's sandbox has a host uid
    of its own, a fresh one each time: _ids.py)."""
    # Its parents need not be reachable: the stage binds the workdir into the
    # sandbox's root while it still holds the caller's identity.
    st = os.stat(path)
    if uid != st.st_uid and not st.st_mode & 0o002:
        raise ValueError(f"workdir {path!r} must be a directory the sandbox's host uid {uid} can write "
                          f"(zviz runs a root caller's sandboxes as nobody): chown {uid} {path}, or let zviz "
                          "create a fresh workdir")


def rmtree(path: str) -> None:
    """Remove a workdir the sandbox may have made hostile (read-only dirs...)."""
    def onerror(func: Any, p: str, exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


class Files:
    """`Sandbox.files` (filled in below)."""

    def __init__(self, sb: object) -> None:
        self._sb = sb
