"""A memory cgroup per sandbox: what RLIMIT_AS cannot see (memfd and shared
memory, tmpfs files, pipe and socket buffers, page cache) is charged to it.

Where one can be made:
- cgroup v2: a writable directory whose `cgroup.subtree_control` enables
  `memory` (a delegated subtree: `ZVIZ_CGROUP=/sys/fs/cgroup/...`, or the
  caller's own cgroup when it is such a directory). Preferred.
- cgroup v1 (hybrid hosts): the memory hierarchy's directory of the calling
  process, writable by root. Kernel memory (pipe and socket buffers) is
  charged to `memory.usage_in_bytes` on current kernels (checked on 6.18).
A sandbox's cgroup is a child of the caller's own cgroup, so the caller's
limits still bound its sandboxes. Every process of the sandbox is in it
before anything of the sandbox runs (see zviz/_stage.c): on v2 the stage
writes the child's pid into `cgroup.procs`; on v1 the child writes "0" into
the cgroup's `tasks` itself, its first step, because a pid written into
`cgroup.procs` write-locks the kernel's global cgroup_threadgroup_rwsem,
which waits for an RCU grace period (~10 ms of wall time per sandbox when no
migration ran just before), and a task moving itself through `tasks` does not
take that lock.

Nothing here runs per command: one mkdir and two writes per sandbox, one
rmdir at teardown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import signal
import time

import anyio

from ._kernel import OwnedFd

V1_ROOT_FALLBACK = "/sys/fs/cgroup/memory"


def _own_cgroups() -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process, relative to their roots."""
    v2 = v1 = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            num, ctrls, rel = line.rstrip("\n").split(":", 2)
            if num == "0" and ctrls == "":
                v2 = rel
            elif "memory" in ctrls.split(","):
                v1 = rel
    return v2, v1


def _mounts() -> tuple[str | None, str | None]:
    """(cgroup2 mount point, v1 memory mount point)."""
    v2 = v1 = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            if parts[2] == "cgroup2" and v2 is None:
                v2 = parts[1]
            elif parts[2] == "cgroup" and "memory" in parts[3].split(",") and v1 is None:
                v1 = parts[1]
    return v2, v1


@functools.cache
def where() -> tuple[str | None, str | None, str]:
    """(kind "v2"/"v1", parent directory, reason when none). Cached per process."""
    try:
        own2, own1 = _own_cgroups()
        mnt2, mnt1 = _mounts()
    except OSError as e:
        return None, None, f"cannot read this process's cgroups ({e.strerror})"
    reasons = []
    candidates = []
    if os.environ.get("ZVIZ_CGROUP"):
        candidates.append(os.environ["ZVIZ_CGROUP"])
    if mnt2 and own2 is not None:
        candidates.append(os.path.join(mnt2, own2.lstrip("/")))
    for c in candidates:
        try:
            with open(os.path.join(c, "cgroup.subtree_control")) as f:
                ctrls = f.read().split()
        except OSError:
            continue
        if "memory" in ctrls and os.access(c, os.W_OK):
            return "v2", c, "ok"
        reasons.append(f"{c} does not delegate the memory controller")
    if mnt1 and own1 is not None:
        c = os.path.join(mnt1, own1.lstrip("/"))
        if os.access(c, os.W_OK) and os.path.exists(os.path.join(c, "memory.limit_in_bytes")):
            return "v1", c, "ok"
        reasons.append(f"{c} (cgroup v1 memory) is not writable: needs root")
    if not reasons:
        reasons.append("no memory controller mounted")
    return None, None, ", ".join(reasons)


def unique_name() -> str:
    return f"zviz-{os.getpid()}-{secrets.token_hex(6)}"


class MemoryCgroup:
    """One sandbox's memory cgroup. `procs` is the open file a spawned child
    joins it by: v2 `cgroup.procs` (the stage writes the child's pid), v1
    `tasks` (the child writes "0")."""

    def __init__(self, kind: str, path: str, procs: OwnedFd, limit: int,
                 figures: tuple[OwnedFd | None, OwnedFd | None] = (None, None)) -> None:
        self.kind = kind
        self.path = path
        self.procs = procs
        self.limit = limit
        # its peak and OOM-kill files, opened with the rest: a figure is then one pread (~1 us), not an
        # open, a read and a close of a kernfs file through Python's io (~45-70 us each at a sandbox's end)
        self._figures = figures

    def __repr__(self) -> str:
        return f"<MemoryCgroup {self.kind} {self.path} limit={self.limit}>"

    @classmethod
    def create(cls, name: str, limit: int) -> tuple[MemoryCgroup | None, str]:
        """Make the cgroup with its limit, or say why not (None, reason)."""
        kind, parent, reason = where()
        if kind is None or parent is None:
            return None, reason
        _sweep(parent)
        path = os.path.join(parent, name)
        try:
            os.mkdir(path, 0o755)
        except OSError as e:
            return None, f"mkdir {path}: {e.strerror}"
        d = -1
        procs: OwnedFd | None = None
        peak: OwnedFd | None = None
        try:
            d = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            v2 = kind == "v2"
            if v2:
                _write(d, "memory.max", str(limit))
                with contextlib.suppress(FileNotFoundError):
                    _write(d, "memory.swap.max", "0")
            else:
                _write(d, "memory.limit_in_bytes", str(limit))
                with contextlib.suppress(FileNotFoundError):
                    _write(d, "memory.memsw.limit_in_bytes", str(limit))  # no swapping past it
            join = "cgroup.procs" if v2 else "tasks"  # v1: the child joins itself (see above)
            procs = OwnedFd(os.open(join, os.O_WRONLY | os.O_CLOEXEC, dir_fd=d), join)
            peak = _open_figure(d, "memory.peak" if v2 else "memory.max_usage_in_bytes")
            figures = (peak, _open_figure(d, "memory.events" if v2 else "memory.oom_control"))
        except OSError as e:
            for f in (procs, peak):
                if f is not None:
                    f.close()
            with contextlib.suppress(OSError):
                os.rmdir(path)
            return None, f"setting up {path}: {e.strerror}"
        finally:
            if d >= 0:
                os.close(d)
        return cls(kind, path, procs, limit, figures), "ok"

    def peak(self) -> int:
        """Largest total the sandbox held (bytes)."""
        if self._figures[0] is not None:
            return _pread_int(self._figures[0])
        return _read_int(self.path, "memory.peak" if self.kind == "v2" else "memory.max_usage_in_bytes")

    def usage(self) -> int:
        return _read_int(self.path, "memory.current" if self.kind == "v2" else "memory.usage_in_bytes")

    def oom_kills(self) -> int:
        """Processes the kernel killed for going over the limit."""
        name = "memory.events" if self.kind == "v2" else "memory.oom_control"
        try:
            held = self._figures[1]
            if held is not None:
                text = os.pread(held.fd, 4096, 0) if not held.closed else b""
            else:
                with open(os.path.join(self.path, name), "rb") as f:
                    text = f.read()
            for line in text.splitlines():
                k, _, v = line.partition(b" ")
                if k == b"oom_kill":
                    return int(v)
        except (OSError, ValueError):
            pass
        return 0

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return []

    async def remove(self) -> None:
        """Remove the cgroup once every process in it is dead: whatever is still
        in it (a daemon that escaped a process group) is killed first. Retries
        briefly (an exiting task leaves the cgroup a moment after its death)."""
        self.procs.close()
        for f in self._figures:  # (release read them before this and keeps them)
            if f is not None:
                f.close()
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    return  # left behind: named by `zviz check`'s sweep, if any; never raise from teardown
            if self.kind == "v2":
                with contextlib.suppress(OSError):
                    _write(self.path, "cgroup.kill", "1")
            else:
                for pid in self.pids():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            await anyio.sleep(0.005)


SWEEP_INTERVAL = 60.0  # s between two sweeps of one parent by one process
_swept: dict[str, float] = {}


def _sweep(parent: str) -> None:
    """Remove what a host process that died without its teardown (SIGKILL)
    left: `zviz-PID-*` cgroups of a PID that no longer exists. Only empty
    ones go (rmdir refuses the others); nothing is killed. At most once a
    minute per parent (listing it, with every live sandbox's cgroup and the
    controller's files, cost ~0.05 ms per sandbox opened)."""
    now = time.monotonic()
    if now - _swept.get(parent, -SWEEP_INTERVAL) < SWEEP_INTERVAL:
        return
    _swept[parent] = now
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith("zviz-"):
            continue
        pid = name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(parent, name))


def _write(path: str | int, name: str, value: str) -> None:
    """Write `value` into the cgroup's file `name` (`path`: the cgroup's path, or an fd of it)."""
    if isinstance(path, int):
        fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=path)
    else:
        fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _open_figure(cgroup: int, name: str) -> OwnedFd | None:
    """One of the cgroup's figure files, open for reading; None if this kernel has no such file."""
    try:
        return OwnedFd(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=cgroup), name)
    except FileNotFoundError:
        return None


def _pread_int(f: OwnedFd) -> int:
    """The number at the start of an open cgroup file (read afresh at offset 0), 0 once it is closed."""
    try:
        return int(os.pread(f.fd, 64, 0).split()[0]) if not f.closed else 0
    except (OSError, ValueError, IndexError):
        return 0


def _read_int(path: str, name: str) -> int:
    try:
        with open(os.path.join(path, name)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
