"""Attacks on the CLI server and its clients (zviz/_cliclient.py, zviz/_cliserver.py),
each with what the host observed: a file the attacker's code wrote, the fds it got,
another client's latency, the server's pid still alive.
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from tests.test_cliserver import ZVIZ, Server, alive  # noqa: F401

PR_SET_NO_NEW_PRIVS = 38


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


FAKE_SERVER = r"""
import ctypes, os, socket, sys
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs: a more confined process than its victims
srv, name, evidence = sys.argv[1:4]
os.chdir(srv)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(name + ".sock")
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data, anc, _, _ = c.recvmsg(1 << 17, socket.CMSG_SPACE(64))
    fds = [int.from_bytes(p[i:i + 4], "little") for lvl, kind, p in anc if kind == socket.SCM_RIGHTS
           for i in range(0, len(p) - 3, 4)]
    got = len(fds)
    for fd in fds:  # (the victim's stdio: a terminal, a harness's pipes)
        os.close(fd)
    if data or got:  # (a client that looked and left sends nothing)
        with open(evidence, "a") as f:
            f.write(f"a request with {got} fds: {data[-40:]!r}\n")
    c.send(b"A")
    c.send(b"X0")
    c.close()
"""


def test_a_client_never_talks_to_a_server_of_another_context(server, tmp_path):
    """Whoever can write in the cache directory (a sandbox given `--rw ~/.cache`, for a
    non-root caller the same uid) can bind its own socket at a server's name. The
    client must check who listens before it sends its stdio fds (its terminal, its
    pipes) and arguments, and must not take a forged exit status."""
    server.srv.mkdir(mode=0o700)
    from zviz import _cliclient

    name = _cliclient.name_of(server.key())
    evidence = tmp_path / "fake-got"
    with subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(server.srv), name, str(evidence)],
                          stdout=subprocess.PIPE, text=True) as fake:
        try:
            assert fake.stdout.readline() == "listening\n"
            r = server.run("run", "--", "sh", "-c", "echo real", timeout=30)
            assert not evidence.exists(), evidence.read_text()
            assert (r.returncode, r.stdout) == (0, b"real\n"), r
        finally:
            fake.kill()


def _full_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


def test_a_client_that_never_reads_its_stderr_does_not_stall_the_others(server):
    """The server writes its own messages (errors, a --debug traceback, the
    sandbox's events) to the client's stderr on the loop every client shares:
    a full pipe nobody reads may cost other clients one bounded wait, not one per write."""
    server.start()
    r, w = _full_pipe()
    try:
        with subprocess.Popen([*ZVIZ, "--debug", "run", "--", "no-such-command"], env=server.env,
                              stdout=subprocess.DEVNULL, stderr=w) as stuck:
            try:
                time.sleep(0.5)  # (its request is in)
                t = time.monotonic()
                other = server.run("run", "--", "true", timeout=60)
                took = time.monotonic() - t
                assert other.returncode == 0
                assert took < 4.0, f"another client waited {took:.1f} s"
                assert stuck.wait(30) == 127
            finally:
                stuck.kill()
    finally:
        os.close(r)
        os.close(w)


def test_a_gone_json_client_leaves_nothing_reading_its_stdin(server):
    """`zviz run --json` reads all of stdin before the command starts. A client
    that dies meanwhile must leave nothing in the server blocked on its stdin: a
    thread stuck in read() outlives the fd (closed, its number given to the next
    client's fds) and reads on whatever gets that number after."""
    server.start()
    r, w = os.pipe()
    try:
        served = server.served()
        with subprocess.Popen([*ZVIZ, "run", "--json", "--", "true"], env=server.env, stdin=r,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
            os.close(r)
            r = -1
            time.sleep(1.0)  # (its request is in: the sandbox is open, its stdin being read)
            p.kill()
        deadline = time.monotonic() + 20
        while server.served() == served:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        # nothing in the server may still read the pipe: with no reader left, a write fails
        with pytest.raises(BrokenPipeError):
            os.write(w, b"stolen")
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
