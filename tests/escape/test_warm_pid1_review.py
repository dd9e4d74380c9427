"""A warm snippet's pid 1 is the stage's C reaper (zviz/_stage.c child_warm,
warm_init), forked from the clone of the fork server that the stage made the
sandbox: a review of what it does after the policy's filter is in place
(calls the filter may refuse or notify, a fork the sandbox's limits may
refuse) and of what the snippet can do to it, each against the cold path
(`python -c` exec'd in a sandbox of the same policy)."""

from __future__ import annotations

import contextlib
import time

import attrs
import pytest
import trio

import zviz
from zviz import _syscalls, _warm

from ..conftest import IS_ROOT, child_pids

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the warm path's attack tests read other processes' /proc as root")

PY = "/usr/bin/python3"


@pytest.fixture(autouse=True)
def _no_servers_left():
    _warm.close_all()
    yield
    _warm.close_all()


def _server_pid() -> int:
    (server,) = _warm._servers.values()
    assert server._proc is not None
    return server._proc.pid


async def _no_children_left(pid: int, within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := sorted(child_pids(pid))) and time.monotonic() < deadline:
        await trio.sleep(0.02)
    return left


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
    result as cold, nothing left running, and the server serves on."""
    policy = zviz.Policy.python()
    policy = attrs.evolve(policy, limits=attrs.evolve(policy.limits, processes=1))
    cold = await zviz.run_snippet("print('hi')", policy, warm=False, python=PY)
    assert cold.exit_code == 125 and b"clone failed" in cold.stderr, cold
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
