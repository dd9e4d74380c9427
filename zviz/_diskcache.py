"""The start-up cache on disk: what one process learns and the next `zviz run`
need not redo (the host probe's user-namespace test, compiled seccomp filters).

A cached seccomp filter is security-critical: what is read back here is loaded
into every sandbox of that policy. So the cache trusts nothing it did not just
verify:

- it lives in a directory only the caller owns: `$ZVIZ_CACHE_DIR`, else
  `$XDG_CACHE_HOME/zviz`, else `~/.cache/zviz`, made 0700; it is reached one
  name at a time following no symlink but root's (a sandbox of a non-root
  caller runs as the caller and could re-point a link of the caller's) and
  used only when its owner is the caller and nobody else may write or list
  it (otherwise the cache is off: every lookup misses, nothing is written,
  and zviz computes as without it);
- every entry is a regular file of the caller's, not linked elsewhere, opened
  relative to that directory with O_NOFOLLOW, written under a temporary name
  and renamed into place (a reader sees a whole old entry or a whole new one;
  concurrent writers each write a whole entry, the last rename wins);
- an entry names its key (the caller's hash of everything that affects the
  value) and ends with the SHA-256 of all before it; a wrong magic, key, length
  or digest makes it a miss, and the caller recomputes and rewrites it. The
  caller validates the payload's shape too (_bpf.check_program);
- `stamp` is what the caller can only learn once it computed the value (the
  file identity of the libseccomp that compiled a filter): `fresh(stamp)` is
  checked on every hit.

Nothing here raises: an I/O error is a miss, and a failed write is ignored.
`zviz gc` empties the cache (`clear`).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import Any

from ._cachedir import location
from ._version import __version__

MAGIC = b"zviz-cache 1\n"
MAX_ENTRY = 1 << 20  # bytes; a filter is at most 4096 instructions (32 KiB)
_DIGEST = 32
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_PREFIX = ".tmp-"


def _make(path: str, depth: int = 2) -> None:
    """mkdir `path` 0700 (and its missing parents, `depth` of them), but never in
    a directory of another user's that is not sticky: root with another user's
    HOME (sudo -E) must not leave root-owned directories in it."""
    parent = os.path.dirname(path)
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        if depth == 0 or parent == path:
            raise
        _make(parent, depth - 1)
        st = os.stat(parent)
    if st.st_uid != os.geteuid() and not st.st_mode & stat.S_ISVTX:
        raise PermissionError(errno.EACCES, "not making a cache directory in another user's directory", parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def ensure_directory() -> None:
    """Make the cache directory now if it is missing (as a store would). A
    sandbox's plan masks zviz's directories where they exist (_plan.Host.hidden):
    one made only after the plan (by the same open's first filter store, or a
    later one's) would be in full view of a sandbox given a read-write parent,
    which for a non-root caller runs as the caller's uid and could rewrite the
    filters of every later sandbox. Never raises."""
    path = location()
    if path and not os.path.isdir(path):
        with contextlib.suppress(OSError):
            _make(path)


def key(kind: str, *parts: object) -> str:
    """The key of a `kind` entry made of `parts` (their repr: values of builtin
    types and frozen records), zviz's version always among them."""
    h = hashlib.sha256(repr((kind, __version__, parts)).encode())
    return f"{kind}-{h.hexdigest()[:40]}"


def file_stamp(path: str) -> list[Any]:
    """The identity of a file as it is now: [path, device, inode, size, mtime_ns]
    (a replaced or rewritten file has another). [path] when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return [path]
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _open_trusted(path: str) -> int:
    """An O_DIRECTORY fd of `path`, resolved one name at a time relative to
    the last directory's fd (O_NOFOLLOW), following only links root owns. A
    link of the caller's on the way (`~/.cache -> elsewhere`) lies in a tree
    the caller may give a sandbox to write, which runs as the caller's uid
    and could re-point it to a cache directory of its own, whose filters
    every later sandbox would load. OSError (ELOOP for such a link) when not."""
    todo = path.split("/")[::-1]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    hops = 0
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            st = os.fstat(nfd)
            if stat.S_ISLNK(st.st_mode):
                try:
                    hops += 1
                    if st.st_uid != 0 or hops > 40 or not any(n not in ("", ".") for n in todo):
                        # (the directory itself is never a link, root's included: as O_NOFOLLOW had it)
                        raise OSError(errno.ELOOP, "the cache directory is a link, or reached through one root does "
                                      "not own", path)
                    target = os.readlink("", dir_fd=nfd)  # (this very link: it cannot change under us)
                finally:
                    os.close(nfd)
                todo += target.split("/")[::-1]
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                continue
            os.close(fd)
            fd = nfd
        return os.open(".", _O_DIR, dir_fd=fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _directory(create: bool) -> Iterator[int | None]:
    """An fd of the cache directory if it is the caller's own and private, else None."""
    path = location()
    try:
        if not path:
            raise FileNotFoundError("no cache directory")
        if create and not os.path.isdir(path):
            _make(path)
        fd = _open_trusted(path)
    except OSError:
        yield None
        return
    try:
        st = os.fstat(fd)
        yield fd if st.st_uid == os.geteuid() and not st.st_mode & 0o077 else None
    finally:
        os.close(fd)


def _entry(name: str, header: dict[str, Any], payload: bytes) -> bytes:
    head = repr(header).encode()  # (read back with ast.literal_eval: literals only; json is ~2 ms of imports)
    body = MAGIC + len(head).to_bytes(4, "little") + head + len(payload).to_bytes(4, "little") + payload
    return body + hashlib.sha256(body).digest()


def _parse(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, payload) of a whole, undamaged entry; None for anything else."""
    if len(data) < len(MAGIC) + 8 + _DIGEST or not data.startswith(MAGIC):
        return None
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        return None
    i = len(MAGIC)
    n = int.from_bytes(body[i:i + 4], "little")
    head, i = body[i + 4:i + 4 + n], i + 4 + n
    m = int.from_bytes(body[i:i + 4], "little")
    payload = body[i + 4:]
    if len(head) != n or len(payload) != m:
        return None
    try:
        header = ast.literal_eval(head.decode())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return (header, payload) if isinstance(header, dict) else None


def load(name: str, fresh: Callable[[Any], bool] = lambda stamp: True) -> bytes | None:
    """The payload stored under `name` (a `key()`), or None: no entry, no usable
    cache directory, or an entry that is not a private regular file of the
    caller's, damaged, of another key, or whose stamp is no longer `fresh`."""
    with _directory(create=False) as d:
        if d is None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=d)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                    or st.st_nlink != 1 or st.st_size > MAX_ENTRY):
                return None
            data = os.read(fd, MAX_ENTRY + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
    parsed = _parse(data)
    if parsed is None:
        return None
    header, payload = parsed
    if header.get("key") != name:  # an entry copied or renamed from another key
        return None
    try:
        ok = fresh(header.get("stamp"))
    except (TypeError, ValueError, LookupError, OSError):  # a stamp of an unexpected shape: stale
        return None
    return payload if ok else None


def store(name: str, payload: bytes, stamp: Any = None) -> None:
    """Write the entry `name` atomically (a temporary file renamed over it)."""
    data = _entry(name, {"key": name, "stamp": stamp}, payload)
    if len(data) > MAX_ENTRY:
        return
    with _directory(create=True) as d:
        if d is None:
            return
        tmp = _TMP_PREFIX + secrets.token_hex(8)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d)
        except OSError:
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=d)


def clear(*, dry_run: bool = False) -> int:
    """Remove every entry (and any half-written one); the number of entries."""
    n = 0
    with _directory(create=False) as d:
        if d is None:
            return 0
        for name in os.listdir(d):
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                continue
            n += not name.startswith(_TMP_PREFIX)
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=d)
    return n
