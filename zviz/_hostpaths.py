"""Host paths as a sandbox's plan needs them: whether each of a policy's
paths exists and is a directory, and its real path (every symlink resolved).
`resolve` does it for all of a sandbox's paths at once, each component
looked at once; `real_path` for one. What changes after this look is the
stage's to find: it binds the real path and follows no symlink on the way."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable

from ._errors import PolicyError


def real_path(path: str) -> str:
    """os.path.realpath, but a path that changes while it is resolved (a
    symlink swapped for a directory between lstat and readlink: EINVAL) is
    the policy's problem, named, not a bare OSError. An existing path is
    resolved by the kernel (O_PATH open, the fd's name: 3 system calls, not
    an lstat per component); the rest takes os.path.realpath."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if name.startswith("/") and not name.endswith(" (deleted)"):
            return name
    try:
        return os.path.realpath(path)
    except OSError as e:
        raise PolicyError("fs", path, f"a path that stays put while the sandbox is set up "
                          f"(it changed while being resolved: {e.strerror})") from None


def resolve(paths: Iterable[str]) -> dict[str, tuple[bool, str]]:
    """Each existing path -> (whether it is a directory, its real path): what
    os.stat and os.path.realpath say, each component looked at once for all
    the paths (one lstat per distinct real prefix, one readlink per symlink).
    A policy's ~20 paths share most of theirs ("/usr", "/dev", "/tmp"), and
    resolving each on its own (`real_path`: the fd's name, a procfs lookup)
    cost ~0.25 ms per sandbox here. What changes meanwhile is the stage's to
    find: it binds the real path and follows no symlink on the way. A path
    that cannot be resolved plainly (a loop, more than the kernel's 40
    symlinks in one lookup, counting those taken from the cache, a component
    that changes under us) takes `real_path`, if os.stat can follow it
    (os.path.realpath has no such limit: tests/escape/test_blank_netns_review2.py)."""
    r = _Resolver()
    out: dict[str, tuple[bool, str]] = {}
    for p in paths:
        r.links = 0
        try:
            real = r.real(p)
        except _Unplain:
            try:  # (os.path.realpath resolves past the kernel's 40 links: os.stat says whether it can)
                os.stat(p)
                real = real_path(p)
            except (OSError, PolicyError):
                continue
        st = r.lstat(real) if real is not None else None
        if real is None or st is None or stat.S_ISLNK(st.st_mode):  # (absent, or dangling: os.stat fails there)
            continue
        out[p] = (stat.S_ISDIR(st.st_mode), real)
    return out


class _Unplain(Exception):
    pass


class _Resolver:
    """realpath with its lstats and readlinks kept for the next path."""

    def __init__(self) -> None:
        self._st: dict[str, os.stat_result | None] = {}
        # a path's real path, and the symlinks followed to resolve it (counted again at each use: the
        # kernel's 40 are per lookup)
        self._real: dict[str, tuple[str | None, int]] = {"/": ("/", 0)}
        self.links = 0  # symlinks followed for the current path

    def lstat(self, path: str) -> os.stat_result | None:
        if path not in self._st:
            try:
                self._st[path] = os.lstat(path)
            except OSError:
                self._st[path] = None
        return self._st[path]

    def real(self, path: str) -> str | None:
        """`path`'s real path; None where a component does not exist."""
        if not path.startswith("/"):
            raise _Unplain
        cur: str | None = "/"
        comps = path.split("/")
        for comp in comps:
            if comp == "":
                continue
            assert cur is not None
            if comp in (".", ".."):  # (only through a directory, as the kernel walks)
                if not self._is_dir(cur):
                    return None
                cur = cur if comp == "." else os.path.dirname(cur)  # (cur is real: its parent is too)
                continue
            cur = self._child(cur, comp)
            if cur is None:
                return None
        if comps[-1] == "" and len(comps) > 2 and not self._is_dir(cur):  # "dir/": a directory, or nothing
            return None
        return cur

    def _is_dir(self, real: str | None) -> bool:
        st = self.lstat(real) if real is not None else None
        return st is not None and stat.S_ISDIR(st.st_mode)

    def _child(self, parent: str, name: str) -> str | None:
        """The real path of `name` in the real directory `parent`."""
        key = parent.rstrip("/") + "/" + name
        if key in self._real:
            real, links = self._real[key]
            self.links += links
            if self.links > 40:  # (ELOOP)
                raise _Unplain
            return real
        before = self.links
        st = self.lstat(key)
        out: str | None
        if st is None:
            out = None
        elif not stat.S_ISLNK(st.st_mode):
            out = key
        else:
            self.links += 1
            if self.links > 40:  # a loop (ELOOP): real_path says what
                raise _Unplain
            try:
                target = os.readlink(key)
            except OSError:
                raise _Unplain from None  # (swapped meanwhile)
            out = self.real(target if target.startswith("/") else parent.rstrip("/") + "/" + target)
        self._real[key] = (out, self.links - before)
        return out
