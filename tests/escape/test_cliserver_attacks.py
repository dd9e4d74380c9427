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

from tests.test_cliserver import ZVIZ, Server, alive, wait_eof

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


def test_a_server_killed_mid_request_leaves_the_callers_stdio_blocking_and_no_sandbox(server):
    """The server makes the client's stdio descriptions non-blocking while it pumps
    them (a dup shares the flag with the caller's shell or harness) and puts the
    flag back at the end, which a killed server never reaches: the client does it."""
    from tests.test_cliserver import _sleeper

    server.start()
    pid = server.pid()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        with subprocess.Popen([*ZVIZ, "run", "--", "sh", "-c", "echo up; exec sleep 300"], env=server.env,
                              stdin=in_r, stdout=out_w, stderr=subprocess.PIPE) as p:
            try:
                assert os.read(out_r, 16) == b"up\n"
                sleeper = _sleeper(pid)
                assert sleeper is not None
                assert not os.get_blocking(in_r)  # (the server's pumps run)
                os.kill(pid, 9)
                assert p.wait(20) == 126
                assert b"the zviz server ended" in p.stderr.read()
            finally:
                p.kill()
        assert os.get_blocking(in_r) and os.get_blocking(out_w), "the caller's stdio was left non-blocking"
        deadline = time.monotonic() + 10
        while alive(sleeper):
            assert time.monotonic() < deadline, "the sandbox outlived its server"
            time.sleep(0.02)
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


SPAWNER = r"""
import os, sys, anyio, zviz
async def main():
    first = True
    while True:
        async with await zviz.Sandbox.create(zviz.Policy.shell()) as sb:
            await sb.run(["true"])  # (its zygote: the stage's spawn)
            if first:
                os.write(1, b"up\n")
                first = False
anyio.run(main)
"""


def test_a_process_killed_while_it_spawns_a_sandbox_leaves_no_orphan_holding_its_fds():
    """The stage child waits for the parent's "go" and takes EOF as "the parent
    died"; it must not hold that pipe's write end itself. Held, a parent killed in
    that window (a CLI server killed while its pool refills, any zviz process
    killed while it starts a sandbox) left the child waiting forever with a copy of
    every fd the parent had: a server's socket, lock and its clients' connections
    (every later `zviz run` hung), a harness's pipes (never EOF). Host-side evidence:
    a pipe whose write end only the killed process had reaches EOF."""
    import random

    for _ in range(16):
        r, w = os.pipe()
        with subprocess.Popen([sys.executable, "-c", SPAWNER], pass_fds=(w,), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as p:
            os.close(w)
            try:
                assert p.stdout.readline() == b"up\n"
                time.sleep(random.random() * 0.3)  # (somewhere in the loop of spawns)
            finally:
                p.kill()
        try:
            wait_eof(r, 5, "something the killed process started still holds its fds")
        finally:
            os.close(r)
            _kill_matching(SPAWNER)


# What a raw client does once it may reach the socket (by name, in its directory):
# send a request with fds 0-2, print what came back
_RAW_REQUEST = """
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({name!r})
out = b""
try:
    s.sendmsg([sys.stdin.buffer.read()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    while got := s.recv(64):
        out += got + b"|"
except OSError:
    pass
sys.stdout.buffer.write(out)
"""


def _kill_matching(code: str) -> None:
    """Kill what a failed run left (processes whose command line is `python -c code`)."""
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and code.encode() in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), 9)
        except OSError:
            pass


HOARDER = r"""
import os, socket, sys, time
srv, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.chdir(srv)
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(name)
    held.append(s)
print("holding", len(held), flush=True)
time.sleep(60)
"""


def test_connections_beyond_the_servers_fds_do_not_end_it(server):
    """A client context's fd limit is the server's: connections that never send
    a request, more than the server has fds, must not end the server (and every
    sandbox it runs for its other clients); once they are gone it serves again.
    (Held on the old code too: the connection that takes the last fd is refused,
    its peer's /proc unreadable, so accept() itself did not fail here.)"""
    import resource

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    server.run("run", "--", "true", preexec_fn=low_nofile)  # (a server of that context: theirs)
    server.run("run", "--", "true", preexec_fn=low_nofile)
    deadline = time.monotonic() + 30
    while "serving" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    pid = server.pid()
    sock = server.socket_path()
    cmd = [sys.executable, "-c", HOARDER, str(sock.parent), sock.name, "150"]
    with subprocess.Popen(cmd, preexec_fn=low_nofile, stdout=subprocess.PIPE, text=True) as hoarder:  # noqa: PLW1509
        try:
            assert hoarder.stdout.readline() == "holding 150\n"
            time.sleep(0.5)
            assert alive(pid), "the server ended: " + server.log()[-300:]
        finally:
            hoarder.kill()
    before = server.served()
    r = server.run("run", "--", "sh", "-c", "echo ok", preexec_fn=low_nofile, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"ok\n") and server.served() == before + 1, server.log()[-500:]


FLOODER = r"""
import ctypes, os, socket, sys
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs: refused, as a sandboxed process is
srv, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.chdir(srv)
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(name)
        s.recv(1)
    except OSError:
        pass
    s.close()
print("done", flush=True)
"""


def test_refused_connections_cannot_fill_the_disk_with_the_servers_log(server):
    """A process the server refuses (a sandbox whose policy reaches the socket) may
    connect as often as it likes; the server's log, on the host's disk, stays bounded."""
    from zviz import _cliserver

    server.start()
    sock = server.socket_path()
    p = subprocess.run([sys.executable, "-c", FLOODER, str(sock.parent), sock.name, "25000"], capture_output=True,
                       text=True, timeout=120)
    assert p.stdout == "done\n", p
    size = sum(f.stat().st_size for f in server.srv.glob("*.log"))
    assert size <= _cliserver.MAX_LOG + 4096, f"the log grew to {size} bytes"
    assert "refused" in server.log()
    before = server.served()
    assert server.run("run", "--", "true").returncode == 0 and server.served() == before + 1


def test_the_off_file_is_never_written_through_a_link(server, tmp_path):
    """On a kernel without SO_PEERPIDFD the server writes `<name>.off` and exits.
    Whoever may write in the cache directory (a sandbox given it read-write) may
    plant a link at that name: the server must not truncate and write its target."""
    from zviz import _cliclient

    server.srv.mkdir(mode=0o700)
    name = _cliclient.name_of(server.key())
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (server.srv / f"{name}.off").symlink_to(victim)
    code = ("import zviz._cliserver as s; s._peer_checks_unavailable = lambda: 'SO_PEERPIDFD is not supported'; "
            f"s.main({name!r})")
    p = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p
    assert victim.read_text() == "precious\n"
    assert "not serving" in p.stderr


LOCKER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, sys.argv[2].encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_gc_signals_only_the_process_that_holds_a_servers_lock(server):
    """`zviz gc` stops servers by the pid in their `.lock`. Whoever may write in
    the cache directory could name any process there (and hold a lock on the file
    to look alive): gc must signal only the process that holds that lock."""
    server.srv.mkdir(mode=0o700)
    with subprocess.Popen(["sleep", "60"]) as victim, \
            subprocess.Popen([sys.executable, "-c", LOCKER, str(server.srv / "ffffffff-ffffffff.lock"),
                              str(victim.pid)], stdout=subprocess.PIPE, text=True) as locker:
        try:
            assert locker.stdout.readline() == "locked\n"
            r = subprocess.run([*ZVIZ, "gc"], env={**server.env, "ZVIZ_SERVER": "0"}, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r
            time.sleep(0.2)
            assert victim.poll() is None, "gc signalled a process that is no server: " + r.stdout
        finally:
            victim.kill()
            locker.kill()


LATE_CONFINED = r"""
import array, ctypes, os, socket, sys, time
srv, name = sys.argv[1], sys.argv[2]
os.chdir(srv)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(name)
time.sleep(0.5)  # (the server has checked who connected)
if os.fork() == 0:  # the sender: a child confined after the connection was made
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, as every seccomp or Landlock sandbox has
    s.sendmsg([sys.stdin.buffer.read()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    out = b""
    while True:
        try:
            got = s.recv(64)
        except OSError:
            break
        if not got:
            break
        out += got + b"|"
    sys.stdout.buffer.write(out)
    os._exit(0)
os.wait()
"""


def test_the_request_is_checked_against_its_sender_not_only_the_connector(server, tmp_path):
    """Who connected is not who sends: a connection made by an unconfined process
    and inherited by a confined one (a child confined after fork, code that got
    the fd) must not carry that process's request."""
    from tests.test_cliserver import _marker_request

    server.start()
    sock, key = server.socket_path(), server.key()
    marker = tmp_path / "m" / "marker"
    marker.parent.mkdir()
    os.chmod(marker.parent, 0o777)
    p = subprocess.run([sys.executable, "-c", LATE_CONFINED, str(sock.parent), sock.name],
                       input=_marker_request(key, marker), capture_output=True, timeout=60)
    assert not marker.exists(), (p.stdout, server.log()[-300:])
    assert p.stdout == b"", p


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot(2) needs root (an unprivileged one needs a user namespace)")
def test_a_chrooted_process_is_refused(server, tmp_path):
    """A process with another root directory (chroot: same uid, namespaces and
    credentials) sees other files at the same paths; the server, which resolves
    the request's paths against its own root, must not serve it."""
    from tests.test_cliserver import _marker_request

    server.start()
    sock, key = server.socket_path(), server.key()
    marker = tmp_path / "m" / "marker"
    marker.parent.mkdir()
    os.chmod(marker.parent, 0o777)
    jail = tmp_path / "jail"
    jail.mkdir()
    code = f"""
import array, os, socket, sys
srv = os.open({str(sock.parent)!r}, os.O_PATH)
os.chroot({str(jail)!r})
os.fchdir(srv)  # (the socket stays in reach through a directory fd)
""" + _RAW_REQUEST.format(name=sock.name)
    p = subprocess.run([sys.executable, "-c", code], input=_marker_request(key, marker), capture_output=True,
                       timeout=60)
    assert not marker.exists(), p
    assert p.stdout == b"", p


def _landlock_self() -> None:
    """Enter a Landlock domain (one that handles MAKE_CHAR and grants nothing):
    the kernel shows no trace of it in /proc once no_new_privs is set anyway."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Attr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64)]

    attr = Attr(1 << 6)  # LANDLOCK_ACCESS_FS_MAKE_CHAR
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)  # landlock_create_ruleset
    assert fd >= 0, ctypes.get_errno()
    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    assert libc.syscall(446, fd, 0) == 0, ctypes.get_errno()  # landlock_restrict_self


def _no_new_privs() -> None:
    import ctypes

    assert ctypes.CDLL(None).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0


def test_a_landlocked_process_is_refused_where_no_new_privs_hides_it(server, tmp_path):
    """A server started by a process that already has no_new_privs (bubblewrap,
    a container run with no-new-privileges, systemd's NoNewPrivileges) cannot see
    that a client entered a Landlock domain: /proc shows nothing more. The kernel
    still tells: a Landlocked process may not look into a process outside its
    domain (ptrace access), so it cannot open the server's fd that the server asks for."""
    from tests.test_cliserver import _marker_request

    for _ in range(2):
        assert server.run("run", "--", "true", preexec_fn=_no_new_privs).returncode == 0
    deadline = time.monotonic() + 30
    while "serving" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    sock = server.socket_path()
    code = "import sys, zviz._cliclient as c; sys.stdout.buffer.write(c.key())"
    key = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, check=True,
                         preexec_fn=_no_new_privs).stdout
    marker = tmp_path / "m" / "marker"
    marker.parent.mkdir()
    os.chmod(marker.parent, 0o777)
    # the control: the zviz client of that context goes through the server
    before = server.served()
    r = server.run("run", "--", "true", preexec_fn=_no_new_privs)
    assert r.returncode == 0 and server.served() == before + 1, server.log()
    raw = f"""
import array, os, socket, sys
os.chdir({str(sock.parent)!r})
""" + _RAW_REQUEST.format(name=sock.name)
    p = subprocess.run([sys.executable, "-c", raw], input=_marker_request(key, marker), capture_output=True,
                       timeout=60, preexec_fn=_landlock_self)
    assert not marker.exists(), (p, server.log()[-300:])
    # and the zviz client so confined does what it does without a server (here: the
    # sandbox's mounts are refused in a Landlock domain), never the server's bidding
    before = server.served()
    r = server.run("run", "--", "sh", "-c", "echo mine", preexec_fn=_landlock_self)
    alone = server.run("run", "--", "sh", "-c", "echo mine", preexec_fn=_landlock_self,
                       env={**server.env, "ZVIZ_SERVER": "0"})
    assert (r.returncode, r.stdout, r.stderr) == (alone.returncode, alone.stdout, alone.stderr)
    assert server.served() == before, server.log()
