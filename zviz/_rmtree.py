"""Removing a directory tree the sandbox may have made hostile, safely.

Removal never resolves a path the sandbox can change: every step is relative
to a directory fd opened with O_NOFOLLOW | O_DIRECTORY, permissions are fixed
with fchmod on such an fd (or fchmodat with AT_SYMLINK_NOFOLLOW), nothing
above the tree is ever changed, and symlinks are unlinked, never followed.
It is iterative (an explicit stack, at most MAX_FDS directory fds at once),
so any depth works, and a bounded step (`budget`) lets the caller do a small
tree on the event loop and hand a big one to a worker thread."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_FDS = 32  # directory fds one removal holds at most (a closed level is reached again through "..")


class OverBudget(Exception):
    """A bounded removal step ran out of operations (the rest goes to a thread)."""


def remove_tree(parent: int, name: str, *, passes: int = 3, budget: int | None = None) -> None:
    """Remove `name` (a file, symlink or directory tree) beneath the directory
    fd `parent`, never following a symlink and never changing anything outside
    it. Raises OSError if it cannot (e.g. something keeps writing into it;
    EMFILE/ENFILE at once, for the caller to retry), OverBudget after
    `budget` entries (what is removed stays removed: call again to go on)."""
    last: OSError | None = None
    left = [budget if budget is not None else -1]
    for _ in range(passes):
        try:
            _remove_once(parent, name, left)
            return
        except FileNotFoundError as e:
            # gone for good only if `name` itself is (an entry below it may
            # have moved meanwhile: go round again)
            try:
                os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return
            last = e
        except OSError as e:  # ENOTEMPTY: refilled meanwhile (a process of the caller's uid outlived teardown)
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise
            last = e
    assert last is not None
    raise last


def _open_dir(parent: int, name: str) -> tuple[int, tuple[int, int]]:
    """Open a directory entry for removal, making it ours to empty (fchmod on
    the fd: the object we opened, whatever the name points to later).
    Returns the fd and the directory's (dev, ino)."""
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent)
    except PermissionError:
        # a directory without read permission (the sandbox's chmod 0): fix
        # its mode without following anything, then open it
        os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
        fd = os.open(name, _O_DIR, dir_fd=parent)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd, (st.st_dev, st.st_ino)


def _spend(left: list[int]) -> None:
    if left[0] == 0:
        raise OverBudget
    left[0] -= 1


def _remove_once(parent: int, name: str, left: list[int]) -> None:
    _spend(left)
    try:
        os.unlink(name, dir_fd=parent)
        return
    except IsADirectoryError:
        pass
    except PermissionError:  # EPERM from unlink(2) on a directory on some filesystems
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise
    # stack[i] = [name in stack[i-1] (stack[0]: in parent), fd or -1 once closed to bound fd use, (dev, ino)]
    fd0, key0 = _open_dir(parent, name)
    stack: list[list[Any]] = [[name, fd0, key0]]
    open_count = 1
    try:
        while stack:
            top = stack[-1]
            child = None
            with os.scandir(top[1]) as it:
                for entry in it:
                    _spend(left)
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    with contextlib.suppress(FileNotFoundError):
                        try:
                            os.unlink(entry.name, dir_fd=top[1])
                        except IsADirectoryError:  # became a directory meanwhile
                            child = entry.name
                            break
            if child is not None:
                try:
                    fd, key = _open_dir(top[1], child)
                except (NotADirectoryError, FileNotFoundError):
                    continue  # replaced by a file or symlink, or moved: the next scan sees what is there
                except OSError as e:
                    if e.errno != errno.ELOOP:
                        raise
                    continue
                stack.append([child, fd, key])
                open_count += 1
                if open_count > MAX_FDS:
                    # close the shallowest open one but the first (kept: reopening by name starts there)
                    for item in stack[1:-1]:
                        if item[1] >= 0:
                            os.close(item[1])
                            item[1] = -1
                            open_count -= 1
                            break
                continue
            # empty: remove it from its parent
            if len(stack) > 1 and stack[-2][1] < 0:
                stack[-2][1] = _reopen_up(top[1], stack[-2][2])
                if stack[-2][1] < 0:
                    stack[-2][1] = _reopen(parent, stack[:-1])
                open_count += 1
            os.close(top[1])
            top[1] = -1
            open_count -= 1
            stack.pop()
            if stack:
                with contextlib.suppress(FileNotFoundError):  # moved meanwhile: the parent's next scan sees it
                    os.rmdir(top[0], dir_fd=stack[-1][1])
            else:
                os.rmdir(top[0], dir_fd=parent)
    finally:
        for item in stack:
            if item[1] >= 0:
                os.close(item[1])


def _reopen_up(fd: int, key: tuple[int, int]) -> int:
    """The parent of the directory `fd`, through "..", if it is still the very
    directory we opened on the way down (same dev and inode); else -1."""
    try:
        up = os.open("..", _O_DIR, dir_fd=fd)
    except OSError:
        return -1
    st = os.fstat(up)
    if (st.st_dev, st.st_ino) != key:
        os.close(up)
        return -1
    return up


def _reopen(parent: int, stack: list[list[Any]]) -> int:
    """Reopen the last entry of `stack` by name from its deepest open ancestor
    (each step O_NOFOLLOW: a swapped-in symlink fails rather than leads out)."""
    i = len(stack) - 1
    while i > 0 and stack[i - 1][1] < 0:
        i -= 1
    fd = stack[i - 1][1] if i > 0 else parent
    opened = -1
    for j in range(i, len(stack)):
        nxt = os.open(stack[j][0], _O_DIR, dir_fd=fd)
        if opened >= 0:
            os.close(opened)
        opened = fd = nxt
    return opened


async def remove_async(fn: Callable[[], None]) -> None:
    """Run a removal (or any blocking teardown step) in a worker thread,
    shielded: the event loop keeps running, and cancellation of the caller
    does not leave the work half done."""
    import anyio

    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(fn)
