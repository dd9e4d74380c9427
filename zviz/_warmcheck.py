"""Which interpreters and environments a warm snippet may use (zviz/_warm.py).
The warm path starts the policy's Python ON THE HOST, unconfined (-I -S), so
what its start-up reads (its binary and standard library, the dynamic
loader's and libc's variables) must be out of every sandbox's reach, and what
a fork of a started interpreter cannot redo keeps a snippet cold. Checks over
paths and environments (they read files and links, never run anything); each
answers with the reason, or None (docs/security-model.md, "Warm snippets").
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping

# variables that -I ignores and the fork sets up itself (_warmboot._as_fresh_interpreter)
HANDLED_VARS = frozenset({"PYTHONPATH", "PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
                          "PYTHONNOUSERSITE"})
# The only variables the server's own start-up sees: its locale (the encodings
# of stdio and of the file system, which every fork keeps). The rest of the
# sandbox's environment reaches only the snippet's os.environ. The server runs
# on the host, unconfined, and the dynamic loader and libc act on their
# variables before any code of ours: LD_PRELOAD naming a library a sandbox
# wrote was that library run on the host, as root (GCONV_PATH, LOCPATH,
# LD_AUDIT, GLIBC_TUNABLES, LD_DEBUG_OUTPUT... likewise).
START_VARS = frozenset({"LANG", "LC_ALL", "LC_CTYPE"})
# variables the dynamic loader and libc read as a program starts: a fork of a
# started interpreter cannot apply them (the sandboxed `python -c` would)
LOADER_PREFIXES = ("LD_", "GLIBC_TUNABLES", "MALLOC_", "GCONV_PATH", "LOCPATH")


def why_not_env(env: Mapping[str, str]) -> str | None:
    """A start-up variable a fork cannot honour (it is read before main)."""
    bad = sorted(k for k in env if k.startswith("PYTHON") and k not in HANDLED_VARS)
    if bad:
        return (f"the environment sets {', '.join(bad)}, which Python reads at start-up and a fork of a started "
                f"interpreter cannot apply (the warm path honours only {', '.join(sorted(HANDLED_VARS))})")
    bad = sorted(k for k in env if k.startswith(LOADER_PREFIXES))
    if bad:
        return (f"the environment sets {', '.join(bad)}, which the dynamic loader or libc reads as a program "
                "starts and a fork of a started interpreter cannot apply")
    # a locale named by a path is loaded from that file, by the server, on the host (START_VARS)
    bad = sorted(k for k in START_VARS if "/" in env.get(k, ""))
    if bad:
        return f"the environment's {', '.join(bad)} names a locale by a path, which the host would load"
    return None


def start_env(env: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: the locale of `env` (checked by why_not_env), nothing else."""
    return {k: v for k, v in env.items() if k in START_VARS}


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b + "/") or b.startswith(a + "/") or "/" in (a, b)


def install_roots(python: str) -> tuple[str, ...]:
    """The directories an interpreter's start-up reads code from: its prefix
    (bin/..), the real binary's, and a venv's base (pyvenv.cfg's home): its
    standard library (site-packages never run on the host: -S)."""
    roots = {os.path.dirname(os.path.dirname(python)),
             os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    # As Python's getpath reads it: bin/../pyvenv.cfg, else bin/pyvenv.cfg;
    # the key in any case ("Home" counts); a relative home against the cwd,
    # which is the server's, "/". (Both files are read: a superset is safe.)
    for cfg in (os.path.join(os.path.dirname(os.path.dirname(python)), "pyvenv.cfg"),
                os.path.join(os.path.dirname(python), "pyvenv.cfg")):
        try:
            with open(cfg, encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, equals, value = line.partition("=")
                    if equals and key.strip().lower() == "home" and value.strip():
                        roots.add(os.path.dirname(os.path.realpath(os.path.join("/", value.strip()))))
        except OSError:
            pass
    return tuple(sorted(os.path.realpath(r) for r in roots))


# A template (zviz/_snapshot.py: MANIFEST at its top, and the name of one being made)
TEMPLATE_MANIFEST = "zviz-template.json"
TEMPLATE_PARTIAL = ".zviz-partial-"

# The file a warm server execs on the host: a CPython's name (python3, python3.12, python3.13t...).
_PYTHON_NAME = re.compile(r"python(?:\d+(?:\.\d+)?)?[a-z]?")


def named_like_python(command: str) -> bool:
    """Whether a command line's program is named like a CPython (`python3`,
    `/usr/bin/python3.11`): `zviz run -- PROGRAM -c CODE` is tried as a warm
    snippet only then (`sh -c`, `bash -c` are not; why_not_python checks the
    file itself later)."""
    return bool(_PYTHON_NAME.fullmatch(os.path.basename(command)))


def why_not_python(python: str, writable: tuple[str, ...]) -> str | None:
    """`python` (a host path, the same inside) must be a Python that no
    sandbox can have written: the server starts it on the host. A name check
    first: the server's command line (`-I BOOT STAGE FD`) given to another
    program is that program's, run on the host as zviz's user (run_snippet's
    python="rm" removed zviz's own files; in a sandbox it would be harmless)."""
    name = os.path.basename(os.path.realpath(python))
    if not _PYTHON_NAME.fullmatch(name):
        return (f"{python} is {name}, not a Python interpreter's file name (python3, python3.N); the warm path runs it "
                "on the host with the server's arguments, so it starts only an interpreter")
    roots = install_roots(python)
    for root in roots:
        for w in writable:
            if _overlaps(root, os.path.realpath(w)):
                return (f"{python} is installed under {root}, which the policy lets sandboxes write ({w}); "
                        "the warm path starts the interpreter on the host, so it must be one no sandbox can change")
    return why_not_owned(python, roots)


_own: list[frozenset[str]] = []


def _own_roots() -> frozenset[str]:
    """The installation of the interpreter running zviz (and its venv's base)."""
    if not _own:
        exes = {sys.executable, getattr(sys, "_base_executable", sys.executable)}
        _own.append(frozenset(r for e in exes if e for r in install_roots(e)))
    return _own[0]


def _walk(path: str) -> tuple[list[str], str] | None:
    """The directories a lookup of the absolute `path` reads entries of,
    following its links as exec and open do, and where it ends (a path that
    does not exist ends at its last existing directory); None: a link loop."""
    dirs, cur, todo, links = ["/"], "/", path.split("/")[::-1], 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            cur = os.path.dirname(cur)  # (cur holds no link: its parent is its real one)
            continue
        nxt = cur + name if cur == "/" else cur + "/" + name
        try:
            mode = os.lstat(nxt).st_mode
        except OSError:
            return dirs, cur
        if stat.S_ISLNK(mode):
            links += 1
            if links > 40:
                return None
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            todo.extend(target.split("/")[::-1])
            continue
        cur = nxt
        if any(t not in ("", ".") for t in todo):
            dirs.append(cur)
    return dirs, cur


def why_not_owned(python: str, roots: tuple[str, ...]) -> str | None:
    """Every file and directory the server's start-up looks up on the way to
    its binary, its installation and a venv's pyvenv.cfg must be root's (or,
    for zviz's own interpreter, zviz's user's) and writable by nobody else:
    the policy's own paths are not all a sandbox may ever have written (an
    earlier sandbox given a directory read-write, whose `python3` a later
    policy lists read-only, had that file run as root on the host)."""
    owners = {0, os.geteuid()} if _own_roots().issuperset(roots) else {0}
    top = os.path.dirname(os.path.dirname(python))
    paths = [python, *roots, os.path.join(top, "pyvenv.cfg"), os.path.join(os.path.dirname(python), "pyvenv.cfg")]
    passed: set[str] = set()  # directories passed through, already looked at
    for path in paths:
        walked = _walk(path)
        if walked is None:
            return f"{path} is a loop of links"
        dirs, end = walked
        for p in (*(d for d in dirs if d not in passed), end):
            try:
                st = os.lstat(p)
            except OSError as e:
                return f"{p} cannot be looked at ({e.strerror})"
            writable = st.st_mode & 0o022
            if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0 and p != end:
                # passed through /tmp's kind: its entries are their owners' to replace (checked next), but a
                # path that ends there (an installation's prefix, where a missing one would be) anyone may make
                writable = False
            if st.st_uid not in owners or writable:
                return (f"{python} is reached through {p} (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}), "
                        "which is not root's alone, so a sandbox may have written it; the warm path starts "
                        "the interpreter on the host, so it runs only an installation no sandbox can have changed")
            if stat.S_ISDIR(st.st_mode) and (TEMPLATE_PARTIAL in os.path.basename(p)
                                             or os.path.lexists(os.path.join(p, TEMPLATE_MANIFEST))):
                return (f"{python} lies in a zviz template ({p}): its files are a sandbox's, copied by zviz as "
                        "the caller (root's, 0755); the warm path starts the interpreter on the host, so it runs "
                        "only an installation no sandbox can have written")
        passed.update(dirs)
    return None


# limits.memory is also RLIMIT_AS, and a warm snippet starts with its server's address space (~17 MB here,
# ~3 MB more than a cold interpreter's): below this much over it, the snippet starts cold
MEMORY_HEADROOM = 32 << 20


def why_not_memory(limit: int | None, server_vm_size: int) -> str | None:
    """Why a fork of a server of that address space (bytes; 0: unknown) may not run under `limit`, or None."""
    if limit is None or not server_vm_size or limit >= server_vm_size + MEMORY_HEADROOM:
        return None
    return (f"limits.memory ({limit >> 20} MiB) is also each process's address space (RLIMIT_AS), and a warm "
            f"snippet starts with its interpreter's ({server_vm_size >> 20} MiB), which would leave it less than "
            f"{MEMORY_HEADROOM >> 20} MiB to allocate")


def vm_size(pid: int) -> int:
    """A process's address space in bytes (VmSize), or 0."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
