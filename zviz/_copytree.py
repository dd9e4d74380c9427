"""Copying a directory tree the sandbox made, and may have made hostile
(templates: zviz/_snapshot.py).

It reads the source tree only through directory fds opened beneath it (openat2 with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV) and single names
opened O_NOFOLLOW | O_NONBLOCK, so no symlink is ever followed, no path ever
leaves the tree, and nothing is written outside the new template:
- directories and regular files (data and holes, mode bits without set-uid,
  set-gid, sticky or write for group and others, mtime); hard links within the tree stay hard links;
- symlinks as symlinks (their target text, never followed);
- fifos, sockets and device nodes are skipped (their content never read),
  and so, for a root caller, is a file the sandbox could not read itself
  (a host file hard-linked in): both listed in `SnapshotInfo.skipped`;
- bounded: at most `max_files` entries, `max_bytes` bytes of data (a sparse
  file's holes cost nothing) and MAX_DEPTH levels, else TemplateError and
  nothing is left.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable

from ._errors import TemplateError

MAX_DEPTH = 256
# Mode bits a copy keeps: never set-uid, set-gid or sticky, and never writable by group or others (a
# sandbox's `chmod 777` would make a directory of the caller's template that anyone who can reach it
# writes; inside, the sandbox is one uid and loses nothing)
KEEP_MODE = 0o755
_RESOLVE = 0x01 | 0x02 | 0x04 | 0x08  # RESOLVE_NO_XDEV | NO_MAGICLINKS | NO_SYMLINKS | BENEATH


def _open_beneath(root: int, rel: bytes) -> int:
    from . import _kernel

    if not rel:
        return os.dup(root)
    return _kernel.openat2(root, os.fsdecode(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, 0, _RESOLVE,
                           "copy").detach()


def _readable(st: os.stat_result, ids: tuple[int, int] | None) -> bool:
    if ids is None:
        return True
    uid, gid = ids
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_uid == os.geteuid() and st.st_nlink == 1:
        return True  # written by the caller itself (write_file), not a link to elsewhere
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


class Stopped(Exception):
    """`stop()` said to give up (the sandbox whose workdir this copies is being closed)."""


def copy_tree(src_root: int, dst_root: int, *, max_files: int, max_bytes: int, where: str,
              readable_by: tuple[int, int] | None,
              stop: Callable[[], bool] | None = None) -> tuple[int, int, list[tuple[str, str]]]:
    """Copy the tree beneath the directory fd `src_root` into the (empty,
    ours) directory fd `dst_root` under the rules of the module's docstring.
    Returns (entries, data bytes, skipped). `stop`, asked before each entry:
    True raises Stopped (what is gone from the source then is not a change
    to skip over: the copy would be silently partial)."""
    count = size = 0
    skipped: list[tuple[str, str]] = []
    links: dict[tuple[int, int], bytes] = {}
    dir_fixups: list[tuple[bytes, int, int, int]] = []  # (rel, mode, atime_ns, mtime_ns), applied last
    stack: list[bytes] = [b""]
    while stack:
        if stop is not None and stop():
            raise Stopped()
        rel = stack.pop()
        depth = rel.count(b"/") + 1 if rel else 0
        try:
            sfd = _open_beneath(src_root, rel)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EAGAIN):
                skipped.append((os.fsdecode(rel), f"changed while copied ({e.strerror})"))
                continue
            if e.errno == errno.EACCES:  # (a non-root caller, a directory the sandbox made unreadable: chmod 000)
                skipped.append((os.fsdecode(rel), "a directory the caller may not read (its mode): copied empty"))
                continue
            if e.errno == errno.ENAMETOOLONG:
                raise TemplateError(where, f"{os.fsdecode(rel)[:80]!r}...: path too long to copy (shorten it)") \
                    from None
            raise
        try:
            dfd = _open_beneath(dst_root, rel)
            try:
                with os.scandir(sfd) as it:  # (no more names than the bound lets through: one past it raises)
                    names = list(itertools.islice((os.fsencode(e.name) for e in it), max_files - count + 1))
                for nm in names:
                    if stop is not None and stop():
                        raise Stopped()
                    count += 1
                    if count > max_files:
                        raise TemplateError(where, f"the workspace has more than {max_files} entries: pass a "
                                            "larger max_files=, or delete files first")
                    child = rel + b"/" + nm if rel else nm
                    try:
                        st = os.stat(nm, dir_fd=sfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    mode = st.st_mode
                    if stat.S_ISDIR(mode):
                        if depth + 1 > MAX_DEPTH:
                            raise TemplateError(where, f"the workspace is more than {MAX_DEPTH} directories deep "
                                                f"at {os.fsdecode(child)[:80]!r}...: flatten it")
                        os.mkdir(nm, 0o700, dir_fd=dfd)
                        dir_fixups.append((child, stat.S_IMODE(mode) & KEEP_MODE, st.st_atime_ns, st.st_mtime_ns))
                        stack.append(child)
                    elif stat.S_ISLNK(mode):
                        try:
                            target = os.readlink(nm, dir_fd=sfd)
                        except OSError:
                            continue
                        os.symlink(target, nm, dir_fd=dfd)
                        with contextlib.suppress(OSError):
                            os.utime(nm, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
                    elif stat.S_ISREG(mode):
                        size = _copy_file(sfd, dfd, dst_root, nm, child, st, links, size, max_bytes, where,
                                          readable_by, skipped)
                    else:
                        kind = ("fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                                else "device node")
                        skipped.append((os.fsdecode(child), f"a {kind}: not copied"))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    if stop is not None and stop():  # (a directory that vanished was skipped above)
        raise Stopped()
    for rel, mode, atime, mtime in reversed(dir_fixups):
        fd = _open_beneath(dst_root, rel)
        try:
            os.chmod(fd, mode)
            os.utime(fd, ns=(atime, mtime))
        finally:
            os.close(fd)
    return count, size, skipped


def _copy_file(sfd: int, dfd: int, dst_root: int, nm: bytes, child: bytes, st: os.stat_result,
               links: dict[tuple[int, int], bytes], size: int, max_bytes: int, where: str,
               readable_by: tuple[int, int] | None,
               skipped: list[tuple[str, str]]) -> int:
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        # to the first copy, by its path beneath our own new tree (its directories
        # are ones we made: no symlink on the way; nobody else writes there)
        os.link(links[key], nm, src_dir_fd=dst_root, dst_dir_fd=dfd, follow_symlinks=False)
        return size
    if not _readable(st, readable_by):
        skipped.append((os.fsdecode(child), "not readable by the sandbox itself: not copied"))
        return size
    try:
        s = os.open(nm, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=sfd)
    except OSError as e:
        skipped.append((os.fsdecode(child), f"cannot be opened ({e.strerror})"))
        return size
    try:
        fst = os.fstat(s)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != key:
            skipped.append((os.fsdecode(child), "changed while copied"))
            return size
        d = os.open(nm, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            size = _copy_data(s, d, fst.st_size, size, max_bytes, where, child)
            os.fchmod(d, stat.S_IMODE(fst.st_mode) & KEEP_MODE)
            os.utime(d, ns=(fst.st_atime_ns, fst.st_mtime_ns))
        finally:
            os.close(d)
    finally:
        os.close(s)
    if st.st_nlink > 1:
        links[key] = child
    return size


def _over(where: str, max_bytes: int, child: bytes) -> TemplateError:
    return TemplateError(where, f"the workspace holds more than {max_bytes} bytes of data (at "
                         f"{os.fsdecode(child)[:80]!r}): pass a larger max_bytes=, or delete files first")


def _copy_data(s: int, d: int, length: int, size: int, max_bytes: int, where: str, child: bytes) -> int:
    """Copy `length` bytes, keeping holes; a clone (reflink) where the
    filesystem has them. Returns the new running total of data bytes."""
    if length == 0:
        return size
    from . import _kernel

    try:
        blocks = os.fstat(s).st_blocks * 512
        if size + min(blocks, length) <= max_bytes:
            _kernel.ficlone(d, s)
            return size + min(blocks, length)
    except OSError:
        pass
    off = 0
    while off < length:
        try:
            data = os.lseek(s, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # a hole to the end
            raise
        if data >= length:
            break
        hole = min(os.lseek(s, data, os.SEEK_HOLE), length)
        pos = data
        while pos < hole:
            want = min(hole - pos, 1 << 30)
            if size + want > max_bytes:
                raise _over(where, max_bytes, child)
            try:
                n = os.copy_file_range(s, d, want, pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                buf = os.pread(s, min(want, 1 << 20), pos)
                n = os.pwrite(d, buf, pos) if buf else 0
            if n == 0:
                return size  # shrank meanwhile: what was there is copied
            pos += n
            size += n
        off = hole
    os.ftruncate(d, length)
    return size
