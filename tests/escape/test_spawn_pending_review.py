"""Review of the stage spawn in two halves (zviz/_stage.c stage_spawn_start /
finish, _kernel.PendingSpawn): what changed now that the parent goes on (and
starts other spawns) while a child sets itself up in its memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd (Linux 5.3+)")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


# Two sandboxes open together in one process: the first's zygote child is
# stopped half-way through its set-up (before its session step, where it sets
# its parent-death signal and checks that its parent still lives), the
# second's is started (and stopped) meanwhile, and the process dies.
_DYING_PARENT = textwrap.dedent("""
    import os, signal, sys
    import anyio, zviz
    from zviz import _kernel, _stage

    zviz.set_pool_size(0)
    real, pids = _kernel.start_spawn, []

    def stopped(*a, **kw):
        p = real(*a, **kw)
        pid = _stage.pending_info(p._pending)[1]
        os.kill(pid, signal.SIGSTOP)
        pids.append(pid)
        if len(pids) == 2:
            print(*pids, flush=True)
            os._exit(0)
        return p

    _kernel.start_spawn = stopped

    async def one():
        async with zviz.open_sandbox(zviz.Policy.python()):
            await anyio.sleep(30)

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)

    anyio.run(main)
""")


def test_a_child_whose_parent_died_before_its_session_step_does_not_run_on(tmp_path):
    """step_session: a parent dead before PR_SET_PDEATHSIG would never send
    the signal, so the child checks that its parent lives (the go pipe's
    hang-up). With spawns pending together, a later child holds a copy of an
    earlier one's go pipe (the fd table is copied at clone) until its own
    exec: the earlier child saw no hang-up and ran on as an orphan, its
    sandbox's supervisor gone (no time limit, nobody to close it)."""
    env = dict(os.environ, TMPDIR=tempfile.gettempdir(), PYTHONPATH=REPO)
    with open(tmp_path / "out", "w+") as out:  # (a file: the stopped children hold copies of its fd)
        subprocess.run([sys.executable, "-c", _DYING_PARENT], env=env, stdout=out, timeout=60, cwd=REPO)
        out.seek(0)
        first, second = (int(x) for x in out.read().split())
    try:
        st = _status(first)
        if st.get("State", "").startswith("T") is False or st.get("NoNewPrivs") != "0":
            pytest.skip(f"the first child was not stopped before its session step: {st.get('State')}")
        os.kill(first, signal.SIGCONT)  # the second stays stopped, holding the first's go pipe
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = _status(first)
            if not st or st["State"].startswith(("Z", "X")):
                break  # refused: it died at its session step
            if st.get("NoNewPrivs") == "1":
                pytest.fail("an orphaned child went on setting up its sandbox (past its session step)")
            time.sleep(0.01)
        else:
            pytest.fail(f"the first child neither died nor went on: {st}")
    finally:
        for pid in (first, second):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        from zviz import _workdir

        _workdir.sweep()  # the dead host's workdirs (zviz gc)


def test_a_kill_from_another_thread_meets_the_pending_set_changing(monkeypatch):
    """Runner.kill() runs from any thread (a sandbox collected elsewhere:
    _lifecycle.collected, "a signal is safe from any thread"), while the
    loop's tasks add and remove pending spawns: its loop over them must not
    fail half-way (RuntimeError: set changed size during iteration), which
    left the close request unsent. The loop thread's step is simulated at
    the moment a thread switch can put it: inside the loop, after one kill."""
    import trio

    import zviz
    from zviz import _kernel, _sandbox

    async def main():
        zviz.set_pool_size(0)
        sb = await _sandbox._create(zviz.Policy.python())
        runner = sb._runner
        for _ in range(50):  # the service task starts the zygote's spawn in a step or two
            if runner._pending:
                break
            await trio.lowlevel.checkpoint()
        if not runner._pending:
            await sb.aclose()
            pytest.skip("the zygote's spawn was not pending")
        real = _kernel.PendingSpawn.kill

        def kill(self):
            real(self)
            runner._pending.discard(self)  # the spawning task's `finally`, on the loop thread meanwhile

        monkeypatch.setattr(_kernel.PendingSpawn, "kill", kill)
        try:
            runner.kill()
        finally:
            monkeypatch.undo()
            await sb.aclose()

    trio.run(main)


# Run as pid 1 of a pid namespace of its own (unshare), where the next pid
# can be chosen (ns_last_pid): a pending spawn's child fails at its exec and
# is reaped by someone else (a host program's own waitpid(-1): _process.py
# allows for one), its pid goes to another child of the host, and zviz then
# kills, aborts or finishes the pending spawn.
_REUSED_PID = textwrap.dedent("""
    import os, subprocess, sys, time
    from zviz import _kernel, _stage
    from zviz._spec import Command, StageSpec

    how = sys.argv[1]
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    cmd = Command(exe=b"/nonexistent/zviz", argv=(b"x",), envp=(), cwd=b"/", stdin=null, stdout=null,
                  stderr=null)
    pending = _stage.spawn_start(StageSpec().pack(), cmd.pack())
    _fd, pid = _stage.pending_info(pending)
    os.waitpid(pid, 0)  # the other reaper
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    other = subprocess.Popen(["sleep", "10"])
    assert other.pid == pid, (other.pid, pid)
    if how == "kill":
        _kernel.PendingSpawn(pending, StageSpec(), cmd).kill()
    elif how == "abort":
        _stage.spawn_abort(pending)
    else:
        try:
            _stage.spawn_finish(pending)
        except _stage.SetupError:
            pass
    time.sleep(0.1)
    print("alive" if other.poll() is None else f"killed {other.returncode}", flush=True)
    other.kill()
""")


@pytest.mark.parametrize("how", ["kill", "abort", "finish"])
def test_a_pending_spawn_never_signals_or_waits_for_a_pid_it_no_longer_owns(how):
    """A pending spawn's child is named by its pidfd, not its number: once
    something else reaped it, its number may be another process's, which
    kill() or abort() SIGKILLed (an unrelated child of the host), and which
    finish() waited for (the event loop blocked until that one ended)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"):
        pytest.skip("needs root and unshare (a pid namespace whose next pid can be chosen)")
    env = dict(os.environ, PYTHONPATH=REPO)
    try:
        out = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c",
                              _REUSED_PID, how], env=env, capture_output=True, timeout=5, cwd=REPO, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{how}: blocked waiting for the process that took the reaped child's pid")
    assert out.stdout.strip() == "alive", (out.stdout, out.stderr[-2000:])
