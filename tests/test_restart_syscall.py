"""A sleep stopped and continued is resumed by the kernel through
restart_syscall: every policy must allow it (futex waits with a timeout
restart the same way; glibc aborts with "The futex facility returned an
unexpected error code" when it is refused, as a code context importing
matplotlib did)."""

import os
import signal
import time

import pytest

import zviz
from zviz import Policy

# a futex wait with a timeout (a lock, an Event) and a relative nanosleep:
# both are resumed through restart_syscall after SIGSTOP/SIGCONT
PROGRAM = ("import ctypes, threading\n"
           "threading.Event().wait(0.4)\n"
           "class T(ctypes.Structure):\n    _fields_ = [('s', ctypes.c_long), ('ns', ctypes.c_long)]\n"
           "print('nanosleep', ctypes.CDLL(None, use_errno=True).nanosleep(ctypes.byref(T(0, 400_000_000)), None),"
           " ctypes.get_errno())\n")


def _program_pid(run_init: int) -> int:
    with open(f"/proc/{run_init}/task/{run_init}/children") as f:
        kids = f.read().split()
    return int(kids[0])


@pytest.mark.trio
async def test_a_stopped_and_continued_sleep_resumes():
    async with zviz.open_sandbox(Policy.python()) as sb:
        proc = await sb.start(["python3", "-c", PROGRAM], stdin=False)
        time.sleep(0.2)  # noqa: ASYNC251 - the program must be in its wait; nothing else runs meanwhile
        pid = _program_pid(proc.pid)
        for _ in range(2):  # once in the futex wait, once in nanosleep
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.05)  # noqa: ASYNC251
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.4)  # noqa: ASYNC251
        out = await proc.stdout.receive_some()
        err = await proc.stderr.receive_some()
        assert await proc.wait() == 0, err
        assert out == b"nanosleep 0 0\n"
        assert "restart_syscall" not in dict(proc.denials)
        assert "restart_syscall" not in dict(sb.statistics().denials)
