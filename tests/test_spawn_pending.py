"""A stage spawn in two halves (zviz/_stage.c stage_spawn_start/finish,
_kernel.PendingSpawn): the event loop goes on while a sandbox's child sets
itself up, and a spawn that is cancelled, closed or dropped half-way leaves
no process behind. A sandbox spawns its zygote as it opens (_lifecycle)."""

from __future__ import annotations

import errno
import os

import attrs
import pytest
import trio
import trio.lowlevel

import zviz
from zviz import SandboxClosedError, SandboxSetupError, _kernel, _sandbox, _stage
from zviz._spec import StageSpec

from .conftest import child_pids
from .test_abi import _null_command

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd (Linux 5.3+)")


def _gone(pid: int) -> bool:
    """No process and no zombie of that pid among our children."""
    return pid not in child_pids()


def test_a_pending_spawn_finishes_as_a_whole_spawn_does():
    pending = _stage.spawn_start(StageSpec().pack(), _null_command().pack())
    fd, pid = _stage.pending_info(pending)
    assert fd >= 0 and pid > 0
    got_pid, pidfd, listener = _stage.spawn_finish(pending)
    assert got_pid == pid and listener == -1
    assert os.waitpid(pid, 0)[1] == 0  # /bin/true ran
    os.close(pidfd)
    assert _stage.pending_info(pending) == (-1, -1)
    with pytest.raises(ValueError, match="finished or aborted already"):
        _stage.spawn_finish(pending)
    _stage.spawn_abort(pending)  # (idempotent: nothing left to abort)


def test_a_failed_step_comes_back_from_the_second_half():
    pending = _stage.spawn_start(StageSpec().pack(), _null_command(exe=b"/nonexistent/zviz").pack())
    _fd, pid = _stage.pending_info(pending)
    with pytest.raises(_stage.SetupError) as e:
        _stage.spawn_finish(pending)
    assert e.value.args == ("execve", errno.ENOENT, -1, None)
    assert _gone(pid)  # reaped by the finish


def test_a_pending_spawn_dropped_unfinished_is_killed_and_reaped():
    for how in ("abort", "collect"):
        sleeper = _null_command(exe=b"/bin/sleep", argv=(b"sleep", b"30"))
        pending = _stage.spawn_start(StageSpec().pack(), sleeper.pack())
        _fd, pid = _stage.pending_info(pending)
        assert pid in child_pids()
        if how == "abort":
            _stage.spawn_abort(pending)
        del pending  # (collect: the capsule's destructor aborts it)
        assert _gone(pid), how


def test_a_stage_error_of_the_second_half_names_its_path():
    async def main():
        pending = _kernel.start_spawn(StageSpec(), StageSpec().pack(), _null_command(cwd=b"/nonexistent/dir"))
        with pytest.raises(SandboxSetupError) as e:
            await pending.wait()
        assert (e.value.step, e.value.errno, e.value.path) == ("chdir", errno.ENOENT, "/nonexistent/dir")

    trio.run(main)


def test_a_cancelled_wait_kills_and_reaps_the_child():
    async def main():
        cmd = _null_command(exe=b"/bin/sleep", argv=(b"sleep", b"30"))
        pending = _kernel.start_spawn(StageSpec(), StageSpec().pack(), cmd)
        pid = _stage.pending_info(pending._pending)[1]
        with trio.CancelScope() as scope:
            scope.cancel()
            await pending.wait()
        assert scope.cancelled_caught
        assert _gone(pid)

    trio.run(main)


async def _count_steps_while(flag: list[bool], steps: list[int]) -> None:
    while True:
        if flag[0]:
            steps[0] += 1
        await trio.lowlevel.checkpoint()


def test_other_tasks_run_while_a_sandbox_sets_itself_up(monkeypatch):
    """The loop is not held for the child's set-up (its namespaces, root and
    filters, ~1.2 ms): with a spawn that blocked until exec, no other task
    could take a step meanwhile."""
    flag, steps = [False], [0]
    real_wait = _kernel.PendingSpawn.wait

    async def wait(self):
        flag[0] = True
        try:
            return await real_wait(self)
        finally:
            flag[0] = False

    monkeypatch.setattr(_kernel.PendingSpawn, "wait", wait)

    async def main():
        zviz.set_pool_size(0)
        async with trio.open_nursery() as n:
            n.start_soon(_count_steps_while, flag, steps)
            for zygote in (True, False):
                async with _sandbox._open_sandbox(zviz.Policy.python(), zygote=zygote) as sb:
                    r = await sb.run(["/bin/true"])
                    assert r.exit_code == 0
            n.cancel_scope.cancel()

    trio.run(main)
    assert steps[0] > 0


def test_a_sandbox_spawns_its_zygote_once_for_commands_that_start_together(monkeypatch):
    starts = []
    real = _kernel.start_spawn

    def counting(stage, packed, cmd):
        starts.append(cmd.exe)
        return real(stage, packed, cmd)

    monkeypatch.setattr(_kernel, "start_spawn", counting)

    async def main():
        zviz.set_pool_size(0)
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            results = []

            async def one(i: int):
                results.append(await sb.run(["/bin/sh", "-c", f"echo {i}"]))

            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(one, i)
            assert sorted(r.stdout for r in results) == [b"0\n", b"1\n", b"2\n", b"3\n"]
            assert len(starts) == 1  # the zygote, spawned as it opened; the four runs are its forks

    trio.run(main)


async def _run_told_closed(sb, errors: list[BaseException]) -> None:
    try:
        await sb.run(["/bin/true"])
    except SandboxClosedError as e:
        errors.append(e)


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "one-spawn"])
def test_a_sandbox_closed_while_its_child_sets_up_leaves_no_process(zygote):
    """Closed at once (its zygote setting up), and closed with a first command
    waiting for its child's set-up (the zygote's, or its own spawn's without
    one): aclose() returns with no process of the sandbox left, and the
    command is told the sandbox closed (not that its set-up failed: the
    child killed before its exec sent no listener). The window is ~1 ms:
    the test retries until it closed a sandbox inside it, and fails if it
    never could."""
    async def main():
        zviz.set_pool_size(0)
        before = child_pids()
        hit = {"idle": 0, "run": 0}
        for attempt in range(60):
            kind = "idle" if zygote and attempt % 2 == 0 else "run"
            sb = await _sandbox._create(zviz.Policy.python(), zygote=zygote)
            errors: list[BaseException] = []
            async with trio.open_nursery() as n:
                if kind == "run":
                    n.start_soon(_run_told_closed, sb, errors)
                for _ in range(50):  # the service task or the command starts the spawn in a step or two
                    if sb._runner._pending or sb._runner.zygote is not None or errors:
                        break
                    await trio.lowlevel.checkpoint()
                pending = bool(sb._runner._pending)
                await sb.aclose()
            if pending:
                hit[kind] += 1
                if kind == "run":
                    assert errors, "the waiting command was not told the sandbox closed"
            assert child_pids() <= before, f"left: {child_pids() - before}"
        assert hit["run"] and (hit["idle"] or not zygote), hit

    trio.run(main)


def test_a_first_command_reports_the_zygotes_setup_failure(monkeypatch):
    """The zygote's spawn begins as the sandbox opens (Runner.begin_zygote)
    and its failure is the first command's error, the stage's own; the next
    command spawns again."""
    starts = []
    real = _kernel.start_spawn

    def failing(stage, packed, cmd):
        starts.append(cmd.exe)
        return real(stage, packed, attrs.evolve(cmd, cwd=b"/nonexistent/dir"))  # its chdir fails

    monkeypatch.setattr(_kernel, "start_spawn", failing)

    async def main():
        zviz.set_pool_size(0)
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            assert len(starts) == 1 and sb._runner.zygote is None  # begun as it opened
            for n in (1, 2):
                with pytest.raises(SandboxSetupError) as e:
                    await sb.run(["/bin/true"])
                assert (e.value.step, e.value.path) == ("chdir", "/nonexistent/dir")
                assert len(starts) == n
            assert not sb._runner._pending

    trio.run(main)


def test_a_fork_of_the_host_that_drops_a_pending_spawn_leaves_the_child_alone():
    """A process forked from the host while a spawn is pending has a copy of
    the pending object, and of the child's pidfd: when it drops it (its
    interpreter's exit collects it), it must not kill or reap the host's
    child (the helper's note, round 15's review)."""
    sleeper = _null_command(exe=b"/bin/sleep", argv=(b"sleep", b"0.3"))
    pending = _stage.spawn_start(StageSpec().pack(), sleeper.pack())
    _fd, pid = _stage.pending_info(pending)
    fork = os.fork()
    if fork == 0:  # pragma: no cover - the fork
        try:
            _stage.pending_kill(pending)
            _stage.spawn_abort(pending)
            del pending
        finally:
            os._exit(0)
    assert os.waitpid(fork, 0)[1] == 0
    assert pid in child_pids()  # still ours, alive
    got_pid, pidfd, _listener = _stage.spawn_finish(pending)
    assert got_pid == pid
    assert os.waitpid(pid, 0)[1] == 0  # /bin/sleep ran to its end: nobody killed it
    os.close(pidfd)
