"""The sandbox's files from the host side: `sb.files` (any path of the
sandbox's own view, resolved in its root), and what a workdir the caller
gives must allow. (Where workdirs live, who owns them and their removal:
_workdir.py; the sandbox's host uid: _ids.py.)

Why this module is long: the file API is one concern (reaching into a hostile
view safely) with eight small operations; splitting it would scatter the rules
stated once at the top of its section.

The sandboxed code controls what it may write and may plant symlinks, FIFOs,
hardlinks or unreadable directories there, and swap them while the host
looks: every lookup is one openat2() resolved inside the sandbox's root, no
FIFO or device is ever opened."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import attrs

from . import _kernel
from ._args import check_path
from ._errors import SandboxClosedError


def check_workdir_reachable(path: str, uid: int) -> None:
    """The sandbox runs as `uid` on the host: it must be able to reach and
    write a workdir the caller gave (a root caller's sandbox has a host uid
    of its own, a fresh one each time: _ids.py). A bad argument: ValueError."""
    # Its parents need not be reachable: the stage binds the workdir into the
    # sandbox's root while it still holds the caller's identity.
    st = os.stat(path)
    if uid != st.st_uid and not st.st_mode & 0o002:
        raise ValueError(f"workdir {path!r} must be a directory the sandbox's host uid {uid} can write (a root "
                         "caller's sandbox runs as a fresh uid of its own each time, see ZVIZ_HOST_IDS): make it "
                         f"writable for all (chmod 1777 {path}), or let zviz create a fresh workdir")


def probe_command(host: str, writable: tuple[str, ...], executable: bool) -> bool | None:
    """Whether the host path `host` (a command the sandbox is asked to run,
    mapped to the host: _plan.host_path) is there: a regular executable file
    with `executable` (a PATH lookup), anything otherwise. Beneath a host
    path the sandbox may write (its workdir, its read-write paths) no symlink
    is followed: a link there is the sandbox's and may name any host path,
    which the host would look at as itself (root: everything), an oracle on
    the host's files. None: a link on the way (the exec inside, which
    follows it in the sandbox's root, decides: status 127 if missing)."""
    root = next((w for w in writable if host == w or host.startswith(w.rstrip("/") + "/")), None)
    if root is None:  # the policy's read-only paths: the host's own files, links included
        return os.path.isfile(host) and os.access(host, os.X_OK) if executable else os.path.exists(host)
    try:
        rfd = _kernel.OwnedFd(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "probe-root")
    except OSError:
        return None
    try:
        fd = _kernel.openat2(rfd.fd, posixpath.relpath(host, root), os.O_PATH, 0, WALK, "probe")
    except OSError as e:
        return False if e.errno in (errno.ENOENT, errno.ENOTDIR) else None
    finally:
        rfd.close()
    try:
        st = os.fstat(fd.fd)
    finally:
        fd.close()
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111) if executable else True


# ---------------------------------------------------------------- sb.files: the sandbox's own view

DEFAULT_MAX_READ = 64 * 1024**2
DEFAULT_MAX_LIST = 100_000  # entries of one list(): the sandbox decides how many a directory holds
CHUNK = 1 << 20
# Resolve inside the sandbox's root: `..`, absolute paths and absolute
# symlinks stop at its `/`; magic links (/proc/N/fd/..., /proc/N/root) are
# refused, since they would leave the view. Symlinks are followed like the
# sandbox's own code would (they cannot lead out of its root), except by
# operations on a name itself (remove, rename, the last part of stat()).
IN_VIEW = _kernel.RESOLVE_IN_ROOT | _kernel.RESOLVE_NO_MAGICLINKS
# A tree removal never follows a symlink or crosses into another mount.
WALK = _kernel.RESOLVE_BENEATH | _kernel.RESOLVE_NO_SYMLINKS | _kernel.RESOLVE_NO_MAGICLINKS | _kernel.RESOLVE_NO_XDEV
_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device"}


@attrs.frozen(kw_only=True)
class FileInfo:
    """One entry of `sb.files.list()` / `sb.files.stat()`."""

    name: str
    path: str  # as the sandbox sees it
    type: str  # "file", "dir", "symlink", "fifo", "socket", "char-device" or "block-device"
    size: int
    mtime: float
    mode: int  # permission bits


@attrs.frozen(kw_only=True)
class View:
    """What `Files` needs from its sandbox."""

    cwd: str  # the inside path relative paths start from (the workdir)
    writable: tuple[str, ...]  # inside paths the sandbox may write beneath (each a mount of its view)
    uid: int  # the sandbox's host identity: the file API acts as it
    gid: int
    # (an O_PATH fd of the sandbox's root, the inside path it stands for: "/",
    # or the workdir when the sandbox has no long-lived root to look into)
    open_root: Callable[[], Awaitable[tuple[_kernel.OwnedFd, str]]]
    check_open: Callable[[], None]
    # Around each call: the sandbox's teardown waits for it before it takes the view and the workdir
    # away. `closing()`: the sandbox is being closed (the call stops at its next step: SandboxClosedError).
    in_use: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    closing: Callable[[], bool] = lambda: False


class _Stopped(Exception):
    """The sandbox is being closed: the call in the worker thread gives up."""


def _err(e: OSError, path: str, why: str | None = None) -> OSError:
    """The same OSError subclass, naming the inside path."""
    return OSError(e.errno, why or os.strerror(e.errno or 0), path)


class Files:
    """`sb.files`: the files of the sandbox's own view (its workdir, its /tmp,
    HOME, every path its policy shows it), read and written as the sandbox
    itself could: writes only where it may write, and as its own uid. Paths
    are inside paths; relative ones start at the workspace (`/workspace`).
    Errors are OSError subclasses (FileNotFoundError, PermissionError, ...)
    naming the inside path. The I/O runs in a worker thread: large transfers do not block the
    event loop."""

    def __init__(self, view: View) -> None:
        self._view = view

    def _inside(self, path: object) -> str:
        path = check_path(path)
        return posixpath.normpath(posixpath.join(self._view.cwd, path))

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(root, *args)` in a worker thread. A close of the sandbox before
        it returns is SandboxClosedError: the close takes the view away under
        it (its mounts, then the workdir), so what it did or saw then (an
        EROFS, a missing file, a write into a workdir being removed) is no
        answer; the teardown waits for it (`in_use`), which stops at its
        next step."""
        view = self._view
        view.check_open()
        with view.in_use():
            try:
                root, base = await view.open_root()

                def work() -> T:
                    try:
                        if view.closing():
                            raise _Stopped()
                        with _kernel.ThreadFsIds(view.uid, view.gid):
                            return fn(_Root(root, base, view), *args)
                    finally:
                        root.close()

                result = await anyio.to_thread.run_sync(work)
            except Exception:
                if not view.closing():
                    raise
            else:
                if not view.closing():
                    return result
            raise SandboxClosedError("the sandbox was closed while this file call ran (closed from another task "
                                     "or thread): its result is lost; open a new sandbox") from None

    async def read(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        """The bytes of a regular file (FIFOs, devices and sockets are refused:
        IsADirectoryError / OSError EINVAL). Over `max_bytes`: OSError EFBIG."""
        inside = self._inside(path)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, not {max_bytes!r}")
        return await self._call(_read, inside, max_bytes)

    async def read_text(self, path: str, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_MAX_READ) -> str:
        """`read()` decoded."""
        return (await self.read(path, max_bytes=max_bytes)).decode(encoding)

    async def write(self, path: str, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644,
                    encoding: str = "utf-8", parents: bool = True) -> None:
        """Write a regular file (created, or truncated; `parents` made as
        needed). `str` data is encoded. `mode`: permission bits (0o755 for an
        executable; set-id and sticky bits are refused)."""
        inside = self._inside(path)
        if isinstance(data, str):
            data = data.encode(encoding)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise TypeError(f"mode must be an int, not {type(mode).__name__}")
        if mode & ~0o777:
            raise ValueError(f"mode {mode:#o}: permission bits within 0o777 only (no set-id, no sticky)")
        await self._call(_write, inside, memoryview(data).cast("B"), mode, parents)

    async def list(self, path: str = ".", *, max_entries: int = DEFAULT_MAX_LIST) -> list[FileInfo]:
        """The entries of a directory (symlinks not followed), sorted by name.
        More than `max_entries`: OSError E2BIG (the host holds no more than
        that many at once, whatever the sandbox put there)."""
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError(f"max_entries must be a non-negative int, not {max_entries!r}")
        return await self._call(_list, self._inside(path), max_entries)

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileInfo:
        """One entry's type, size, mtime and mode."""
        return await self._call(_stat, self._inside(path), follow_symlinks)

    async def exists(self, path: str) -> bool:
        """Whether `path` exists in the view (False if something on the way is missing)."""
        try:
            await self.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink (not its target), an empty directory, or with
        `recursive` a whole tree (never following a symlink out of it)."""
        await self._call(_remove, self._inside(path), recursive)

    async def mkdir(self, path: str, *, parents: bool = False, exist_ok: bool = False, mode: int = 0o755) -> None:
        """Make a directory."""
        if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o777:
            raise ValueError(f"mode must be permission bits within 0o777, not {mode!r}")
        await self._call(_mkdir, self._inside(path), parents, exist_ok, mode)

    async def rename(self, src: str, dst: str) -> None:
        """Rename (move) `src` to `dst`, replacing a file there, within one mount."""
        await self._call(_rename, self._inside(src), self._inside(dst))


T = TypeVar("T")


class _Root:
    """One operation's view of the sandbox's root (in the worker thread)."""

    def __init__(self, fd: _kernel.OwnedFd, base: str, view: View) -> None:
        self.fd = fd
        self.base = base
        self.view = view
        self._writable: set[int] | None = None

    def rel(self, inside: str) -> str:
        """`inside` relative to the root fd ("." for the root itself)."""
        if self.base == "/":
            return inside.lstrip("/") or "."
        rel = posixpath.relpath(inside, self.base)
        if rel == ".." or rel.startswith("../"):
            raise PermissionError(errno.EACCES, "outside the workdir: this sandbox has no view of its own to "
                                  "look into (it runs without a zygote)", inside)
        return rel

    def open(self, inside: str, flags: int, label: str = "file", mode: int = 0) -> _kernel.OwnedFd:
        try:
            return _kernel.openat2(self.fd.fd, self.rel(inside), flags, mode, IN_VIEW, label)
        except OSError as e:
            raise _err(e, inside) from None

    def parent(self, inside: str) -> tuple[_kernel.OwnedFd, str]:
        """(O_PATH fd of the directory holding `inside`, its last name)."""
        if inside == "/" or (self.base != "/" and inside == self.base):
            raise PermissionError(errno.EBUSY, "the root of the view itself", inside)
        head, name = posixpath.split(inside)
        return self.open(head, os.O_PATH | os.O_DIRECTORY, "dir"), name

    def check_writable(self, fd: _kernel.OwnedFd, inside: str) -> None:
        """Writes only on the mounts the sandbox may write (its workdir, its
        /tmp, its policy's read-write paths): the mount a file or directory is
        on is a fact of the open fd, not of a path someone could swap."""
        if self._writable is None:
            ids = set()
            for w in self.view.writable:
                try:
                    fd_w = _kernel.openat2(self.fd.fd, self.rel(w), os.O_PATH, 0, IN_VIEW, "writable")
                except OSError:
                    continue
                try:
                    ids.add(_kernel.mount_id(fd_w.fd))
                finally:
                    fd_w.close()
            self._writable = ids
        if _kernel.mount_id(fd.fd) not in self._writable:
            raise PermissionError(errno.EROFS, "read-only in the sandbox (not beneath its workdir, /tmp or a "
                                  "read-write path of its policy)", inside)


def _read(root: _Root, inside: str, max_bytes: int) -> bytes:
    path_fd = root.open(inside, os.O_PATH)
    try:
        st = os.fstat(path_fd.fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory", inside)
        if not stat.S_ISREG(st.st_mode):
            # never opened: a FIFO would block, a device could act on its open
            raise OSError(errno.EINVAL, f"not a regular file ({_TYPES.get(stat.S_IFMT(st.st_mode), 'other')})",
                          inside)
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"the file has {st.st_size} bytes, over max_bytes={max_bytes}", inside)
        try:
            fd = _kernel.reopen(path_fd, os.O_RDONLY, "read")
        except OSError as e:
            raise _err(e, inside) from None
    finally:
        path_fd.close()
    try:
        chunks, total = [], 0
        while True:
            if root.view.closing():
                raise _Stopped()
            b = os.read(fd.fd, CHUNK)
            if not b:
                break
            total += len(b)
            if total > max_bytes:  # it grew meanwhile
                raise OSError(errno.EFBIG, f"the file has over max_bytes={max_bytes} bytes", inside)
            chunks.append(b)
    finally:
        fd.close()
    return b"".join(chunks)


def _write(root: _Root, inside: str, data: memoryview, mode: int, parents: bool) -> None:
    if parents:
        head = posixpath.dirname(inside)
        if head not in ("/", root.base):
            _mkdir(root, head, True, True, 0o755)
    dirfd, name = root.parent(inside)
    try:
        root.check_writable(dirfd, inside)
        for _attempt in range(8):
            try:
                path_fd = _kernel.openat2(dirfd.fd, name, os.O_PATH | os.O_NOFOLLOW, 0, IN_VIEW, "file")
            except FileNotFoundError:
                try:  # a new file is a regular file: no FIFO or device can be opened this way
                    fd = _kernel.openat2(dirfd.fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                         mode, IN_VIEW, "write")
                except FileExistsError:
                    continue  # created meanwhile: look again
                except OSError as e:
                    raise _err(e, inside) from None
                break
            except OSError as e:
                raise _err(e, inside) from None
            try:
                st = os.fstat(path_fd.fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file "
                                  f"({_TYPES.get(stat.S_IFMT(st.st_mode), 'other')}): not replaced", inside)
                try:
                    fd = _kernel.reopen(path_fd, os.O_WRONLY | os.O_TRUNC, "write")
                except OSError as e:
                    raise _err(e, inside) from None
            finally:
                path_fd.close()
            break
        else:
            raise OSError(errno.EAGAIN, "the file kept changing", inside)
    finally:
        dirfd.close()
    try:
        view = data
        while view:
            if root.view.closing():
                raise _Stopped()
            n = os.write(fd.fd, view[:CHUNK])
            view = view[n:]
        os.fchmod(fd.fd, mode)
    except OSError as e:
        raise _err(e, inside) from None
    finally:
        fd.close()


def _info(name: str, inside: str, st: os.stat_result) -> FileInfo:
    return FileInfo(name=name, path=inside, type=_TYPES.get(stat.S_IFMT(st.st_mode), "other"), size=st.st_size,
                    mtime=st.st_mtime, mode=stat.S_IMODE(st.st_mode))


def _list(root: _Root, inside: str, max_entries: int) -> list[FileInfo]:
    fd = root.open(inside, os.O_RDONLY | os.O_DIRECTORY, "dir")
    out: list[FileInfo] = []
    try:
        with os.scandir(fd.fd) as it:  # read as it goes: never more than max_entries names at once
            for entry in it:
                if len(out) >= max_entries:
                    raise OSError(errno.E2BIG, f"the directory has over max_entries={max_entries} entries", inside)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                out.append(_info(entry.name, posixpath.join(inside, entry.name), st))
    except OSError as e:
        raise _err(e, inside, e.strerror) from None
    finally:
        fd.close()
    return sorted(out, key=lambda i: i.name)


def _stat(root: _Root, inside: str, follow: bool) -> FileInfo:
    if follow or inside == "/":
        fd = root.open(inside, os.O_PATH)
        try:
            return _info(posixpath.basename(inside) or "/", inside, os.fstat(fd.fd))
        finally:
            fd.close()
    dirfd, name = root.parent(inside)
    try:
        return _info(name, inside, os.stat(name, dir_fd=dirfd.fd, follow_symlinks=False))
    except OSError as e:
        raise _err(e, inside) from None
    finally:
        dirfd.close()


def _remove(root: _Root, inside: str, recursive: bool) -> None:
    dirfd, name = root.parent(inside)
    try:
        root.check_writable(dirfd, inside)
        _remove_at(dirfd, name, inside, recursive)
    finally:
        dirfd.close()


def _remove_at(dirfd: _kernel.OwnedFd, name: str, inside: str, recursive: bool) -> None:
    try:
        st = os.stat(name, dir_fd=dirfd.fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dirfd.fd)
            return
        if recursive:
            try:
                sub = _kernel.openat2(dirfd.fd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, 0, WALK, "walk")
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced by a symlink or a file meanwhile
                    os.unlink(name, dir_fd=dirfd.fd)
                    return
                raise
            try:
                for child in os.listdir(sub.fd):
                    _remove_at(sub, child, posixpath.join(inside, child), True)
            finally:
                sub.close()
        os.rmdir(name, dir_fd=dirfd.fd)
    except FileNotFoundError as e:
        if e.filename == inside or e.filename is None:
            raise _err(e, inside) from None
        raise
    except OSError as e:
        if e.filename is not None and isinstance(e.filename, str) and e.filename.startswith("/"):
            raise
        raise _err(e, inside) from None


def _stat_in_view(root: _Root, inside: str) -> os.stat_result:
    fd = root.open(inside, os.O_PATH)
    try:
        return os.fstat(fd.fd)
    finally:
        fd.close()


def _mkdir(root: _Root, inside: str, parents: bool, exist_ok: bool, mode: int) -> None:
    todo = [inside]
    if parents:
        head = posixpath.dirname(inside)
        while head not in ("/", root.base):
            todo.append(head)
            head = posixpath.dirname(head)
        todo.reverse()
    for i, d in enumerate(todo):
        last = i == len(todo) - 1
        dirfd, name = root.parent(d)
        try:
            try:
                # followed as the sandbox would follow it: in its root (a plain stat beside dirfd would
                # resolve an absolute link on the host and tell a host file from a missing one)
                st = _stat_in_view(root, d)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise FileExistsError(errno.EEXIST, "exists and is not a directory", d)
                if last and not exist_ok:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), d)
                continue
            root.check_writable(dirfd, d)
            try:
                os.mkdir(name, mode, dir_fd=dirfd.fd)
            except FileExistsError:
                if last and not exist_ok:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), d) from None
            except OSError as e:
                raise _err(e, d) from None
        finally:
            dirfd.close()


def _rename(root: _Root, src: str, dst: str) -> None:
    sfd, sname = root.parent(src)
    try:
        dfd, dname = root.parent(dst)
        try:
            root.check_writable(sfd, src)
            root.check_writable(dfd, dst)
            try:
                os.rename(sname, dname, src_dir_fd=sfd.fd, dst_dir_fd=dfd.fd)
            except OSError as e:
                raise _err(e, src if e.errno == errno.ENOENT else dst) from None
        finally:
            dfd.close()
    finally:
        sfd.close()
