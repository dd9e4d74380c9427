"""A warm snippet's pid 1 is the stage's C reaper (zviz/_stage.c child_warm,
warm_init), forked from the clone of the fork server that the stage made the
sandbox: a review of what it does after the policy's filter is in place
(calls the filter may refuse or notify, a fork the sandbox's limits may
refuse) and of what the snippet can do to it, each against the cold path
(`python -c` exec'd in a sandbox of the same policy)."""

from __future__ import annotations

import contextlib
import time

import anyio
import attrs
import pytest
import trio

import zviz
from zviz import _syscalls, _warm

from ..conftest import IS_ROOT
from .test_warm_attacks import _no_children_left, _no_servers_left, _server_pid  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the warm path's attack tests read other processes' /proc as root")

PY = "/usr/bin/python3"


def _without(*names: str) -> zviz.Policy:
    """Policy.python() whose filter allows all of @python but `names`."""
    policy = zviz.Policy.python()
    allow = tuple(sorted(_syscalls.GROUPS["@python"] - set(names)))
    return attrs.evolve(policy, syscalls=attrs.evolve(policy.syscalls, allow=allow))


# ------------------------------------------------------------------ calls after the filter


@pytest.mark.trio
@pytest.mark.parametrize("refused", ["prctl", "set_robust_list"])
async def test_a_policy_that_refuses_what_pid_1_calls_after_the_filter_runs_warm(monkeypatch, refused):
    """After the filter, pid 1 calls prctl(PR_SET_DUMPABLE) and libc's fork
    (whose child calls set_robust_list) before it closed the error pipe; a
    call the policy does not allow is a notification for the supervisor,
    and the supervisor gets the sandbox's listener only once the error pipe
    is closed: the spawn hung, the fork server with it (every other snippet
    of that server waited), until the host gave up on the server (REPLY_S,
    twice: 40 s) and the snippet failed with ServerGone. Cold, the same
    policy runs (zviz-init makes the same call once the supervisor is there:
    refused, the program goes on)."""
    monkeypatch.setattr(_warm, "REPLY_S", 3.0)  # (a hang fails in ~6 s, not 40)
    policy = _without(refused)
    code = "import os; print(os.getpid(), os.getppid())"
    cold = await zviz.run_snippet(code, policy, warm=False, python=PY)
    assert (cold.exit_code, cold.stdout) == (0, b"2 1\n"), cold
    t0 = time.monotonic()
    warm = await zviz.run_snippet(code, policy, warm=True, python=PY)
    assert (warm.exit_code, warm.stdout, warm.stderr) == (cold.exit_code, cold.stdout, cold.stderr)
    assert time.monotonic() - t0 < 2.5
    assert refused in warm.denials, warm.denials  # refused, and reported, as for the cold one


# ------------------------------------------------------------------ the snippet's fork fails


@pytest.mark.trio
async def test_a_snippet_its_sandbox_cannot_fork_fails_in_the_sandbox_as_a_cold_one():
    """limits.processes=1 (RLIMIT_NPROC of the sandbox's user): pid 1 cannot
    fork the snippet. Cold, zviz-init says so on the program's stderr and
    exits 125. Warm, the failed fork was reported as a set-up failure of
    step 'execve' raised as ResourceExhausted, which blamed the host ("The
    host ran out of processes... raise `ulimit -u`") for the policy's own
    limit; and warm=None did not fall back to the cold result. Now the same
    result as cold, whose words now name the errno and the likely limit,
    nothing left running, and the server serves on."""
    policy = zviz.Policy.python()
    policy = attrs.evolve(policy, limits=attrs.evolve(policy.limits, processes=1))
    cold = await zviz.run_snippet("print('hi')", policy, warm=False, python=PY)
    assert cold.exit_code == 125 and b"clone failed: errno 11" in cold.stderr, cold
    assert b"limits.processes" in cold.stderr  # (zviz-init said only "clone failed")
    for warm in (True, None):
        r = await zviz.run_snippet("print('hi')", policy, warm=warm, python=PY)
        assert (r.exit_code, r.stdout, r.stderr) == (cold.exit_code, cold.stdout, cold.stderr), (warm, r)
    server = _server_pid()
    assert await _no_children_left(server) == []
    after = await zviz.run_snippet("print('next')", warm=True, python=PY)
    assert (after.exit_code, after.stdout) == (0, b"next\n") and _server_pid() == server


# ------------------------------------------------------------------ pid 1 killed before it reported


@pytest.mark.trio
async def test_a_timed_out_warm_snippet_reads_killed_as_a_cold_one():
    """The host kills pid 1 at the timeout; it dies without its status
    record, and the host took its wait status from wait4: a cold pid 1 is
    the host's child (SIGKILL), but a warm one is the fork server's, so
    wait4 failed (ECHILD) and the result read `exit_code=127, signal=None`,
    a command not found, not a kill. (And a wait4 on a pid that is not ours
    is a wait on whatever child of the host gets that number next, once
    the server has reaped it.) Now, as for a zygote's run, which is not our
    child either: no record, killed."""
    results = {}
    for warm in (False, True):
        results[warm] = await zviz.run_snippet("while True: pass", warm=warm, python=PY, timeout=0.5)
    for warm, r in results.items():
        assert r.timed_out and r.limit == "wall_s", (warm, r)
        assert (r.exit_code, r.signal) == (None, 9), (warm, r)


@pytest.mark.trio
async def test_a_killed_warm_snippet_reads_killed_as_a_cold_one():
    """Process.kill() on a running snippet: the same, as cold (a sandbox
    without a zygote: the command's pid 1 is the host's child)."""
    from zviz._sandbox import _open_sandbox

    code = "import time; print('up', flush=True); time.sleep(30)"
    results = {}
    for warm in (False, True):
        async with _open_sandbox(zviz.Policy.python(), zygote=False) as sb, contextlib.AsyncExitStack() as stack:
            if warm:
                proc = await stack.enter_async_context(_warm.started(sb, PY, code, {}, stdin=False, insist=True))
            else:
                proc = await stack.enter_async_context(await sb.start([PY, "-c", code], stdin=False))
            assert await proc.stdout_stream().receive_some(10) == b"up\n"
            proc.kill()
            results[warm] = await proc.wait()
    assert results[True] == results[False] == -9, results


# ------------------------------------------------------------------ what held (guards of the C pid 1)


@pytest.mark.trio
async def test_pid_1_holds_no_copy_of_the_snippets_stdio():
    """Once the program closes its stdio (still running), the host reads EOF
    on stdout and stderr and a write to its stdin breaks. A warm snippet's
    pid 1 closes 0-2 after its fork; a cold one's, zviz-init without a
    zygote, kept its copies until the program's end (EOF 4 s late here, and
    the stdin writer blocked as long). Now both as a zygote's run-init."""
    from zviz._sandbox import _open_sandbox

    code = "import os, time\nfor fd in (0, 1, 2): os.close(fd)\ntime.sleep(4)\n"
    for warm in (False, True):
        async with _open_sandbox(zviz.Policy.python(), zygote=False) as sb, contextlib.AsyncExitStack() as stack:
            if warm:
                proc = await stack.enter_async_context(_warm.started(sb, PY, code, {}, stdin=True, insist=True))
            else:
                proc = await stack.enter_async_context(await sb.start([PY, "-c", code]))
            with trio.fail_after(2):
                assert await proc.stdout_stream().receive_some(10) == b""
                assert await proc.stderr_stream().receive_some(10) == b""
                with pytest.raises(anyio.BrokenResourceError):
                    await proc.stdin_stream().send_all(b"x" * (1 << 20))
            assert proc.returncode is None, warm  # still sleeping: the EOF was the snippet's own close
            proc.kill()


@pytest.mark.trio
async def test_many_snippets_at_once_each_get_their_own_status():
    """The status record is pid 1's, of its own snippet: 24 snippets at once
    from one host process, each with its own exit code or signal."""
    results: dict[int, zviz.RunResult] = {}

    async def one(i: int) -> None:
        end = "os.kill(os.getpid(), 9)" if i % 4 == 0 else f"sys.exit({i + 100})"
        results[i] = await zviz.run_snippet(f"import os, sys\nprint({i}, flush=True)\n{end}", warm=True, python=PY,
                                            timeout=20)

    async with trio.open_nursery() as n:
        for i in range(24):
            n.start_soon(one, i)
    for i, r in results.items():
        want = (None, 9) if i % 4 == 0 else (i + 100, None)
        assert (r.exit_code, r.signal, r.stdout) == (*want, f"{i}\n".encode()), (i, r)
    assert await _no_children_left(_server_pid()) == []


_REACH_PID_1 = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(*a):
    r = libc.syscall(*a)
    return r if r >= 0 else -ctypes.get_errno()
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local = iovec(ctypes.cast(buf, ctypes.c_void_p), 8)
remote = iovec(id(buf), 8)  # (pid 1 is a copy of this process's memory)
out = {}
pidfd = call(434, 1, 0)  # pidfd_open
out["pidfd_getfd"] = call(438, pidfd, 3, 0)  # its status pipe
out["pidfd_send_signal"] = call(424, pidfd, 9, None, 0)  # (pid 1 of a namespace ignores it)
out["process_vm_readv"] = call(310, 1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
out["process_vm_writev"] = call(311, 1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
out["ptrace_attach"] = call(101, 16, 1, 0, 0)
for path, flags in (("/proc/1/mem", os.O_RDWR), ("/proc/1/fd/3", os.O_WRONLY), ("/proc/1/environ", os.O_RDONLY)):
    try:
        os.close(os.open(path, flags))
        out[path] = 0
    except OSError as e:
        out[path] = -e.errno
print(json.dumps(out), flush=True)
"""


@pytest.mark.trio
async def test_even_a_policy_allowing_ptrace_and_pidfd_getfd_does_not_reach_pid_1():
    """pid 1 (undumpable, made so in C before the fork) under a policy that
    allows the calls on other processes (allow_dangerous): no fd of it (its
    status pipe: a forged record), no read or write of its memory, no
    ptrace; the SIGKILL is ignored (pid 1 of the namespace). As cold."""
    import errno
    import json

    policy = attrs.evolve(zviz.Policy.python(), syscalls=zviz.Syscalls(
        allow=("@python", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "process_vm_readv",
               "process_vm_writev", "ptrace"), allow_dangerous=True))
    got = {}
    for warm in (False, True):
        r = await zviz.run_snippet(_REACH_PID_1, policy, warm=warm, python=PY)
        assert r.exit_code == 0, (warm, r.stderr)
        got[warm] = json.loads(r.stdout)
    assert got[True] == got[False], got
    assert got[True]["pidfd_send_signal"] == 0  # sent, and ignored: the snippet is still here to say so
    for what, value in got[True].items():
        if what != "pidfd_send_signal":
            assert value in (-errno.EPERM, -errno.EACCES), (what, got)
