"""Workspace templates: `Sandbox.snapshot(path)` saves a sandbox's workdir,
`open_sandbox(template=path)` starts a sandbox with those files in /workspace.

A template is a directory on the host, the caller's and not writable by
others (0700 when zviz makes it):

    PATH/zviz-template.json   the manifest: {"kind", "format", "zviz", "created", "files", "bytes", "skipped"}
    PATH/files/               the workdir's tree, owned by the caller

What a snapshot copies, and how (the tree is the sandbox's, and hostile):
zviz/_copytree.py. It is written to a hidden sibling and renamed into place
when complete: a template is whole or absent.

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
import errno
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from typing import Any

import attrs

from ._copytree import Stopped, copy_tree
from ._errors import SandboxSetupError, TemplateError
from ._rmtree import remove_tree
from ._version import __version__

FORMAT = 1
KIND = "zviz-template"
MANIFEST = "zviz-template.json"
FILES = "files"
UPPER, OVERLAY_WORK = "upper", "work"  # a template sandbox's workdir, under its overlay
DEFAULT_MAX_FILES = 1_000_000
DEFAULT_MAX_BYTES = 16 << 30
MAX_MANIFEST = 1 << 20
TEMPLATE_STEPS = ("user namespace for the idmapping", "open the template (no symlinks)", "open_tree",
                  "idmap the template (mount_setattr)", "fsopen overlay", "lowerdir", "upperdir", "workdir",
                  "create the overlay", "fsmount", "move_mount onto the workdir")

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
        raise TemplateError(given, "does not exist: make one with `await sb.snapshot(path)` (or `zviz run "
                            "--snapshot PATH`)")
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


def mount(template: Template, workdir: str, uid: int, gid: int) -> bytes:
    """Mount the template's overlay on `workdir` (root: see the module's
    docstring). Nothing is mounted on failure. Returns the helper process
    that made the idmapping, for `_kernel.reap_template_helper` (once, at teardown: not waiting for
    its exit here keeps a scheduler round trip off the sandbox's start)."""
    from . import _kernel

    upper, work = prepare_workdir(workdir)
    step, err, helper = _kernel.mount_template(template.files, upper, work, workdir, (template.uid, template.gid),
                                               (uid, gid))
    if step >= 0:
        what = TEMPLATE_STEPS[step] if step < len(TEMPLATE_STEPS) else f"step {step}"
        raise SandboxSetupError("mount-template", err, template.path,
                                f"cannot mount the template's overlay ({what}): zviz needs a kernel with "
                                "overlayfs, idmapped mounts and fsconfig layers (Linux >= 6.13), and root")
    assert helper is not None
    return helper


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
        if os.path.islink(real):  # (never followed: where it points may change under the copy)
            raise TemplateError(given, f"is a symbolic link (to {os.readlink(real)!r}): give a path that is not "
                                "one, e.g. the directory it names, or remove it")
        if not os.path.isdir(real):
            raise TemplateError(given, "exists and is not a directory: choose a new path or remove it")
        if os.listdir(real):
            raise TemplateError(given, "exists and is not empty: choose a new path or remove it first")
    near = _forbidden(real, (workdir,))
    if near is not None:
        raise TemplateError(given, f"lies in or holds a sandbox's workdir ({near}): a template there would be the "
                            "sandbox's to change; snapshot to a path outside it")
    return parent, name, given


def snapshot(workdir: str, path: str | os.PathLike[str], *, readable_by: tuple[int, int] | None,
             max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES,
             stop: Callable[[], bool] | None = None) -> SnapshotInfo:
    """Save `workdir` (its host path) as a template at `path` (blocking).
    `readable_by`: the sandbox's host uid/gid when they are not the caller's
    (root callers): a regular file they could not read is skipped. `stop()`
    True (the sandbox is being closed, its workdir about to go): the copy
    stops with `_copytree.Stopped` and nothing is left at `path`."""
    for name, v in (("max_files", max_files), ("max_bytes", max_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, not {v!r}")
    t0 = time.monotonic()
    parent, name, given = check_destination(path, workdir)
    tmp = f".{name}.zviz-partial-{secrets.token_hex(4)}"
    try:
        pfd = os.open(parent, _O_DIR)
    except OSError as e:
        raise TemplateError(given, f"its parent {parent} cannot be opened ({e.strerror}): choose another") from None
    try:
        try:
            os.mkdir(tmp, 0o700, dir_fd=pfd)
        except OSError as e:  # (read-only, not yours, no room, /proc, /sys...)
            raise TemplateError(given, f"no directory can be made in {parent} ({e.strerror}): choose a "
                                "directory you may write in") from None
        try:
            tfd = os.open(tmp, _O_DIR, dir_fd=pfd)
            try:
                os.mkdir(FILES, 0o700, dir_fd=tfd)
                dst = os.open(FILES, _O_DIR, dir_fd=tfd)
                try:
                    src = os.open(workdir, _O_DIR)
                    try:
                        n, size, skipped = copy_tree(src, dst, max_files=max_files, max_bytes=max_bytes,
                                                     where=given, readable_by=readable_by, stop=stop)
                    finally:
                        os.close(src)
                finally:
                    os.close(dst)
                import datetime

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
            if stop is not None and stop():  # (the last moment to give up: nothing is at `path` yet)
                raise Stopped()
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
