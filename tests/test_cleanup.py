"""Leaving open_sandbox leaves no process, fd or temp dir, however it is left."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import trio

import zviz
from zviz import Policy

from .conftest import alive

PYP = Policy.python()


async def _busy(sb):
    # a tree: a shell, a background sleeper, and a python that ignores SIGTERM
    p = await sb.start(["sh", "-c", "sleep 1000 & python3 -c 'import signal, time;"
                        " signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)'"])
    await trio.sleep(0.2)
    return p


@pytest.mark.trio
async def test_success(snapshot):
    snap = snapshot()
    async with zviz.open_sandbox(PYP) as sb:
        await sb.run(["python3", "-c", "print(1)"])
        await _busy(sb)
    await snap.assert_released()


@pytest.mark.trio
async def test_error(snapshot):
    snap = snapshot()
    with pytest.raises(RuntimeError):
        async with zviz.open_sandbox(PYP) as sb:
            await _busy(sb)
            raise RuntimeError("boom")
    await snap.assert_released()


@pytest.mark.trio
async def test_timeout(snapshot):
    snap = snapshot()
    async with zviz.open_sandbox(PYP) as sb:
        r = await sb.run(["sh", "-c", "sleep 1000 & sleep 1000"], timeout=0.3)
        assert r.timed_out
    await snap.assert_released()


@pytest.mark.trio
async def test_cancellation(snapshot):
    snap = snapshot()
    with trio.move_on_after(0.5):
        async with zviz.open_sandbox(PYP) as sb:
            await _busy(sb)
            await sb.run(["sleep", "1000"], timeout=100)
    await snap.assert_released()


@pytest.mark.trio
async def test_cancelled_while_many_run(snapshot):
    snap = snapshot()
    async with trio.open_nursery() as n:
        for _ in range(10):
            async def one():
                async with zviz.open_sandbox(PYP) as sb:
                    await sb.run(["sh", "-c", "cat /dev/zero > /dev/null"], timeout=100)
            n.start_soon(one)
        await trio.sleep(0.5)
        n.cancel_scope.cancel()
    await snap.assert_released()


@pytest.mark.trio
async def test_child_closes_stdio_and_blocks(snapshot):
    snap = snapshot()
    async with zviz.open_sandbox(PYP) as sb:
        r = await sb.run(["python3", "-c", "import os, time; os.close(0); os.close(1); os.close(2); time.sleep(1000)"],
                         timeout=0.5)
        assert r.timed_out
    await snap.assert_released()


def test_host_killed_takes_the_sandbox_down(tmp_path):
    """SIGKILL the host program: every sandboxed process dies within a second."""
    marker = tmp_path / "pids"
    prog = textwrap.dedent(f"""
        import trio, zviz
        async def main():
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                p = await sb.start(["sh", "-c", "sleep 1000 & sleep 1000"])
                await trio.sleep(0.3)
                open({str(marker)!r}, "w").write(str(p.pid))
                await trio.sleep(1000)
        trio.run(main)
    """)
    host = subprocess.Popen([sys.executable, "-c", prog], env={**os.environ, "TMPDIR": tempfile.gettempdir()})
    try:
        deadline = time.monotonic() + 20
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline, "sandbox did not start"
            time.sleep(0.05)
        init_pid = int(marker.read_text())
        tree = _descendants(init_pid) | {init_pid}
        assert len(tree) >= 3  # init, sh, sleeps
        host.send_signal(signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 1.0
        while any(alive(p) for p in tree):
            assert time.monotonic() < deadline, f"still alive: {[p for p in tree if alive(p)]}"
            time.sleep(0.02)
    finally:
        host.kill()
        host.wait()
        from zviz import _workdir

        _workdir.sweep()  # the dead host's workdir (zviz gc)



def _descendants(pid):
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out |= {int(d)} | _descendants(int(d))
    return out


@pytest.mark.trio
async def test_supervisor_failure_tears_down_and_surfaces(snapshot, monkeypatch):
    snap = snapshot()
    from zviz import _supervisor

    def broken(self, listener, pidfd, account, n):  # _handle is synchronous
        raise RuntimeError("supervisor bug")

    monkeypatch.setattr(_supervisor.Supervisor, "_handle", broken)
    with pytest.raises(BaseException) as ei:
        async with zviz.open_sandbox(PYP) as sb:
            await _busy(sb)
            await sb.run(["python3", "-c", "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0)"], timeout=30)
    assert "supervisor bug" in repr(ei.value) or any("supervisor bug" in repr(e)
                                                      for e in getattr(ei.value, "exceptions", []))
    await snap.assert_released()
