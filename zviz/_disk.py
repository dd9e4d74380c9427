"""The `fs.disk` limit: the workdir as a size-capped tmpfs.

For a root caller, zviz mounts a tmpfs of `fs.disk` bytes (and one inode per
4 KiB) on the workdir it created, in the host's mount namespace, so the host
reads and writes it by its usual path (`read_file`, `write_file`, your own
code) while the sandbox gets ENOSPC at the limit and the host's disk is not
touched at all. The mount lives as long as the sandbox: teardown unmounts it
(lazily) and removes the empty directory under it; removal of the files the
sandbox left costs nothing. Its pages are memory: they are charged to the
sandbox's memory cgroup (the sandbox's writes) or the caller's (yours).

A non-root caller cannot mount on the host: the limit is then not enforced
and the sandbox says so in `degraded`. A workdir you pass in, or
`keep_workdir=True`, cannot be a tmpfs that goes away with the sandbox: such
a policy is refused.
"""

from __future__ import annotations

import contextlib
import os

from . import _kernel
from ._errors import PolicyError


def options(size: int, uid: int, gid: int) -> str:
    inodes = max(1024, size // 4096)
    return f"size={size},nr_inodes={inodes},mode=0700,uid={uid},gid={gid}"


def check(disk: int | None, *, owns_workdir: bool, keep_workdir: bool) -> None:
    if disk is None:
        return
    if not owns_workdir:
        raise PolicyError("fs.disk", disk, "a sandbox whose workdir zviz creates (the limit makes the workdir a "
                          "tmpfs that goes away with the sandbox): drop workdir= or fs.disk")
    if keep_workdir:
        raise PolicyError("fs.disk", disk, "keep_workdir=False (the size-capped workdir is a tmpfs that goes away "
                          "with the sandbox): copy out what you need with read_file before it closes")


def mount(path: str, size: int, uid: int, gid: int) -> None:
    _kernel.mount_tmpfs(path, options(size, uid, gid))


def unmount(path: str) -> None:
    _kernel.umount_detach(path)


def unmount_overlay(path: str) -> None:
    """Detach a template's overlay from `path` at once and let its superblock's
    shutdown finish off the caller's path (root; every process that could use
    it is dead).

    Detaching (MNT_DETACH) a mount that is still referenced returns in about
    0.1 ms (measured on 6.18, like a tmpfs's); what costs is the overlay's
    shutdown when its last reference goes (overlayfs drops its layers' private
    mounts after a synchronous RCU grace period: kern_unmount_array), 0.3-15 ms
    on a loaded host, paid by whichever thread drops that reference, and the
    same with or without MNT_DETACH. So an O_PATH fd
    of the overlay's root is opened first (the reference), the overlay detached
    (`path` is a plain directory again at once: nothing mounted, its upper layer
    removable) and the fd closed by `_kernel.close_later`'s thread: the grace period is
    waited for there. The fd is never read through; the detached mount is in no
    mount namespace (every process of the sandbox, whose namespace had a copy,
    is dead), so nothing can reach it; if the process exits first, the kernel
    closes the fd and finishes the same shutdown."""
    try:
        ref = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        _kernel.umount_detach(path)
        return
    try:
        _kernel.umount_detach(path)
    except BaseException:
        os.close(ref)
        raise
    _kernel.close_later(ref)


def unmount_all(path: str, dev: int) -> None:
    """Detach whatever is mounted on `path` (a dead owner's workdir: a
    template's overlay, this tmpfs, or both) until it is on `dev` (its
    parent's filesystem) again: removing it first would empty the mounts and
    fail on their mount point. Root; `path` lies in zviz's private parent,
    out of every sandbox's reach."""
    for _ in range(4):
        try:
            if os.stat(path, follow_symlinks=False).st_dev == dev:
                return
        except OSError:
            return
        _kernel.umount_detach(path)


def used(path: str) -> tuple[int, int]:
    """(bytes used, bytes free) of the workdir's filesystem."""
    with contextlib.suppress(OSError):
        st = os.statvfs(path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize
    return 0, 0


def full(path: str) -> bool:
    """No room left for another page or no inode left."""
    with contextlib.suppress(OSError):
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize < 4096 or st.f_favail == 0
    return False
