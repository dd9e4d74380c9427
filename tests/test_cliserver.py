"""`zviz run` through the CLI server (zviz/_cliclient.py, zviz/_cliserver.py).

Each test starts its own server (a private cache directory, so a context of
its own) and stops it at the end. Evidence that a command went through the
server, not the client's process: the server's log counts what it served.
"""

import ctypes
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from zviz import _cliclient

ZVIZ = [sys.executable, "-m", "zviz"]
IS_ROOT = os.geteuid() == 0


class Server:
    def __init__(self, base: pathlib.Path) -> None:
        self.cache = base / "cache"
        self.cache.mkdir(mode=0o700)
        self.env = {**os.environ, "ZVIZ_SERVER": "1", "ZVIZ_CACHE_DIR": str(self.cache), "ZVIZ_SERVER_IDLE": "60"}
        self.env.pop("ZVIZ_POOL_SIZE", None)
        self.srv = self.cache / "srv"

    def run(self, *args, input=None, timeout=60, **kw):
        kw.setdefault("env", self.env)
        return subprocess.run([*ZVIZ, *args], input=input, capture_output=True, timeout=timeout, **kw)

    def log(self) -> str:
        return "".join(p.read_text() for p in self.srv.glob("*.log")) if self.srv.exists() else ""

    def served(self, expect: int | None = None) -> int:
        """Requests the server logged as served; with `expect`, waited for up to 5 s (the server
        logs a request after its client has its status, and the client may look first)."""
        deadline = time.monotonic() + 5.0
        n = self.log().count("served a request")
        while expect is not None and n < expect and time.monotonic() < deadline:
            time.sleep(0.02)
            n = self.log().count("served a request")
        return n

    def socket_path(self) -> pathlib.Path:
        socks = list(self.srv.glob("*.sock"))
        assert len(socks) == 1, socks
        return socks[0]

    def start(self) -> None:
        """Two runs: the first makes the cache, the second starts the server
        (both run in their own process); then wait until it listens."""
        for _ in range(2):
            assert self.run("run", "--", "true").returncode == 0
        deadline = time.monotonic() + 30
        while "serving" not in self.log():
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def pid(self) -> int:
        for line in self.log().splitlines():
            if ": pid " in line and "serving" in line:
                return int(line.split(": pid ")[1].split(",")[0])
        raise AssertionError(self.log())

    def key(self) -> bytes:
        code = "import sys, zviz._cliclient as c; sys.stdout.buffer.write(c.key())"
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, check=True).stdout

    def stop(self) -> None:
        env = {**self.env, "ZVIZ_SERVER": "0"}
        subprocess.run([*ZVIZ, "gc"], env=env, capture_output=True, timeout=60)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()
    assert not any(s.srv.glob("*")), "zviz gc stops the servers and removes their files"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_commands_go_through_the_server_with_stdio_status_and_errors(server):
    server.start()
    before = server.served()
    r = server.run("run", "--", "python3", "-c",
                   "import sys; print(sys.stdin.read().upper()); print('err', file=sys.stderr); sys.exit(3)",
                   input=b"abc")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"ABC\n", b"err\n")
    assert server.run("run", "--", "python3", "-c", "import os; os.kill(os.getpid(), 9)").returncode == 128 + 9
    r = server.run("run", "--timeout", "0.5", "--", "sleep", "10")
    assert r.returncode == 124 and b"timed out" in r.stderr
    r = server.run("run", "--", "no-such-command")
    assert r.returncode == 127 and r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    r = server.run("run", "--memory", "lots", "--", "true")
    assert r.returncode == 125 and b"--memory" in r.stderr
    r = server.run("run")
    assert r.returncode == 2 and b"a command is needed" in r.stderr
    r = server.run("run", "--bogus-flag", "--", "true")  # argparse's own error, printed by the server
    assert r.returncode == 2 and b"unrecognized arguments: --bogus-flag" in r.stderr
    r = server.run("run", "--help")
    assert r.returncode == 0 and b"--allow-domain" in r.stdout
    r = server.run("--debug", "run", "--", "no-such-command")
    assert r.returncode == 127 and b"Traceback" in r.stderr
    r = server.run("run", "--json", "--", "python3", "-c", "import sys; print(sys.stdin.read())", input=b"in")
    assert r.returncode == 0 and b'"stdout": "in\\n"' in r.stdout
    assert server.served(before + 10) == before + 10, server.log()
    # the same answers without the server (ZVIZ_SERVER=0), for the ones compared
    direct = {**server.env, "ZVIZ_SERVER": "0"}
    for args in (("run", "--bogus-flag", "--", "true"), ("run", "--memory", "lots", "--", "true")):
        a, b = server.run(*args), server.run(*args, env=direct)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert server.served(before + 12) == before + 12


def test_relative_paths_are_the_clients(server, tmp_path):
    server.start()
    work = tmp_path / "here"
    (work / "data").mkdir(parents=True)
    (work / "data" / "in.txt").write_text("mine")
    os.chmod(tmp_path, 0o755)
    os.chmod(work, 0o755)
    os.chmod(work / "data", 0o755)
    os.chmod(work / "data" / "in.txt", 0o644)
    before = server.served()
    r = server.run("run", "--ro", "data", "--", "cat", str(work / "data" / "in.txt"), cwd=work)
    assert (r.returncode, r.stdout) == (0, b"mine"), r.stderr
    r = server.run("run", "--bind", "data:/d", "--", "cat", "/d/in.txt", cwd=work)
    assert (r.returncode, r.stdout) == (0, b"mine"), r.stderr
    assert server.served(before + 2) == before + 2


# a command, and a warm snippet (its sandbox's pid 1 a fork of the server's warm interpreter), each
# saying it is up, then exec'ing `sleep 300` to be found
_KILLED = {
    "command": (["sh", "-c", "echo up; exec sleep 300"], b"up\n"),
    "warm snippet": (["python3", "-c", "import os, sys; print('up', sys.flags.isolated, flush=True); "
                                       "os.execvp('sleep', ['sleep', '300'])"], b"up 1\n"),
}


@pytest.mark.parametrize("kind", sorted(_KILLED))
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_client_kills_its_sandbox(server, how, kind):
    """A client killed outright (the server sees the hang-up) or signalled (it
    forwards the signal, and its status says which): the sandbox dies with it.
    (SIGINT at its default in the client: a suite started in the background
    of a shell inherits it ignored, which the client keeps, as it should.)"""
    server.start()
    argv, up = _KILLED[kind]
    from .test_cli import _DEFAULT_SIGNALS_THEN_EXEC

    with subprocess.Popen([sys.executable, "-c", _DEFAULT_SIGNALS_THEN_EXEC, *ZVIZ, "run", "--", *argv],
                          env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            assert p.stdout.readline() == up
            sleeper = _sleeper(server.pid())
            assert sleeper is not None
            p.send_signal(getattr(signal, how))
            status = p.wait(10)
            assert status == (-signal.SIGKILL if how == "SIGKILL" else 128 + signal.SIGINT)
            deadline = time.monotonic() + 10
            while alive(sleeper):
                assert time.monotonic() < deadline, "the sandbox outlived its client"
                time.sleep(0.02)
        finally:
            p.kill()


@pytest.mark.parametrize("through_server", [False, True])
def test_a_signal_the_caller_ignores_leaves_the_command_alone(server, through_server):
    """`nohup zviz run ...`, or a script's background job and Ctrl-C: a signal
    ignored by the caller (inherited SIG_IGN) is ignored by the client too, as
    by a `zviz run` in its own process, and the command runs to its end."""
    env, before = _one_way(server, through_server)
    zviz = " ".join(ZVIZ)
    p = subprocess.Popen(["sh", "-c", f"trap '' HUP INT; exec {zviz} run --timeout 20 -- sh -c 'sleep 1; echo ran'"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    p.send_signal(signal.SIGHUP)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out) == (0, b"ran\n"), err
    assert server.served(before + through_server) == before + through_server


def wait_eof(r: int, timeout: float, what: str) -> None:
    """Read the pipe `r` until its end of file (every write end closed), or fail with `what`."""
    os.set_blocking(r, False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.read(r, 1) == b"":
                return
        except BlockingIOError:
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _sleeper(server_pid: int, timeout: float = 10.0) -> int | None:
    """The host pid of the sandboxed `sleep 300` under the server `server_pid`,
    or None. Waited for: the command's "up" comes before its exec of sleep; and
    only the server's own (another test's `sleep 300` on this machine, a
    concurrent run's, must not be taken for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if pathlib.Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00300\x00" and \
                        server_pid in _ancestors(int(pid)):
                    return int(pid)
            except OSError:
                pass
        time.sleep(0.01)
    return None


def _one_way(server, through_server: bool) -> tuple[dict[str, str], int]:
    """The environment for `zviz run` through the server (started) or in its own
    process, and how many requests the server had served before."""
    if through_server:
        server.start()
    return {**server.env, "ZVIZ_SERVER": "1" if through_server else "0"}, server.served()


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        out.append(pid)
    return out


def test_the_server_holds_no_fd_of_its_client(server):
    """A harness that waits for EOF on a pipe it gave `zviz run` must not wait for the server."""
    r, w = os.pipe()
    try:
        for _ in range(2):  # the second run starts the server, with this pipe inherited
            subprocess.run([*ZVIZ, "run", "--", "true"], env=server.env, pass_fds=(w,), check=True,
                           capture_output=True, timeout=60)
        os.close(w)
        w = -1
        wait_eof(r, 20, "someone still holds the pipe's write end")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _request(path: pathlib.Path, body: bytes, fds=(0, 1, 2), preexec=None) -> bytes:
    """Send one raw request from a child process (optionally set up by `preexec`); what it got back."""
    code = f"""
import array, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(f"/proc/self/fd/{{os.open({str(path.parent)!r}, os.O_PATH)}}/{path.name}")  # (a long path: > 108 bytes)
body = sys.stdin.buffer.read()
fds = {list(fds)!r}
out = b""
try:
    s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else [])
except OSError:  # (refused: the server hung up first)
    pass
while True:
    try:
        got = s.recv(64)
    except OSError:
        break
    if not got:
        break
    if got.startswith(b"P"):  # (the server's challenge, answered as its client does)
        pid = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4], sys.byteorder)
        try:
            fd = os.open(f"/proc/{{pid}}/fd/{{int(got[1:])}}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        s.sendmsg([b"p"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        continue
    out += got + b"|"
sys.stdout.buffer.write(out)
"""
    p = subprocess.run([sys.executable, "-c", code], input=body, capture_output=True, timeout=60,
                       preexec_fn=preexec)
    return p.stdout


def _marker_request(key: bytes, marker: pathlib.Path) -> bytes:
    return b"\0".join([_cliclient.PROTOCOL, key, b"/", b"7", b"run", b"--rw", str(marker.parent).encode(), b"--",
                       b"/bin/sh", b"-c", f"echo x > {marker}".encode()])


def test_malformed_requests_are_dropped_and_the_server_goes_on(server, tmp_path):
    server.start()
    path, key = server.socket_path(), server.key()
    marker = tmp_path / "m" / "marker"
    marker.parent.mkdir()
    os.chmod(marker.parent, 0o777)
    good = _marker_request(key, marker)
    bad = [
        good.replace(_cliclient.PROTOCOL, b"zviz-run 9"),  # another protocol
        good.replace(key, key[:-1] + b"?"),  # another key
        good.replace(b"\0/\0", b"\0relative\0"),  # a relative cwd
        good.replace(b"\0" + b"7" + b"\0", b"\0" + b"9" + b"\0"),  # a mask beyond fds 0-2
        good.replace(b"\0" + b"7" + b"\0", b"\0" + b"3" + b"\0"),  # fewer fds announced than sent
        b"\xff" * 10,
        b"",
        good + b"\0" + b"A" * _cliclient.MAX_REQUEST,  # too large (truncated)
    ]
    for body in bad:
        assert _request(path, body) == b"", body[:40]
        assert not marker.exists()
    assert _request(path, good, fds=()) == b""  # no fds though the mask says three
    assert not marker.exists()
    assert _request(path, good) == b"A|X0|"  # the server still serves a good one
    assert marker.read_text() == "x\n"


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare(1)")
def test_a_process_in_other_namespaces_is_refused(server, tmp_path):
    """What a sandboxed process is (own user and pid namespaces, the same uid
    outside for a non-root caller) cannot use the server, even with the socket
    in reach and the right key."""
    server.start()
    path, key = server.socket_path(), server.key()
    marker = tmp_path / "m" / "marker"
    marker.parent.mkdir()
    os.chmod(marker.parent, 0o777)
    body = _marker_request(key, marker)
    # the control: from this context the same request runs
    assert _request(path, body) == b"A|X0|"
    marker.unlink()
    code = f"""
import array, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(f"/proc/self/fd/{{os.open({str(path.parent)!r}, os.O_PATH)}}/{path.name}")
try:
    s.sendmsg([sys.stdin.buffer.read()],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]).tobytes())])
    print(s.recv(64))
except OSError as e:  # (the server may have hung up before the request was sent)
    print("error", e)
"""
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable,
                        "-c", code], input=body, capture_output=True, timeout=60)
    assert p.stdout in (b"b''\n",) or p.stdout.startswith(b"error"), p
    assert not marker.exists()
    assert "refused a connection" in server.log() and "another context" in server.log()


def test_a_more_confined_process_is_refused(server, tmp_path):
    """no_new_privs (what every seccomp or Landlock sandbox sets) on the caller: the
    server, started unconfined, must not run commands for it."""
    server.start()
    path, key = server.socket_path(), server.key()
    marker = tmp_path / "m" / "marker"
    marker.parent.mkdir()
    os.chmod(marker.parent, 0o777)

    def no_new_privs():
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS

    assert _request(path, _marker_request(key, marker), preexec=no_new_privs) == b""
    assert not marker.exists()
    assert "another context" in server.log()
    # and the zviz client itself, so confined, uses another server (its own context): never this one
    before = server.served()
    r = server.run("run", "--", "true", preexec_fn=no_new_privs)
    assert r.returncode == 0 and server.served() == before


def test_idle_server_exits_and_a_new_one_starts(server):
    server.env["ZVIZ_SERVER_IDLE"] = "1"
    server.start()
    pid = server.pid()
    deadline = time.monotonic() + 20
    while alive(pid):
        assert time.monotonic() < deadline, "the idle server did not exit"
        time.sleep(0.05)
    assert not any(server.srv.glob("*.sock"))
    assert "exited" in server.log()
    # the next run starts another (and runs itself meanwhile)
    assert server.run("run", "--", "true").returncode == 0


@pytest.mark.parametrize("idle", ["nan", "-1", "0", "soon"])
def test_a_bad_idle_time_is_the_default(server, idle):
    """ZVIZ_SERVER_IDLE that is not a number of seconds > 0 is the default
    (said in the log): "nan" made the idle server spin on a CPU, "-1" one
    server started and gone per client."""
    server.env["ZVIZ_SERVER_IDLE"] = idle
    server.start()
    pid = server.pid()
    assert "idle exit after 300 s" in server.log() and "ZVIZ_SERVER_IDLE" in server.log()

    def cpu() -> float:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(0.5)  # (the server's start-up: imports, the pool's first sandbox)
    before = cpu()
    time.sleep(1.0)
    assert cpu() - before < 0.2 and alive(pid)
    served = server.served()
    assert server.run("run", "--", "true").returncode == 0 and server.served(served + 1) == served + 1


def test_off_switch_and_one_server_per_context(server):
    for value in ("0", "false", "OFF", "no", " 0 ", "disabled"):  # (what people write for off; unknown: off)
        off = {**server.env, "ZVIZ_SERVER": value}
        for _ in range(2):
            assert server.run("run", "--", "true", env=off).returncode == 0
        assert not any(server.srv.glob("*.lock")), f"ZVIZ_SERVER={value!r} started a server"
    server.start()
    pid = server.pid()
    # a second server of the same context gives way to the first (the lock)
    code = f"from zviz._cliserver import main; main({_cliclient.name_of(server.key())!r})"
    p = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, timeout=60)
    assert p.returncode == 0 and alive(pid)
    # another context (another zviz environment variable): another server
    other = {**server.env, "ZVIZ_MAX_SANDBOXES": "7"}
    for _ in range(2):
        assert server.run("run", "--", "true", env=other).returncode == 0
    deadline = time.monotonic() + 30
    while len(list(server.srv.glob("*.lock"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_stale_socket_is_replaced(server):
    server.start()
    pid = server.pid()
    os.kill(pid, signal.SIGKILL)  # no clean-up: the socket file stays
    while alive(pid):
        time.sleep(0.01)
    assert any(server.srv.glob("*.sock"))
    for _ in range(2):  # runs itself, starts a new server
        assert server.run("run", "--", "true").returncode == 0
    deadline = time.monotonic() + 30
    while "serving" not in server.log() or server.pid() == pid:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    before = server.served()
    assert server.run("run", "--", "true").returncode == 0
    assert server.served(before + 1) == before + 1



def test_the_client_loads_nothing_of_the_sandbox(server):
    """What makes `zviz run` cost a bare interpreter: through the server, the
    client process imports none of asyncio, anyio, attrs, argparse or the sandbox."""
    server.start()
    before = server.served()
    code = ("import sys; from zviz._cliclient import main; rc = main(['run', '--', 'true']); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('zviz', 'asyncio', 'anyio', 'attr', 'attrs', 'argparse', 'trio', 'typing')))")
    p = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True, timeout=60)
    assert p.stdout.split(" ", 1) == ["0", "['zviz', 'zviz._cachedir', 'zviz._cliclient', 'zviz._version']\n"], p
    assert server.served(before + 1) == before + 1


@pytest.mark.parametrize("through_server", [False, True])
def test_the_callers_stdio_stays_blocking(server, through_server):
    """The command's streams make their fds non-blocking; a dup shares that flag
    with the caller's description (a shell's terminal or pipe): it is put back."""
    env, before = _one_way(server, through_server)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        os.write(in_w, b"abc")
        os.close(in_w)
        p = subprocess.run([*ZVIZ, "run", "--", "cat"], stdin=in_r, stdout=out_w, env=env, timeout=60)
        assert p.returncode == 0 and os.read(out_r, 16) == b"abc"
        assert os.get_blocking(in_r) and os.get_blocking(out_w)
    finally:
        for fd in (in_r, out_r, out_w):
            os.close(fd)
    assert server.served(before + through_server) == before + through_server


@pytest.mark.parametrize("through_server", [False, True])
def test_a_closed_stdin_or_stdout_of_the_caller(server, through_server):
    """A caller's closed fd 0/1/2 is EOF / dropped output for the command, not
    whatever fd of zviz gets that number next (the client's socket to the
    server: the command read the server's answers from it and both hung)."""
    env, before = _one_way(server, through_server)
    zviz = " ".join(ZVIZ)
    r = subprocess.run(["sh", "-c", f"exec {zviz} run --timeout 10 -- sh -c 'cat; echo done' <&-"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"done\n"), r.stderr
    r = subprocess.run(["sh", "-c", f"exec {zviz} run --timeout 10 -- sh -c 'echo out; echo err >&2; exit 5' >&-"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"", b"err\n")
    r = subprocess.run(["sh", "-c", f"exec {zviz} run --timeout 10 -- sh -c 'echo out; echo err >&2' 2>&-"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"out\n", b"")
    assert server.served(before + 3 * through_server) == before + 3 * through_server


@pytest.mark.parametrize("through_server", [False, True])
def test_json_stdin_is_bounded(server, through_server):
    """--json holds stdin in memory (the server's, shared by every client): an
    endless one (/dev/zero) ends in a usage error that says what to do instead,
    and the server goes on serving; stdin up to the bound is the command's."""
    from zviz._cli import MAX_JSON_STDIN

    env, before = _one_way(server, through_server)
    with open("/dev/zero", "rb") as zero:
        r = server.run("run", "--json", "--", "true", stdin=zero, env=env)
    assert r.returncode == 2 and r.stdout == b"", r.stderr
    assert b"over 16 MiB" in r.stderr and b"without --json" in r.stderr and r.stderr.count(b"\n") == 1
    r = server.run("run", "--json", "--", "wc", "-c", input=b"x" * MAX_JSON_STDIN, env=env)
    assert r.returncode == 0 and f'"stdout": "{MAX_JSON_STDIN}\\n"'.encode() in r.stdout
    assert server.served(before + 2 * through_server) == before + 2 * through_server


def test_a_bad_pool_size_fails_every_run_alike(server):
    """A bad ZVIZ_POOL_SIZE (read by the server's pool) is the same one-line
    error for every `zviz run`: the first ones (in the client's process, the
    server's first request of a policy) as the later ones (from its pool)."""
    env = {**server.env, "ZVIZ_POOL_SIZE": "lots"}
    for _ in range(2):  # (in the client's process, which starts the server)
        r = server.run("run", "--", "true", env=env)
        assert r.returncode == 125 and b"ZVIZ_POOL_SIZE" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    deadline = time.monotonic() + 30
    while "serving" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    before = server.served()
    for _ in range(3):
        r = server.run("run", "--", "true", env=env)
        assert r.returncode == 125 and b"ZVIZ_POOL_SIZE" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    assert server.served(before + 3) == before + 3


@pytest.mark.parametrize("through_server", [False, True])
def test_a_reader_that_stops_ends_the_command_as_in_a_pipeline(server, through_server):
    """`zviz run -- yes | head -1`: once the caller's stdout has no reader, the
    command's writes fail (SIGPIPE: status 141, as `yes | head -1` without
    zviz), instead of the command blocking on a full pipe until the timeout."""
    env, before = _one_way(server, through_server)
    for stream in ("stdout", "stderr"):
        t0 = time.monotonic()
        cmd = "exec yes" + (" >&2" if stream == "stderr" else "")
        p = subprocess.Popen([*ZVIZ, "run", "--timeout", "20", "--", "sh", "-c", cmd],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pipe = p.stdout if stream == "stdout" else p.stderr
        assert pipe.read(4) == b"y\ny\n"
        pipe.close()
        assert p.wait(timeout=60) == 128 + signal.SIGPIPE
        assert time.monotonic() - t0 < 10
        (p.stderr if stream == "stdout" else p.stdout).close()
    assert server.served(before + 2 * through_server) == before + 2 * through_server


@pytest.mark.parametrize("through_server", [False, True])
def test_json_stdin_that_never_ends_is_bounded_by_the_timeout(server, through_server):
    """--json reads stdin to its end first: an inherited stdin whose writer
    never closes it (a service's pipe) ends at --timeout with status 124 and
    a message saying why, not never."""
    env, before = _one_way(server, through_server)
    r, w = os.pipe()
    try:
        t0 = time.monotonic()
        p = subprocess.run([*ZVIZ, "run", "--json", "--timeout", "1", "--", "true"], stdin=r, env=env,
                           capture_output=True, timeout=60)
        assert p.returncode == 124 and b"reading stdin" in p.stderr and b"</dev/null" in p.stderr, p.stderr
        assert p.stdout == b"" and time.monotonic() - t0 < 10
    finally:
        os.close(r)
        os.close(w)
    assert server.served(before + through_server) == before + through_server


@pytest.mark.parametrize("through_server", [False, True])
def test_a_json_record_that_cannot_be_written_is_said(server, through_server):
    """--json's record to a stdout that refuses it (a full disk: /dev/full) is
    lost: one line says so and the status is 1, alike with and without the
    server (before: a traceback in the client's process, silence in the server)."""
    env, before = _one_way(server, through_server)
    with open("/dev/full", "wb") as full:
        r = subprocess.run([*ZVIZ, "run", "--json", "--", "true"], stdout=full, stderr=subprocess.PIPE, env=env,
                           timeout=60)
    assert r.returncode == 1 and b"could not be written to stdout" in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr, r.stderr
    assert server.served(before + through_server) == before + through_server


def test_concurrent_clients_and_large_output(server):
    server.start()
    before = server.served()
    procs = [subprocess.Popen([*ZVIZ, "run", "--", "sh", "-c", f"sleep 0.3; echo client {i}"], env=server.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(6)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert (p.returncode, out) == (0, f"client {i}\n".encode()), err
    big = server.run("run", "--", "python3", "-c", "import sys; sys.stdout.write('x' * (8 << 20))")
    assert big.returncode == 0 and big.stdout == b"x" * (8 << 20)
    assert server.served(before + 7) == before + 7


def test_only_a_repeated_policy_keeps_a_sandbox_ready(server):
    """The server's pool: a policy served once (a one-off --env) leaves nothing
    pre-started behind; from its second request on one sandbox waits for it."""
    server.start()
    pid = server.pid()

    def zygotes() -> int:
        time.sleep(0.3)  # (the pool refills once the server's loop is idle)
        kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sum(pathlib.Path(f"/proc/{k}/comm").read_text().strip() == "_zviz_init" for k in kids)

    base = zygotes()
    for i in range(3):
        assert server.run("run", "--env", f"ONE_OFF={i}", "--", "true").returncode == 0
    assert zygotes() == base
    for _ in range(2):
        assert server.run("run", "--env", "AGAIN=1", "--", "true").returncode == 0
    assert zygotes() == base + 1
    r = server.run("run", "--env", "AGAIN=1", "--", "sh", "-c", "echo $AGAIN; ls /tmp | wc -l")
    assert (r.returncode, r.stdout) == (0, b"1\n0\n")  # the pooled one: fresh, its own empty /tmp
    assert zygotes() == base + 1


def test_json_output_reaches_a_slow_reader_whole(server):
    """--json prints the record (with the command's output in it) in one piece: a
    caller that starts reading only later gets all of it, as it would without the
    server (the server's own messages may be dropped for a stuck reader, this may not)."""
    server.start()
    before = server.served()
    with subprocess.Popen([*ZVIZ, "run", "--json", "--", "python3", "-c", "print('x' * 300000)"], env=server.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        time.sleep(4)  # (a slow reader: longer than the server waits for its own messages)
        out, err = p.communicate(timeout=60)
    import json

    record = json.loads(out)
    assert p.returncode == 0 and record["stdout"] == "x" * 300000 + "\n", err
    assert server.served(before + 1) == before + 1


def test_a_request_s_streams_die_with_it(tmp_path):
    """A task started during a request (the sandbox pool's, which serves every
    later client) carries a copy of that request's context, its sys.stdout and
    sys.stderr among it. Once the request is over, what such a task writes must
    not reach whatever file then has the client's old fd number."""
    import socket as socketmod

    import anyio

    from zviz import _cli, _cliserver, _lifecycle

    later = anyio.Event()
    wrote = anyio.Event()

    async def fake_serve_request(args, stdio, cwd, *rest):
        async def background():
            await later.wait()
            print("late words", file=sys.stderr, flush=True)
            wrote.set()

        _lifecycle.spawn_service(background, name="test")
        return 0

    async def main():
        a, b = socketmod.socketpair(socketmod.AF_UNIX, socketmod.SOCK_SEQPACKET)
        r, w = os.pipe()
        old_run, old_stderr = _cli.serve_request, sys.stderr
        _cli.serve_request = fake_serve_request
        sys.stderr = _cliserver._PerRequest(1, old_stderr)
        try:
            a.setblocking(False)
            assert await _cliserver._run(a, ["run"], (None, None, w), "/") == 0
            os.close(w)  # (the request is over: the server closes the client's fds)
            other = os.open(tmp_path / "next-client", os.O_WRONLY | os.O_CREAT, 0o600)  # the next one's fd
            try:
                assert other == w
                later.set()
                await wrote.wait()
            finally:
                os.close(other)
            assert (tmp_path / "next-client").read_bytes() == b""
        finally:
            _cli.serve_request, sys.stderr = old_run, old_stderr
            os.close(r)
            a.close()
            b.close()

    anyio.run(main, backend="asyncio")


_PROBE = "import os, sys; print(sys.flags.isolated, sys.argv, os.getcwd(), sys.stdin.read().upper()); sys.exit(3)"


@pytest.mark.parametrize("through_server", [False, True])
def test_python_c_is_a_warm_snippet_and_behaves_as_a_cold_one(server, through_server):
    """`zviz run -- python3 -c CODE` through the server starts as a fork of a
    warm interpreter (zviz.run_snippet's; -I -S in sys.flags is the one thing
    it shows), with the same stdin, stdout, stderr, status, argv and working
    directory as the interpreter started in the sandbox (--cold, or a `zviz
    run` in its own process, which would start a warm one for one snippet);
    any other command line runs as before."""
    env, before = _one_way(server, through_server)
    runs = {how: subprocess.run([*ZVIZ, "run", *flags, "--", "python3", "-c", _PROBE], env=env, input=b"abc",
                                capture_output=True, timeout=60)
            for how, flags in (("warm", ()), ("cold", ("--cold",)))}
    for how, r in runs.items():
        isolated = b"1" if how == "warm" and through_server else b"0"
        assert (r.returncode, r.stderr) == (3, b""), (how, r)
        assert r.stdout.startswith(isolated + b" ['-c'] ") and r.stdout.endswith(b" ABC\n"), (how, r)
    assert runs["warm"].stdout[1:] == runs["cold"].stdout[1:]
    # not `PYTHON -c CODE` alone: the interpreter starts in the sandbox
    r = subprocess.run([*ZVIZ, "run", "--", "python3", "-c", "import sys; print(sys.flags.isolated)", "arg"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"0\n"), r
    r = subprocess.run([*ZVIZ, "run", "--", "python3", "-S", "-c", "import sys; print(sys.flags.isolated)"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"0\n"), r
    # a policy the warm path refuses (PYTHONHASHSEED set for it) runs cold, the same command line
    r = subprocess.run([*ZVIZ, "run", "--env", "PYTHONHASHSEED=7", "--", "python3", "-c",
                        "import sys; print(sys.flags.isolated, sys.flags.hash_randomization)"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"0 1\n"), r
    assert server.served(before + 5 * through_server) == before + 5 * through_server


_SCRIPT = """import os, sys, helper
print(sys.flags.isolated, sys.argv, __file__, __name__, sys.path, helper.VALUE, os.getcwd(),
      sys.stdin.read().upper())
if sys.argv[-1] == "boom":
    raise ValueError("boom")
sys.exit(int(sys.argv[1]))
"""


def test_python_file_is_a_warm_snippet_and_behaves_as_a_cold_one(server, tmp_path):
    """`zviz run -- python3 FILE ARGS...` through the server is a warm snippet:
    the same stdout (but -I in sys.flags), stderr, status, sys.argv,
    __file__, __name__ and sys.path[0] (FILE's directory, links resolved:
    a module beside it imports) as `--cold`, for a path relative to the
    workdir and an absolute one through a link; a traceback and a syntax
    error alike. What is not a regular file there (missing, a directory) is
    Python's own business: the same message and status as cold. An option
    before FILE runs cold."""
    env, before = _one_way(server, True)
    work = tmp_path / "work"
    (work / "pkg").mkdir(parents=True)
    (work / "pkg" / "main.py").write_text(_SCRIPT)
    (work / "pkg" / "helper.py").write_text("VALUE = 42\n")
    (work / "link.py").symlink_to("pkg/main.py")
    (work / "bad.py").write_text("import sys\nprint(sys.argv)\nx = (\n")
    for p in (tmp_path, work, work / "pkg"):
        p.chmod(0o1777)  # (a root caller's sandbox runs as a uid of its own)
    cases = [(["pkg/main.py", "3", "x"], 3, b""),
             (["/workspace/link.py", "0", "boom"], 1, b'line 5, in <module>\n    raise ValueError("boom")\nValueError'),
             (["bad.py", "a"], 1, b'File "/workspace/bad.py", line 3\n    x = (\n        ^\nSyntaxError'),
             (["nope.py"], 2, b"python3: can't open file '/workspace/nope.py': [Errno 2]"),
             (["pkg"], 1, b"can't find '__main__' module in '/workspace/pkg'")]
    served = 0
    for args, status, err in cases:
        runs = {}
        for how, flags in (("warm", ()), ("cold", ("--cold",))):
            runs[how] = subprocess.run([*ZVIZ, "run", *flags, "--workdir", str(work), "--", "python3", *args],
                                       env=env, input=b"abc", capture_output=True, timeout=60)
            served += 1
        warm, cold = runs["warm"], runs["cold"]
        assert warm.returncode == cold.returncode == status, (args, warm, cold)
        assert warm.stderr == cold.stderr, (args, warm.stderr, cold.stderr)
        assert err in warm.stderr if err else warm.stderr == b"", (args, warm.stderr)
        if args[0].endswith("main.py") or args[0].endswith("link.py"):
            assert warm.stdout.startswith(b"1 ") and cold.stdout.startswith(b"0 "), (warm, cold)
            assert warm.stdout[1:] == cold.stdout[1:]
            assert f" {args!r} /workspace/".encode() in warm.stdout and b" __main__ ['/workspace/pkg', " in warm.stdout
            assert b"'/usr/lib/python3" in warm.stdout and b" 42 /workspace " in warm.stdout  # (all of sys.path)
        else:
            assert warm.stdout == cold.stdout
    r = subprocess.run([*ZVIZ, "run", "--workdir", str(work), "--", "python3", "-u", "pkg/main.py", "0"],
                       env=env, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout[:2]) == (0, b"0 "), r
    # --json: the record of a warm FILE run names the command line as given
    import json

    r = subprocess.run([*ZVIZ, "run", "--json", "--workdir", str(work), "--", "python3", "pkg/main.py", "4", "j"],
                       env=env, input=b"in", capture_output=True, timeout=60)
    record = json.loads(r.stdout)
    assert record["argv"] == ["python3", "pkg/main.py", "4", "j"] and record["status"] == 4, record
    assert record["stdout"].startswith("1 ['pkg/main.py', '4', 'j'] /workspace/pkg/main.py __main__ "), record
    assert server.served(before + served + 2) == before + served + 2


@pytest.mark.parametrize("through_server", [False, True])
def test_a_warm_snippet_s_json_record_and_timeout(server, through_server):
    import json

    env, before = _one_way(server, through_server)
    records = []
    for flags in ((), ("--cold",)):
        r = subprocess.run([*ZVIZ, "run", "--json", *flags, "--", "python3", "-c",
                            "import sys; print(sys.stdin.read(), sys.flags.isolated)"],
                           env=env, input=b"in", capture_output=True, timeout=60)
        assert r.returncode == 0, r
        records.append(json.loads(r.stdout))
    warm, cold = records
    assert warm["stdout"] == f"in {int(through_server)}\n" and cold["stdout"] == "in 0\n"
    assert warm["argv"] == cold["argv"] == ["python3", "-c", "import sys; print(sys.stdin.read(), sys.flags.isolated)"]
    assert (warm["status"], warm["signal"]) == (cold["status"], cold["signal"]) == (0, None)
    r = subprocess.run([*ZVIZ, "run", "--timeout", "0.5", "--", "python3", "-c", "import time; time.sleep(30)"],
                       env=env, capture_output=True, timeout=60)
    assert r.returncode == 124 and b"timed out" in r.stderr, r
    assert server.served(before + 3 * through_server) == before + 3 * through_server


def test_one_command_takes_a_pooled_sandbox_or_one_without_a_zygote(server):
    """`zviz run` runs one command: a ready pooled sandbox (its zygote is pid 1,
    the command's run-init pid 2, the command pid 3) when the server has one,
    else a sandbox whose command is the stage's own spawn (zviz-init pid 1, the
    command pid 2: one spawn and ~0.6 ms of CPU less), in its own process too.
    Domain egress keeps the zygote (its proxy listens in the namespace the
    zygote holds)."""
    env, _ = _one_way(server, False)
    show = ["sh", "-c", "echo $$; cat /proc/1/comm"]
    r = server.run("run", "--", *show, env=env)
    assert (r.returncode, r.stdout) == (0, b"2\n_zviz_init\n"), r
    r = server.run("run", "--allow-domain", "pkgs.test", "--", *show, env=env)
    assert (r.returncode, r.stdout) == (0, b"3\n_zviz_init\n"), r
    server.start()
    r = server.run("run", "--env", "FIRST=1", "--", *show)  # a policy the server has not seen: no pool
    assert (r.returncode, r.stdout) == (0, b"2\n_zviz_init\n"), r
    r = server.run("run", "--env", "FIRST=1", "--", *show)  # seen twice: the pool makes one for the next
    assert (r.returncode, r.stdout) == (0, b"2\n_zviz_init\n"), r
    time.sleep(0.5)  # (the pool refills once the server's loop is idle)
    r = server.run("run", "--env", "FIRST=1", "--", *show)
    assert (r.returncode, r.stdout) == (0, b"3\n_zviz_init\n"), r
