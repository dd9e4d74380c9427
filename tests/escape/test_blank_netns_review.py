"""A hostile review of the blank network namespace (zviz/_netns.py,
zviz/_sockets.py, the pump's fast_socket): what a program inside a `none`
sandbox (or a concurrent one) tried, and what the host observed. Each test
says what was tried and what held; the one that found a bug says so.

Beside tests/escape/test_blank_netns.py (which it does not repeat)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import textwrap
import threading
import time
import types

import pytest
import trio

import zviz
from zviz import _kernel, _netns, _pump, _sockets

from ..conftest import IS_ROOT

pytestmark = pytest.mark.skipif(not (IS_ROOT and _netns.usable()),
                                reason="the blank network namespace needs root (zviz makes and enters "
                                "network namespaces)")

PY = "/usr/bin/python3"


def _blank_ino() -> int:
    fd = _netns.blank_fd()
    assert fd is not None
    return os.fstat(fd).st_ino


async def _py(sb: zviz.Sandbox, code: str, timeout: float = 60) -> dict:
    r = await sb.run([PY, "-c", textwrap.dedent(code)], timeout=timeout)
    assert r.exit_code == 0, r.stderr.decode()[-2000:]
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def _run(code: str, policy: zviz.Policy | None = None, timeout: float = 60) -> dict:
    async def main():
        async with zviz.open_sandbox(policy or zviz.Policy.python()) as sb:
            return await _py(sb, code, timeout)

    return trio.run(main)


def _blank_lines(what: str) -> list[str]:
    """/proc/net/<what> of the blank namespace, read on the host (a thread that enters it)."""
    fd = _netns.blank_fd()
    assert fd is not None
    out: list[list[str]] = []

    def read() -> None:
        assert _kernel._c().setns(fd, 0x40000000) == 0
        with open(f"/proc/thread-self/net/{what}") as f:
            out.append(f.read().splitlines())

    t = threading.Thread(target=read)  # (a thread of its own: it ends in the blank namespace)
    t.start()
    t.join()
    return out[0]


# ---- FOUND: a caller that dies while the Python supervisor installs its pair


PAIR_IN_A_THREAD = r"""
import ctypes, threading, time
libc = ctypes.CDLL(None, use_errno=True)
sv = (ctypes.c_int * 2)()
t = threading.Thread(target=lambda: libc.socketpair(1, 1, 0, sv))
t.start(); t.join()
print("{}")
"""


def test_a_caller_that_dies_while_its_pair_is_installed_does_not_fail_the_sandbox(monkeypatch):
    """FOUND (fixed). The Python supervisor installs a pair in a worker
    thread: it opens /proc/TID/mem, then /proc/TID/maps. A caller whose
    process dies in between (another of its threads calls exit_group: a
    hostile program does it in a loop) made the second open raise
    ProcessLookupError out of the worker, into the sandbox's service task
    group: the sandbox was torn down and the host's `async with` raised
    ProcessLookupError (seen 1 in ~120 such commands with the pump
    unavailable; the pump makes all but a sandbox's first socket). Here the
    host kills the caller at that very point, every time. Now: the call is
    answered as from a caller that is gone, and the sandbox goes on."""
    monkeypatch.setattr(_pump, "available", lambda: False)  # (every socket made by Python, as without pumps)
    killed: list[int] = []

    def open_then_kill(path, flags, *rest):
        fd = os.open(path, flags, *rest)
        if path.endswith("/mem") and not killed:
            tid = int(path.split("/")[2])
            with open(f"/proc/{tid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
            os.kill(tgid, signal.SIGKILL)
            killed.append(tid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the thread is gone from /proc
                try:
                    os.close(os.open(f"/proc/{tid}/maps", os.O_RDONLY))
                except OSError:
                    break
                time.sleep(0.005)
        return fd

    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake.open = open_then_kill
    monkeypatch.setattr(_sockets, "os", fake)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            first = await sb.run([PY, "-c", PAIR_IN_A_THREAD], timeout=30)
            second = await _py(sb, "import json, socket; a, b = socket.socketpair(); a.send(b'k'); "
                                   "print(json.dumps({'k': b.recv(1).decode()}))")
        return first, second

    first, second = trio.run(main)
    assert killed, "the pair never reached the Python supervisor"
    assert first.exit_code != 0  # (killed)
    assert second == {"k": "k"}  # the supervisor still serves the sandbox, and closing it raised nothing


def test_the_pair_worker_never_raises_into_the_sandbox_service():
    """The same, where the listener was closed meanwhile (its tasks all gone:
    the supervisor forgets it while the worker runs): the worker's ValueError
    was raised into the service task group. Now the call is answered (or
    not: nobody is left) and the host's copies of the pair are closed."""
    from zviz._supervisor import Supervisor

    listener = _kernel.OwnedFd(os.open("/dev/null", os.O_RDONLY), "listener")
    listener.close()
    a, b = socket.socketpair()
    fds = (a.detach(), b.detach())
    page = bytearray(8)
    addr = ctypes.addressof((ctypes.c_char * 8).from_buffer(page))
    n = _kernel.Notification(id=1, pid=threading.get_native_id(), nr=53, arch=0xC000003E,
                             args=(1, 1, 0, addr, 0, 0))

    async def main():
        sup = Supervisor(allowed_endpoints=frozenset(), net_allow=False, on_event=lambda e: None, task_group=None)
        await sup._install_pair(listener, n, fds, False)

    trio.run(main)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
