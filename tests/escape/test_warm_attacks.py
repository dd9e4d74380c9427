"""Warm snippets (zviz.run_snippet, zviz/_warm.py, zviz/_warmboot.py): a
snippet runs in a fork of an interpreter that zviz started ON THE HOST, made a
sandbox by the stage (_stage.spawn_warm) instead of an exec. Each test
attacks what the fork skips or shares, with what the host observed: the
server's and the sandboxes' /proc entries, its memory, files on the host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import trio

import zviz
from zviz import _warm

from ..conftest import IS_ROOT, alive, child_pids

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the warm path's attack tests read other processes' /proc as root")


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
    """The server's children once it has reaped the sandboxes it forked ([]
    then), or those still there after `within` seconds. A sandbox's pid 1
    is dead when its pidfd says so, which is what run_snippet waits for; its
    parent, the server, reaps it on SIGCHLD a moment later (a loaded machine
    can make that moment long)."""
    deadline = time.monotonic() + within
    while (left := _children(pid)) and time.monotonic() < deadline:
        await trio.sleep(0.02)
    return left


def _children(pid: int) -> list[int]:
    return sorted(child_pids(pid))


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def _sandbox_pids(server: int) -> tuple[int, int]:
    """(pid 1, the snippet) of the one sandbox the server has, host pids."""
    for _ in range(500):
        for init in _children(server):
            kids = _children(init)
            if kids:
                return init, kids[0]
        await trio.sleep(0.01)
    raise AssertionError("no sandbox of the warm server appeared")


# ------------------------------------------------------------------ capabilities

LO_DOWN = r"""
import socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
# RTM_NEWLINK (16), NLM_F_REQUEST|NLM_F_ACK: ifindex 1 (lo), flags 0, change IFF_UP
body = struct.pack("=BxHiII", 0, 0, 1, 0, 1)
s.send(struct.pack("=LHHLL", 16 + len(body), 16, 1 | 4, 1, 0) + body)
d = s.recv(4096)
print("lo-down errno", -struct.unpack_from("=i", d, 16)[0])
sys.stdout.flush()
import time; time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 2)
"""


def test_snippet_has_no_capabilities_an_exec_would_drop():
    """The new user namespace gives the child every capability in it; an exec
    of the sandbox's (non-root) uid drops them, and a warm child is never
    exec'd. Before the fix the snippet held all of them (CapEff 1ffffffffff):
    it took its network namespace's lo down (rtnetlink, CAP_NET_ADMIN), the
    privileged half of the kernel's netlink surface that no exec'd program of
    the policy reaches."""

    async def main():
        async with trio.open_nursery() as n:
            got = {}

            async def run():
                got["r"] = await zviz.run_snippet(LO_DOWN, warm=True)

            n.start_soon(run)
            for _ in range(500):
                if _warm._servers:
                    break
                await trio.sleep(0.01)
            init, snippet = await _sandbox_pids(_server_pid())
            got["init"], got["snippet"] = _status(init), _status(snippet)
        return got

    got = trio.run(main)
    r = got["r"]
    assert r.exit_code == 0, r.stderr
    assert b"lo-down errno 1\n" in r.stdout  # EPERM, as for `python -c` in a sandbox of the policy
    for who in ("init", "snippet"):  # seen from the host
        st = got[who]
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (who, st["CapEff"])
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", who
        assert int(st["Uid"].split()[0]) != 0, who


def test_snippet_capabilities_match_the_cold_path():
    async def main():
        code = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapPrm', 'CapEff'))])"
        cold = await zviz.run_snippet(code, warm=False)
        warm = await zviz.run_snippet(code, warm=True)
        return cold, warm

    cold, warm = trio.run(main)
    assert cold.stdout == warm.stdout == b"['0000000000000000', '0000000000000000']\n"


# ------------------------------------------------------------------ the host's interpreter and its environment

EVIL_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fprintf(f, "ran as uid %d\n", (int)getuid()); fclose(f); }
}
"""


@pytest.fixture
def evil_library(tmp_path):
    """A shared library whose constructor writes a marker file: the bytes a
    sandbox writes, the marker a path on the host that no sandbox sees."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the library (apt-get install gcc)")
    marker = tmp_path / "host-marker"
    src = tmp_path / "evil.c"
    src.write_text(EVIL_C)
    out = tmp_path / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(out), str(src)], check=True)
    return out.read_bytes(), marker


@pytest.mark.parametrize("var", ["LD_PRELOAD", "LD_AUDIT"])
def test_sandbox_written_library_never_runs_on_the_host(evil_library, tmp_path, var):
    """A first snippet writes a library into the policy's read-write
    directory; a second names it in its environment. The warm server is
    started on the host, unconfined, with (before the fix) the sandbox's whole
    environment: the dynamic loader ran the sandbox's library as root on the
    host. Now the server gets the locale only, and the variable keeps the
    snippet off the warm path (it runs, cold, in its sandbox)."""
    lib, marker = evil_library
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    policy = zviz.Policy.python().with_paths(read_write=[str(shared)])
    planted = str(shared / "libcache.so")

    async def main():
        w = await zviz.run_snippet(f"import sys; open({planted!r}, 'wb').write(sys.stdin.buffer.read())", policy,
                                   stdin=lib)
        assert w.exit_code == 0, w.stderr
        results = [await zviz.run_snippet("print('ran')", policy, env={var: planted})]
        assert not marker.exists(), marker.read_text()  # no code of the sandbox's ran on the host
        with pytest.raises(zviz.FeatureUnavailable, match=var):
            await zviz.run_snippet("print('ran')", policy, env={var: planted}, warm=True)
        return results

    (r,) = trio.run(main)
    assert os.path.exists(planted)  # the sandbox did write it
    assert r.stdout == b"ran\n"
    assert not marker.exists(), marker.read_text()  # no code of the sandbox's ran on the host


def test_server_environment_holds_the_locale_only():
    """Whatever else the sandbox's environment says (NLSPATH, TZDIR, HOSTALIASES...:
    read by libc on the host) stays out of the host process; the snippet
    still sees all of it."""
    env = {"ZVIZ_WARM_MARK": "m-1", "TZDIR": "/nonexistent", "NLSPATH": "/x/%N"}

    async def main():
        r = await zviz.run_snippet("import os; print(os.environ['ZVIZ_WARM_MARK'], os.environ['NLSPATH'])",
                                   env=env, warm=True)
        with open(f"/proc/{_server_pid()}/environ", "rb") as f:
            return r, f.read()

    r, environ = trio.run(main)
    assert r.stdout == b"m-1 /x/%N\n", r.stderr
    names = {item.split(b"=", 1)[0].decode() for item in environ.split(b"\0") if item}
    assert names <= _warm.START_VARS, names


@pytest.mark.parametrize("var", ["LC_ALL", "LANG", "LC_CTYPE"])
def test_locale_named_by_a_path_is_not_loaded_on_the_host(var):
    """glibc loads a locale named by an absolute path from that file."""
    with pytest.raises(zviz.FeatureUnavailable, match=var):
        trio.run(lambda: zviz.run_snippet("pass", env={var: "/tmp/evil-locale"}, warm=True))


def test_interpreter_under_a_writable_directory_is_refused(tmp_path):
    """A python found through PATH in a directory a sandbox can write (or a
    symlink to one, or a venv whose home is one) is never started on the host."""
    rw = tmp_path / "rw"
    (rw / "venv" / "bin").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    real = os.path.realpath("/usr/bin/python3")
    shutil.copy(real, rw / "python3")
    ro = tmp_path / "ro"
    (ro / "bin").mkdir(parents=True)
    os.symlink(rw / "python3", ro / "bin" / "python3")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(real, venv / "bin" / "python3")
    (venv / "pyvenv.cfg").write_text(f"home = {rw}\n")
    writable = (str(rw),)
    # the ways Python's getpath reads a venv's home that install_roots missed:
    # bin/pyvenv.cfg, the key in another case, a relative home (from "/")
    for n, (where, text) in enumerate((("bin", f"home = {rw}\n"), (".", f"Home = {rw}\n"),
                                       (".", f"home = {str(rw).lstrip('/')}\n"))):
        v = tmp_path / f"venv{n}"
        (v / "bin").mkdir(parents=True)
        os.symlink(real, v / "bin" / "python3")
        (v / where / "pyvenv.cfg").write_text(text)
        assert _warm.why_not_python(str(v / "bin" / "python3"), writable), text
    assert _warm.why_not_python(str(rw / "python3"), writable)
    assert _warm.why_not_python(str(ro / "bin" / "python3"), writable)
    assert _warm.why_not_python(str(venv / "bin" / "python3"), writable)
    assert _warm.why_not_python(real, writable) is None
    policy = zviz.Policy.python(env={"PATH": f"{rw}:/usr/bin:/bin"}).with_paths(read_only=[str(tmp_path)],
                                                                                   read_write=[str(rw)])
    with pytest.raises(zviz.FeatureUnavailable, match="installed under"):
        trio.run(lambda: zviz.run_snippet("pass", policy, warm=True))


# ------------------------------------------------------------------ what a snippet inherits

FD_SCAN = r"""
import os
fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
print(sorted(int(x) for x in os.listdir("/proc/self/fd")), fds)
"""


def test_snippet_inherits_no_fd_of_the_server_or_of_other_snippets():
    async def main():
        first = await zviz.run_snippet("import time; time.sleep(0.1)", warm=True)
        second = await zviz.run_snippet(FD_SCAN, warm=True)
        return first, second

    first, second = trio.run(main)
    assert first.exit_code == 0
    # 3 is listdir's own directory fd; nothing at all from 3 to 1023 otherwise
    assert second.stdout == b"[0, 1, 2, 3] []\n", second.stderr


def test_channel_fd_number_does_not_collide_with_the_sandbox_fds():
    """The server's channel keeps the host's socketpair number; the stage
    closes it in the sandbox, where 3 is the status pipe and 6 the snippet's
    input. The child used to close that number again (the socket object's
    finalizer): with the host's socketpair on (5, 6) every snippet exited 127
    with an EBADF traceback of the server's code."""
    script = r"""
import os, socket, sys, trio, zviz
for fd in range(3, 64):
    try:
        os.fstat(fd)
    except OSError:
        os.dup2(os.open("/dev/null", os.O_RDONLY), fd)
real = socket.socketpair
armed = []
def socketpair(*a, **k):
    if armed and a and a[1] == socket.SOCK_SEQPACKET:
        want = int(sys.argv[1])
        os.close(want - 1 if want - 1 > 2 else 0)  # (stdin, not stderr, for the host's end below 3)
        os.close(want)
        ours, theirs = real(*a, **k)
        assert theirs.fileno() == want
        return ours, theirs
    return real(*a, **k)
socket.socketpair = socketpair
async def main():
    armed.append(1)
    r = await zviz.run_snippet("print('hello')", warm=True)
    print(r.exit_code, r.stdout, file=sys.stderr)
    sys.exit(0 if r.stdout == b"hello\n" else 1)
trio.run(main)
"""
    import sys

    for fd in (6, 3):
        p = subprocess.run([sys.executable, "-c", script, str(fd)], capture_output=True, timeout=60)
        assert p.returncode == 0, (fd, p.stderr[-2000:])


def test_server_memory_never_holds_a_snippets_code_env_or_stdin():
    """What one snippet gets passes through its own fork's pipe, never the
    server's memory, which every later snippet's fork copies. The host reads
    the whole server's memory after a snippet and looks for its markers."""
    marks = {k: os.urandom(8).hex() for k in ("code", "env", "stdin", "out")}

    async def main():
        r = await zviz.run_snippet(f"import sys; x = {marks['code']!r}; sys.stdin.read(); print({marks['out']!r})",
                                   env={"MARK": marks["env"]}, stdin=marks["stdin"].encode(), warm=True)
        assert r.stdout.decode().strip() == marks["out"]
        probe = await zviz.run_snippet("print('next')", env={"MARK": marks["env"]}, warm=True)
        assert probe.stdout == b"next\n"
        return _server_pid()  # the one server: keyed by the interpreter and the environment

    pid = trio.run(main)
    seen = b""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r") or "[vsyscall]" in line:
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                seen += mem.read(hi - lo)
            except OSError:
                pass
    assert b"_as_fresh_interpreter" in seen  # the memory was read (the server's own code is there)
    for what, mark in marks.items():
        assert mark.encode() not in seen, what


# ------------------------------------------------------------------ the server survives its snippets

HOSTILE = {
    "flood": "import os\nwhile True: os.write(1, b'x' * 65536)",
    "close stdio": "import os\nfor fd in (0, 1, 2): os.close(fd)\nimport time; time.sleep(0.2)",
    "kill pid 1": "import os, signal\nfor s in (signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV): os.kill(1, s)\n"
                  "print('alive')",
    "fork bomb": "import os\nfor _ in range(60):\n    try: os.fork()\n    except OSError: break\n"
                 "import time; time.sleep(30)",
    "segfault": "import ctypes; ctypes.string_at(0)",
    "setsid daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_snippet_leaves_the_server_working_and_nothing_running(name):
    async def main():
        r = await zviz.run_snippet(HOSTILE[name], warm=True, timeout=3)
        server = _server_pid()
        after = await zviz.run_snippet("print('next')", warm=True)
        assert _server_pid() == server  # the same server, not one started again
        for _ in range(300):  # pid 1 dies, then the kernel kills the rest of its namespace
            if not _children(server):
                break
            await trio.sleep(0.01)
        return r, after, server

    r, after, server = trio.run(main)
    assert after.exit_code == 0 and after.stdout == b"next\n", after.stderr
    assert _children(server) == []
    if name == "kill pid 1":  # pid 1 of a namespace takes no signal from inside it
        assert r.stdout == b"alive\n"


def test_timeout_and_cancellation_leave_no_process_and_no_workdir():
    tmp = os.environ.get("TMPDIR", "/tmp")
    before = set(os.listdir(tmp))

    async def main():
        await zviz.run_snippet("pass", warm=True)
        server = _server_pid()
        t0 = time.monotonic()
        r = await zviz.run_snippet("import os, time\nos.fork(); os.fork()\nwhile True: time.sleep(1)", warm=True,
                                   timeout=1)
        assert r.timed_out and time.monotonic() - t0 < 10
        assert await _no_children_left(server) == []
        with trio.move_on_after(1) as scope:
            await zviz.run_snippet("import os, time\nos.fork()\nwhile True: time.sleep(1)", warm=True)
        assert scope.cancelled_caught
        assert await _no_children_left(server) == []
        return server

    trio.run(main)
    new = set(os.listdir(tmp)) - before - {"zviz-0"}
    assert not new, f"left in {tmp}: {sorted(new)}"


def test_memory_limit_holds_for_a_warm_snippet():
    """The snippet joins the sandbox's memory cgroup (a fork of a host process:
    its own pages are charged there): 400 MB in a memfd under a 128 MB limit."""
    import attrs

    code = ("import os\nfd = os.memfd_create('x')\nfor i in range(400):\n    os.write(fd, b'x' * (1 << 20))\n"
            "print('wrote it all')")
    policy = zviz.Policy.python()
    policy = attrs.evolve(policy, limits=attrs.evolve(policy.limits, memory=128 << 20))
    r = trio.run(lambda: zviz.run_snippet(code, policy, warm=True))
    assert b"wrote it all" not in r.stdout
    assert r.exit_code != 0


# ------------------------------------------------------------------ what a user sees, as with `python -c`

SAME = {
    "traceback": "def f():\n    raise ValueError('boom')\nf()",
    "keyboard interrupt": "raise KeyboardInterrupt",
    "exit with a string": "import sys; sys.exit('bye')",
    "exit code": "import sys; sys.exit(263)",
    "atexit and buffered output": "import atexit, sys\natexit.register(lambda: print('atexit'))\n"
                                  "sys.stdout.write('no newline ')",
    "file left open": "f = open('/tmp/x', 'w'); f.write('data')\nimport atexit\n"
                      "atexit.register(lambda: None)",
    "thread": "import threading, time\n"
              "threading.Thread(target=lambda: (time.sleep(0.1), print('thread'))).start()",
    "stdin": "import sys; print(repr(sys.stdin.read()))",
    "signals": "import signal\nprint([str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGPIPE,"
               " signal.SIGCHLD, signal.SIGTERM)])",
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_snippet_behaves_like_python_c(name):
    async def main():
        cold = await zviz.run_snippet(SAME[name], warm=False, stdin=b"in")
        warm = await zviz.run_snippet(SAME[name], warm=True, stdin=b"in")
        return cold, warm

    cold, warm = trio.run(main)
    assert (warm.exit_code, warm.stdout, warm.stderr) == (cold.exit_code, cold.stdout, cold.stderr)


def test_other_environments_servers_do_not_kill_a_running_snippet():
    """At most MAX_SERVERS warm interpreters per process: starting one more
    evicts the oldest, and closing a server kills its sandboxes (their
    parent-death signal). A caller with a few distinct locales killed another
    caller's running snippet, which then read as `exit 127`, no output. Now an
    evicted server lives on until its snippets are done, then goes."""
    langs = ["C.UTF-8", "C", "POSIX", "en_US.UTF-8", "C.utf8", "en_US"]
    assert len(langs) > _warm.MAX_SERVERS

    async def main():
        res = {}
        first = {}

        async def one(i, code):
            res[i] = await zviz.run_snippet(code, env={"LANG": langs[i]}, warm=True)

        async with trio.open_nursery() as n:
            n.start_soon(one, 0, "import time; time.sleep(2); print('survived')")
            while not _warm._servers:
                await trio.sleep(0.01)
            first["pid"] = _server_pid()
            await trio.sleep(0.3)
            for i in range(1, len(langs)):
                n.start_soon(one, i, "print('x')")
        return res, first["pid"]

    res, first = trio.run(main)
    assert res[0].stdout == b"survived\n" and res[0].exit_code == 0, res[0]
    assert all(res[i].stdout == b"x\n" for i in range(1, len(langs)))
    assert len(_warm._servers) <= _warm.MAX_SERVERS
    assert first not in [s._proc.pid for s in _warm._servers.values() if s._proc is not None]
    assert not alive(first)  # evicted, then closed once its snippet was done


def test_python_argument_never_runs_another_program_on_the_host(tmp_path, monkeypatch):
    """In the cold path `python=` names what runs IN the sandbox; the warm
    path starts it ON the host with the server's arguments `-I BOOT STAGE FD`.
    run_snippet(python="rm") ran `rm -I _warmboot.py _stage...so 16` as root
    and removed zviz's own files (here stand-ins for them), before falling
    back. Now only a file named like a CPython is started on the host."""
    from zviz import _stage

    boot, stage = tmp_path / "boot.py", tmp_path / "stage.so"
    boot.write_text("# stand-in")
    stage.write_text("# stand-in")
    monkeypatch.setattr(_warm, "BOOT", str(boot))
    monkeypatch.setattr(_stage, "__file__", str(stage))
    link = tmp_path / "bin" / "python3"
    link.parent.mkdir()
    os.symlink(shutil.which("rm"), link)  # a python3 that is rm
    os.chmod(tmp_path, 0o755)

    async def main():
        r = await zviz.run_snippet("print(1)", python="rm")  # warm=None: falls back, cold
        assert b"invalid option" in r.stderr  # rm -c, in the sandbox
        assert boot.exists() and stage.exists()
        with pytest.raises(zviz.FeatureUnavailable, match="not a Python"):
            await zviz.run_snippet("print(1)", python="rm", warm=True)
        policy = zviz.Policy.python().with_paths(read_only=[str(tmp_path)])
        with pytest.raises(zviz.FeatureUnavailable, match="not a Python"):
            await zviz.run_snippet("print(1)", policy, python=str(link), warm=True)

    trio.run(main)
    assert boot.exists() and stage.exists()


FORKS = r"""
import json, os, sys, trio, zviz
from zviz import _warm

async def runs(tag, n):
    bad = []
    for i in range(n):
        r = await zviz.run_snippet(f"import time; time.sleep(0.0{i % 5}); print('{tag}-{i}')", warm=True, timeout=20)
        if r.stdout != f"{tag}-{i}\n".encode() or r.exit_code != 0:
            bad.append((i, r.exit_code))
    return bad

trio.run(runs, "warm-up", 1)
server = list(_warm._servers.values())[0]._proc.pid
kids = []
for k in range(3):
    pid = os.fork()
    if pid == 0:
        bad = trio.run(runs, f"child{k}", 12)
        os.write(1, f"child{k} wrong {bad}\n".encode())
        sys.exit(0)  # atexit (close_all) runs in the child
    kids.append(pid)
bad = trio.run(runs, "parent", 12)
os.write(1, f"parent wrong {bad}\n".encode())
for pid in kids:
    os.waitpid(pid, 0)
after = trio.run(runs, "after", 2)
print("server", json.dumps([server, list(_warm._servers.values())[0]._proc.pid, after]), flush=True)
"""


def test_a_fork_of_the_host_process_does_not_share_or_kill_its_servers():
    """A forked host process (multiprocessing's workers) inherits the warm
    servers' channels: parent and child sent requests on one socket and read
    each other's replies (a sandbox's pidfd and seccomp listener went to the
    other process, whose supervisor answered for that sandbox by its own
    policy): snippets that printed their line read as exit 127. Now a child
    drops the inherited servers and starts its own; the parent's server
    survives the children's exits."""
    import sys

    p = subprocess.run([sys.executable, "-c", FORKS], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert sorted(line for line in lines if "wrong" in line) == [
        "child0 wrong []", "child1 wrong []", "child2 wrong []", "parent wrong []"], p.stdout
    (last,) = [line for line in lines if line.startswith("server ")]
    before, after, wrong = json.loads(last.split(" ", 1)[1])
    assert wrong == [] and before == after, last  # the same server served the parent after its children's exits


PIPE_HOG = r"""
import fcntl, os, time
held = []
for i in range(200):  # 1 MiB pipes until the kernel refuses (the user's fs.pipe-user-pages-soft)
    r, w = os.pipe()
    held.append((r, w))
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        break
for j in range(400):  # then default pipes until a new one is cut to the minimum
    r, w = os.pipe()
    held.append((r, w))
    if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < 65536:
        break
print("a new pipe holds", fcntl.fcntl(w, fcntl.F_GETPIPE_SZ), flush=True)
time.sleep(3.5)
"""


def _hog_then_snippet():
    import threading

    out = {}
    code = "x = 1\n" + "#" * 20000 + "\nprint('ran', x)"

    async def main():
        async with trio.open_nursery() as n:
            async def hog():
                out["hog"] = await zviz.run_snippet(PIPE_HOG)

            n.start_soon(hog)
            await trio.sleep(2.5)
            out["snippet"] = await zviz.run_snippet(code)

    def go():
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001
            out["error"] = repr(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(40)
    hung = t.is_alive()
    r = out.get("snippet")
    return hung, out.get("hog") and out["hog"].stdout, r and (r.exit_code, r.stdout), out.get("error")


def test_pipe_buffer_exhaustion_does_not_hang_the_host():
    """An unprivileged zviz's sandboxes are charged to its own uid's pipe
    buffers: a snippet holding them past fs.pipe-user-pages-soft makes every
    new pipe of that user 8 KiB, and the warm path wrote a bigger snippet's
    input into a fresh pipe, blocking, on the event loop: the whole host
    process hung (the hog's own result never came either). Now the input pipe
    is never written blocking; what does not fit runs cold."""
    from ..conftest import _warm_up, run_as

    _warm_up()
    hung, hog, snippet, error = run_as("nobody", _hog_then_snippet)
    assert not hung, "the host process hung"
    assert error is None, error
    assert hog and int(hog.split()[-1]) < 65536, hog  # the attack did squeeze the user's pipes
    assert snippet == (0, b"ran 1\n")


def test_a_retry_after_the_server_went_gets_its_input_again(monkeypatch):
    """A server that dies between making a sandbox and answering (ServerGone)
    is started again and the snippet retried; the first fork may already have
    read the snippet's input, and the retry was given the same, drained, pipe:
    it failed with a JSONDecodeError of the fork server's. Now each attempt
    has its own pipe. (The server's death is simulated after a real spawn,
    once its fork has drained the input.)"""
    import fcntl
    import struct
    import termios

    real = _warm.Server.spawn
    calls = []

    async def spawn(self, stage, packed, command, input_fd):
        got = await real(self, stage, packed, command, input_fd)
        calls.append(input_fd)
        if len(calls) == 1:
            deadline = time.monotonic() + 10
            while struct.unpack("i", fcntl.ioctl(input_fd, termios.FIONREAD, b"\0" * 4))[0] and \
                    time.monotonic() < deadline:
                await trio.sleep(0.005)
            got.pidfd.close()
            if got.listener is not None:
                got.listener.close()
            self.close()
            raise _warm.ServerGone("simulated: the server died before it answered")
        return got

    monkeypatch.setattr(_warm.Server, "spawn", spawn)
    r = trio.run(lambda: zviz.run_snippet("print('once')", warm=True))
    assert len(calls) == 2
    assert (r.exit_code, r.stdout) == (0, b"once\n"), r.stderr


_READ_PID_FILES = r'''
import os, sys, json
out = {}
for pid in (1, os.getppid()):
    for f in ("environ", "maps", "mem"):
        try:
            with open(f"/proc/{pid}/{f}", "rb") as fh:
                fh.read(16)
            out[f"{pid}/{f}"] = 0
        except OSError as e:
            out[f"{pid}/{f}"] = e.errno
for f in ("environ", "maps"):
    with open(f"/proc/self/{f}", "rb") as fh:
        out[f"self/{f}"] = len(fh.read())
print(json.dumps(out))
'''


@pytest.mark.trio
async def test_a_snippet_cannot_read_its_pid_1_through_proc():
    """The process above a snippet holds nothing of the snippet's own (a warm
    snippet's pid 1 is the host interpreter's fork, whose memory, environment
    and maps name zviz's install and the server's start-up; a cold one's is
    zviz-init with the command): as under a zygote, /proc/1/{environ,maps,mem}
    and the parent's are refused (EACCES: pid 1 is undumpable), while the
    snippet reads its own /proc/self as a program does."""
    import errno

    results = {"warm": await zviz.run_snippet(_READ_PID_FILES, warm=True),
               "cold": await zviz.run_snippet(_READ_PID_FILES, warm=False)}
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        results["zygote"] = await sb.run(["python3", "-c", _READ_PID_FILES])
    for how, r in results.items():
        assert r.exit_code == 0, (how, r.stderr)
        got = json.loads(r.stdout)
        for key, value in got.items():
            if key.startswith("self/"):
                assert value > 0, (how, got)
            else:
                assert value == errno.EACCES, (how, key, got)
