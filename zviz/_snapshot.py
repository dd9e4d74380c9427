"""Workspace templates: `Sandbox.snapshot(path)` saves a sandbox's workdir,
`open_sandbox(template=path)` starts a sandbox with those files in /workspace.

A template is a directory on the host, the caller's and not writable by
others (0700 when zviz makes it):

    PATH/zviz-template.json   the manifest: {"kind", "format", "zviz", "created", "files", "bytes", "skipped"}
    PATH/files/               the workdir's tree, owned by the caller

What a snapshot copies (the tree is the sandbox's, and hostile): it reads the
workdir only through directory fds opened beneath it (openat2 with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV) and single names
opened O_NOFOLLOW | O_NONBLOCK, so no symlink is ever followed, no path ever
leaves the tree, and nothing is written outside the new template:
- directories and regular files (data and holes, mode bits without set-uid,
  set-gid or sticky, mtime); hard links within the tree stay hard links;
- symlinks as symlinks (their target text, never followed);
- fifos, sockets and device nodes are skipped (their content never read),
  and so, for a root caller, is a file the sandbox could not read itself
  (a host file hard-linked in): both listed in `SnapshotInfo.skipped`;
- bounded: at most `max_files` entries, `max_bytes` bytes of data (a sparse
  file's holes cost nothing) and MAX_DEPTH levels, else TemplateError and
  nothing is left.
It is written to a hidden sibling and renamed into place when complete: a
template is whole or absent.

Starting from a template (`mount` / `populate`): for a root caller, an
overlay on the sandbox's fresh workdir (zviz/_stage.c, stage_mount_template),
lower = PATH/files read-only through an idmapped mount (the template's owner
shows as the sandbox's own uid), upper and work = directories of the workdir:
copy-on-write, as fast as an empty workdir whatever the template's size, and
nothing the sandbox does reaches the template. With fs.disk, the upper lies on
the size-capped tmpfs. A non-root caller cannot mount on the host: the
template is copied into the workdir (same copier, same rules; its cost grows
with the template's size).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import secrets
import stat
import time
from typing import Any

import attrs

from ._errors import SandboxSetupError, TemplateError
from ._rmtree import remove_tree
from ._version import __version__

FORMAT = 1
KIND = "zviz-template"
MANIFEST = "zviz-template.json"
FILES = "files"
UPPER, OVERLAY_WORK = "upper", "work"  # a template sandbox's workdir, under its overlay
MAX_DEPTH = 256
DEFAULT_MAX_FILES = 1_000_000
DEFAULT_MAX_BYTES = 16 << 30
MAX_MANIFEST = 1 << 20
TEMPLATE_STEPS = ("user namespace for the idmapping", "open the template (no symlinks)", "open_tree",
                  "idmap the template (mount_setattr)", "fsopen overlay", "lowerdir", "upperdir", "workdir",
                  "create the overlay", "fsmount", "move_mount onto the workdir")

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE = 0x01 | 0x02 | 0x04 | 0x08  # RESOLVE_NO_XDEV | NO_MAGICLINKS | NO_SYMLINKS | BENEATH
_FICLONE = 0x40049409


@attrs.frozen(kw_only=True)
class SnapshotInfo:
    """What `Sandbox.snapshot` saved."""

    path: str  # the template's directory
    files: int  # entries saved (directories, files, symlinks)
    bytes: int  # data bytes saved
    skipped: tuple[tuple[str, str], ...]  # (path relative to the workspace, why), first 100
    seconds: float


@attrs.frozen(kw_only=True)
class Template:
    """A checked template: its directory, its files' directory and owner."""

    path: str
    files: str
    uid: int
    gid: int
    manifest: dict[str, Any] = attrs.field(eq=False)


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _forbidden(real: str, workdirs: tuple[str, ...]) -> str | None:
    from ._workdir import base_path

    for w in (*workdirs, base_path(), base_path(True)):
        rw = os.path.realpath(w)
        if _beneath(real, rw) or _beneath(rw, real):
            return rw
    return None


# ---------------------------------------------------------------- using a template


def open_template(path: str | os.PathLike[str], *, read_write: tuple[str, ...] = ()) -> Template:
    """Check that `path` is a template this zviz can use, and the caller's
    alone; `read_write`: host paths the sandbox may write (a template there
    would be the sandbox's to change)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"template must be a path (str or os.PathLike), not {type(path).__name__}")
    given = os.fspath(path)
    if not os.path.lexists(given):
        raise TemplateError(given, "does not exist: make one with `await sb.snapshot(path)`")
    real = os.path.realpath(given)
    near = _forbidden(real, ())
    if near is not None:
        raise TemplateError(given, f"lies in or holds zviz's workdirs ({near}): a sandbox could change it; "
                            "snapshot to a path of your own")
    for rw in read_write:
        if _beneath(real, os.path.realpath(rw)):
            raise TemplateError(given, f"lies below {rw}, which the policy lets the sandbox write: keep templates "
                                "outside the sandbox's read-write paths")
    try:
        fd = os.open(real, _O_DIR)
    except OSError as e:
        raise TemplateError(given, f"is not a directory this caller can open ({e.strerror}): pass a template "
                            "made by `sb.snapshot(path)`") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise TemplateError(given, f"is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: a "
                                "template must be the caller's and not writable by others (another user could "
                                "change it under running sandboxes); chown/chmod it or snapshot again")
        manifest = _read_manifest(fd, given)
        try:
            fst = os.stat(FILES, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            fst = None
        if fst is None or not stat.S_ISDIR(fst.st_mode):
            raise TemplateError(given, f"has no {FILES}/ directory: it is damaged; snapshot again")
        if fst.st_uid != os.geteuid() or fst.st_mode & 0o022:
            raise TemplateError(given, f"{FILES}/ is owned by uid {fst.st_uid} with mode "
                                f"{stat.S_IMODE(fst.st_mode):o}: it must be the caller's and not writable by others")
    finally:
        os.close(fd)
    return Template(path=real, files=os.path.join(real, FILES), uid=fst.st_uid, gid=fst.st_gid, manifest=manifest)


def _read_manifest(fd: int, given: str) -> dict[str, Any]:
    try:
        mfd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
    except FileNotFoundError:
        raise TemplateError(given, f"is not a zviz template (no {MANIFEST}): pass a directory made by "
                            "`sb.snapshot(path)`") from None
    except OSError as e:
        raise TemplateError(given, f"its {MANIFEST} cannot be opened ({e.strerror}): snapshot again") from None
    try:
        if not stat.S_ISREG(os.fstat(mfd).st_mode):
            raise TemplateError(given, f"its {MANIFEST} is not a regular file: snapshot again")
        raw = os.read(mfd, MAX_MANIFEST + 1)
    finally:
        os.close(mfd)
    try:
        m = json.loads(raw) if len(raw) <= MAX_MANIFEST else None
    except ValueError:
        m = None
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise TemplateError(given, f"its {MANIFEST} is damaged or not zviz's: snapshot again")
    fmt = m.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise TemplateError(given, f"its {MANIFEST} has no valid format number: snapshot again")
    if fmt > FORMAT:
        raise TemplateError(given, f"was made by a newer zviz ({m.get('zviz')!r}, template format {fmt}; this zviz "
                            f"{__version__} reads format {FORMAT}): upgrade zviz, or snapshot again with this one")
    return m


def prepare_workdir(workdir: str) -> tuple[str, str]:
    """The upper and work directories of a root caller's template sandbox,
    made in its fresh workdir (owned like it: the sandbox's), covered by the
    overlay once mounted."""
    fd = os.open(workdir, _O_DIR)
    try:
        st = os.fstat(fd)
        os.mkdir(UPPER, 0o700, dir_fd=fd)
        os.chown(UPPER, st.st_uid, st.st_gid, dir_fd=fd, follow_symlinks=False)
        os.mkdir(OVERLAY_WORK, 0o700, dir_fd=fd)
    finally:
        os.close(fd)
    return os.path.join(workdir, UPPER), os.path.join(workdir, OVERLAY_WORK)


def mount(template: Template, workdir: str, uid: int, gid: int) -> None:
    """Mount the template's overlay on `workdir` (root: see the module's
    docstring). Nothing is mounted on failure."""
    from . import _stage

    upper, work = prepare_workdir(workdir)
    step, err = _stage.mount_template(os.fsencode(template.files), os.fsencode(upper), os.fsencode(work),
                                      os.fsencode(workdir), template.uid, template.gid, uid, gid)
    if step >= 0:
        what = TEMPLATE_STEPS[step] if step < len(TEMPLATE_STEPS) else f"step {step}"
        raise SandboxSetupError("mount-template", err, template.path,
                                f"cannot mount the template's overlay ({what}): zviz needs a kernel with "
                                "overlayfs, idmapped mounts and fsconfig layers (Linux >= 6.13), and root")


def populate(template: Template, workdir: str) -> SnapshotInfo:
    """A non-root caller's template sandbox: copy the template into its
    fresh workdir (the copier of snapshots, same rules)."""
    t0 = time.monotonic()
    src = os.open(template.files, _O_DIR)
    try:
        dst = os.open(workdir, _O_DIR)
        try:
            n, size, skipped = copy_tree(src, dst, max_files=DEFAULT_MAX_FILES, max_bytes=DEFAULT_MAX_BYTES,
                                         where=template.path, readable_by=None)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return SnapshotInfo(path=workdir, files=n, bytes=size, skipped=tuple(skipped[:100]),
                        seconds=time.monotonic() - t0)


# ---------------------------------------------------------------- making one


def check_destination(path: str | os.PathLike[str], workdir: str) -> tuple[str, str, str]:
    """(real parent, final name, shown path) of a snapshot's destination:
    absent or an empty directory, outside every zviz workdir."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    given = os.fspath(path)
    if not given:
        raise ValueError("path must not be empty")
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(given))), os.path.basename(
        os.path.abspath(given)))
    parent, name = os.path.split(real)
    if not name or name in (".", ".."):
        raise TemplateError(given, "names no new directory: give a path such as ./my-template")
    if not os.path.isdir(parent):
        raise TemplateError(given, f"its parent {parent} is not an existing directory: create it first")
    if os.path.lexists(real):
        if os.path.islink(real) or not os.path.isdir(real):
            raise TemplateError(given, "exists and is not a directory: choose a new path or remove it")
        if os.listdir(real):
            raise TemplateError(given, "exists and is not empty: choose a new path or remove it first")
    near = _forbidden(real, (workdir,))
    if near is not None:
        raise TemplateError(given, f"lies in or holds a sandbox's workdir ({near}): a template there would be the "
                            "sandbox's to change; snapshot to a path outside it")
    return parent, name, given


def snapshot(workdir: str, path: str | os.PathLike[str], *, readable_by: tuple[int, int] | None,
             max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES) -> SnapshotInfo:
    """Save `workdir` (its host path) as a template at `path` (blocking).
    `readable_by`: the sandbox's host uid/gid when they are not the caller's
    (root callers): a regular file they could not read is skipped."""
    for name, v in (("max_files", max_files), ("max_bytes", max_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, not {v!r}")
    t0 = time.monotonic()
    parent, name, given = check_destination(path, workdir)
    pfd = os.open(parent, _O_DIR)
    tmp = f".{name}.zviz-partial-{secrets.token_hex(4)}"
    try:
        os.mkdir(tmp, 0o700, dir_fd=pfd)
        try:
            tfd = os.open(tmp, _O_DIR, dir_fd=pfd)
            try:
                os.mkdir(FILES, 0o700, dir_fd=tfd)
                dst = os.open(FILES, _O_DIR, dir_fd=tfd)
                try:
                    src = os.open(workdir, _O_DIR)
                    try:
                        n, size, skipped = copy_tree(src, dst, max_files=max_files, max_bytes=max_bytes,
                                                     where=given, readable_by=readable_by)
                    finally:
                        os.close(src)
                finally:
                    os.close(dst)
                manifest = {"kind": KIND, "format": FORMAT, "zviz": __version__,
                            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                            "files": n, "bytes": size, "skipped": len(skipped)}
                mfd = os.open(MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=tfd)
                try:
                    os.write(mfd, json.dumps(manifest, indent=1).encode() + b"\n")
                    os.fsync(mfd)
                finally:
                    os.close(mfd)
            finally:
                os.close(tfd)
            try:
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise TemplateError(given, "appeared meanwhile and is not an empty directory: choose a new "
                                        "path") from None
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                remove_tree(pfd, tmp)
            raise
    finally:
        os.close(pfd)
    return SnapshotInfo(path=os.path.join(parent, name), files=n, bytes=size, skipped=tuple(skipped[:100]),
                        seconds=time.monotonic() - t0)


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


def copy_tree(src_root: int, dst_root: int, *, max_files: int, max_bytes: int, where: str,
              readable_by: tuple[int, int] | None) -> tuple[int, int, list[tuple[str, str]]]:
    """Copy the tree beneath the directory fd `src_root` into the (empty,
    ours) directory fd `dst_root` under the rules of the module's docstring.
    Returns (entries, data bytes, skipped)."""
    count = size = 0
    skipped: list[tuple[str, str]] = []
    links: dict[tuple[int, int], bytes] = {}
    dir_fixups: list[tuple[bytes, int, int, int]] = []  # (rel, mode, atime_ns, mtime_ns), applied last
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        depth = rel.count(b"/") + 1 if rel else 0
        try:
            sfd = _open_beneath(src_root, rel)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EAGAIN):
                skipped.append((os.fsdecode(rel), f"changed while copied ({e.strerror})"))
                continue
            if e.errno == errno.ENAMETOOLONG:
                raise TemplateError(where, f"{os.fsdecode(rel)[:80]!r}...: path too long to copy (shorten it)") \
                    from None
            raise
        try:
            dfd = _open_beneath(dst_root, rel)
            try:
                with os.scandir(sfd) as it:
                    names = [os.fsencode(e.name) for e in it]
                for nm in names:
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
                        dir_fixups.append((child, stat.S_IMODE(mode) & 0o777, st.st_atime_ns, st.st_mtime_ns))
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
            os.fchmod(d, stat.S_IMODE(fst.st_mode) & 0o777)  # never set-uid, set-gid or sticky
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
    try:
        import fcntl

        blocks = os.fstat(s).st_blocks * 512
        if size + min(blocks, length) <= max_bytes:
            fcntl.ioctl(d, _FICLONE, s)
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
