"""zviz.run_snippet: one fresh sandbox per snippet, its interpreter a fork of
a warm one (zviz/_warm.py, zviz/_warmboot.py). What a snippet sees must be
what `python -c` sees in a fresh sandbox of the same policy (each probe runs
both ways and compares); nothing of one snippet reaches another or the fork
server; what the warm path cannot do safely it refuses, naming why."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import anyio
import pytest

import zviz
from zviz import Policy, _warm

from .conftest import IS_ROOT, Snapshot, child_pids, run_as

PY = "/usr/bin/python3"


def _same_python() -> bool:
    import subprocess

    try:
        out = subprocess.run([PY, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return out.stdout.decode().strip() == str(sys.version_info[:2])


pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not _same_python(), reason=f"{PY} is not a CPython of this one's version: the "
                                 "warm path loads zviz's C stage into it")]


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


def _servers() -> list[_warm.Server]:
    """The live fork servers (one killed by a test and not used since still counts as alive to zviz)."""
    return [s for s in _warm._servers.values() if s.alive and s._proc is not None and s._proc.poll() is None]


PROBE = textwrap.dedent(r"""
    import json, os, signal, sys
    print(json.dumps({
        "name": __name__, "argv": sys.argv, "path": sys.path, "cwd": os.getcwd(),
        "env": dict(os.environ), "ids": [os.getuid(), os.getgid(), os.geteuid()],
        "fds": sorted(os.listdir("/proc/self/fd")),
        "sigs": [str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGCHLD, signal.SIGXFSZ)],
        "kernel_sigs": open("/proc/self/status").read().split("SigIgn:")[1].split()[0],
        "caps": [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd", "CapPrm"))],
        "nnp": [l.split()[1] for l in open("/proc/self/status") if l.startswith(("NoNewPrivs", "Seccomp:"))],
        "tmp": os.listdir("/tmp"), "dwb": sys.dont_write_bytecode, "main_keys": sorted(globals()),
        "main": [repr(globals()[k]) for k in ("__loader__", "__spec__", "__package__", "__doc__", "__annotations__")],
        "stdin": sys.stdin.read(), "ppid_is_init": os.getppid() == 1,
        "hook": hasattr(sys, "__interactivehook__"), "site": "site" in sys.modules,
    }))
""")


async def test_a_warm_snippet_sees_what_python_c_sees_in_a_fresh_sandbox():
    got = {}
    for warm in (True, False):
        r = await zviz.run_snippet(PROBE, stdin=b"in put", env={"EXTRA": "1"}, warm=warm, python=PY)
        assert r.exit_code == 0, r.stderr.decode()
        got[warm] = json.loads(r.stdout)
    w, c = got[True], got[False]
    # the fork's own leftovers the probe itself shows: fd 3 is its listdir; main_keys has its own names
    for key in ("name", "argv", "path", "cwd", "env", "ids", "fds", "sigs", "kernel_sigs", "caps", "nnp", "tmp",
                "dwb", "main_keys", "main", "stdin", "ppid_is_init", "hook", "site"):
        assert w[key] == c[key], (key, w[key], c[key])
    assert w["fds"] == ["0", "1", "2", "3"]  # nothing of the server: stdio and the listing's own
    assert w["env"]["EXTRA"] == "1" and w["stdin"] == "in put"


@pytest.mark.parametrize(("code", "status", "out", "err"), [
    ("print('a'); import sys; print('b', file=sys.stderr)", 0, b"a\n", b"b\n"),
    ("import sys; sys.exit(3)", 3, b"", b""),
    ("import sys; sys.exit('bye')", 1, b"", b"bye\n"),
    ("raise ValueError('boom')", 1, b"", b"ValueError: boom\n"),
    ("x = (", 1, b"", b"SyntaxError"),
    ("import os; os._exit(7)", 7, b"", b""),
    ("import atexit; atexit.register(print, 'at exit')", 0, b"at exit\n", b""),
    ("import threading, time; threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()",
     0, b"late\n", b""),
    ("import sys; sys.stdout.write('x' * 100000)", 0, b"x" * 100000, b""),
])
async def test_exit_status_and_output_are_python_cs(code, status, out, err):
    stderr = {}
    for warm in (True, False):
        r = await zviz.run_snippet(code, warm=warm, python=PY)
        assert r.exit_code == status, (warm, r)
        assert r.stdout == out
        assert err in r.stderr, (warm, r.stderr)
        stderr[warm] = r.stderr
    assert stderr[True] == stderr[False]  # the same traceback: no frame of the fork server's


async def test_keyboard_interrupt_ends_like_python_c():
    results = [await zviz.run_snippet("raise KeyboardInterrupt", warm=w, python=PY) for w in (True, False)]
    assert next((r.exit_code, r.signal) for r in results) == [(r.exit_code, r.signal) for r in results][1]
    assert all(b"KeyboardInterrupt" in r.stderr for r in results)


async def test_files_left_open_are_flushed_at_the_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    import attrs

    p = Policy.python()
    policy = attrs.evolve(p, fs=attrs.evolve(p.fs, read_write=(*p.fs.read_write, str(out))))
    code = (f"f = open({str(out / 'left-open')!r}, 'w'); f.write('data')\n"
            f"import json; g = open({str(out / 'in-a-module')!r}, 'w'); json.kept = g; g.write('more')")
    r = await zviz.run_snippet(code, policy, warm=True, python=PY)
    assert r.exit_code == 0, r
    assert (out / "left-open").read_text() == "data"
    assert (out / "in-a-module").read_text() == "more"


async def test_each_snippet_gets_a_fresh_sandbox_and_interpreter():
    a = await zviz.run_snippet("import os, builtins; builtins.LEAK = 1; open('/tmp/a', 'w').write('x'); "
                               "open('/workspace/a', 'w').write('x'); os.environ['A'] = '1'", warm=True, python=PY)
    assert a.exit_code == 0, a
    b = await zviz.run_snippet("import os, builtins; print(hasattr(builtins, 'LEAK'), os.path.exists('/tmp/a'), "
                               "os.path.exists('/workspace/a'), 'A' in os.environ)", warm=True, python=PY)
    assert b.stdout == b"False False False False\n", b


@pytest.mark.skipif(not IS_ROOT, reason="reads the fork server's memory: root")
async def test_the_fork_server_never_holds_a_snippets_code_or_environment():
    marker = "zviz-marker-" + os.urandom(8).hex()
    r = await zviz.run_snippet(f"print({marker!r}[:4])", env={"SECRET": marker + "-env"}, warm=True, python=PY)
    assert r.exit_code == 0, r
    servers = [s for s in _servers() if s._proc is not None and ("SECRET", marker + "-env") not in s.env]
    assert servers
    found = []
    for s in servers:
        pid = s._proc.pid
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                addr, perms = line.split()[:2]
                if "r" not in perms:
                    continue
                lo, hi = (int(x, 16) for x in addr.split("-"))
                try:
                    mem.seek(lo)
                    chunk = mem.read(hi - lo)
                except OSError:
                    continue
                if marker.encode() in chunk:
                    found.append((pid, line.strip()))
    assert not found, found


async def test_a_timeout_kills_the_snippet_and_the_server_goes_on():
    await zviz.run_snippet("pass", warm=True, python=PY)  # (the fork server, a child of ours, is up before)
    snap = Snapshot()
    r = await zviz.run_snippet("while True: pass", timeout=0.5, warm=True, python=PY)
    assert r.timed_out
    r = await zviz.run_snippet("print('next')", warm=True, python=PY)
    assert r.stdout == b"next\n"
    await snap.assert_released()


async def test_a_cancelled_snippet_leaves_nothing():
    await zviz.run_snippet("pass", warm=True, python=PY)  # (the fork server, a child of ours, is up before)
    snap = Snapshot()
    with anyio.move_on_after(0.5):
        await zviz.run_snippet("import time; time.sleep(60)", warm=True, python=PY)
    await snap.assert_released()
    # its sandbox's processes were the server's children: none is left
    for s in _servers():
        assert s._proc is not None
        with open(f"/proc/{s._proc.pid}/task/{s._proc.pid}/children") as f:
            assert f.read().split() == []


async def test_a_dead_server_is_started_again():
    r = await zviz.run_snippet("pass", warm=True, python=PY)
    assert r.exit_code == 0
    for s in _servers():
        assert s._proc is not None
        s._proc.kill()  # (one killed by an earlier test and not used since: already dead)
        s._proc.wait()
    r = await zviz.run_snippet("print(2)", warm=True, python=PY)
    assert r.stdout == b"2\n", r


async def test_concurrent_snippets_each_get_their_own_result():
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        r = await zviz.run_snippet(f"print({i} * {i})", warm=True, python=PY)
        results[i] = r.stdout

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, i)
    assert results == {i: f"{i * i}\n".encode() for i in range(12)}


async def test_the_memory_limit_holds_in_a_warm_snippet():
    import attrs

    p = Policy.python()
    policy = attrs.evolve(p, limits=attrs.evolve(p.limits, memory=64 << 20))
    r = await zviz.run_snippet("b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); print('survived')",
                               policy, warm=True, python=PY)
    assert r.stdout != b"survived\n", r
    assert r.exit_code != 0


async def test_a_memory_limit_too_small_for_a_fork_of_the_server_starts_the_snippet_cold():
    """limits.memory is also RLIMIT_AS, and a warm snippet starts with its
    server's address space (~3 MB more than a cold interpreter's): at 16 MiB
    a warm snippet failed in zviz's boot code (MemoryError, a traceback with
    host paths) where `python3 -c` runs."""
    import attrs

    p = Policy.python()
    small = attrs.evolve(p, limits=attrs.evolve(p.limits, memory=16 << 20))
    flags = "import sys; print(sys.flags.isolated)"  # 1: a fork of the server (-I); 0: python3 -c
    r = await zviz.run_snippet(flags, small, python=PY)
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"0\n", b""), r
    with pytest.raises(zviz.FeatureUnavailable, match=r"limits.memory \(16 MiB\).*RLIMIT_AS"):
        await zviz.run_snippet(flags, small, python=PY, warm=True)
    roomy = attrs.evolve(p, limits=attrs.evolve(p.limits, memory=64 << 20))
    r = await zviz.run_snippet(flags, roomy, python=PY)
    assert (r.exit_code, r.stdout) == (0, b"1\n"), r  # still warm
    assert all(s.users == 0 for s in _servers())  # (the refusal gave its server back)


async def test_the_policys_filter_and_landlock_hold_in_a_warm_snippet():
    code = textwrap.dedent(f"""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        out = []
        out.append(libc.unshare(0x10000000) == -1)  # CLONE_NEWUSER
        out.append(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == -1)
        try:
            open({os.path.abspath(_warm.__file__)!r}).read()  # zviz's own source: not in the policy's view
            out.append(False)
        except OSError:
            out.append(True)
        print(out)
    """)
    for warm in (True, False):
        r = await zviz.run_snippet(code, warm=warm, python=PY)
        assert r.stdout == b"[True, True, True]\n", (warm, r)


@pytest.mark.parametrize("env", [{"PYTHONHASHSEED": "0"}, {"PYTHONIOENCODING": "latin-1"}])
async def test_a_start_up_variable_is_refused_or_falls_back(env):
    with pytest.raises(zviz.FeatureUnavailable, match=next(iter(env))):
        await zviz.run_snippet("pass", env=env, warm=True, python=PY)
    r = await zviz.run_snippet(f"import os; print(os.environ[{next(iter(env))!r}])", env=env, python=PY)
    assert r.stdout.decode().strip() == next(iter(env.values()))


async def test_an_interpreter_a_sandbox_can_write_is_never_started_on_the_host(tmp_path):
    import attrs

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(PY, venv / "bin" / "python3")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    os.chmod(tmp_path, 0o755)
    p = Policy.python()
    policy = attrs.evolve(p, fs=attrs.evolve(p.fs, read_write=(*p.fs.read_write, str(venv))))
    with pytest.raises(zviz.FeatureUnavailable, match="lets sandboxes write"):
        await zviz.run_snippet("pass", policy, warm=True, python=str(venv / "bin" / "python3"))
    r = await zviz.run_snippet("import sys; print(sys.prefix)", policy, python=str(venv / "bin" / "python3"))
    assert r.exit_code == 0 and r.stdout.strip() == str(venv).encode(), r


def test_why_not_python_sees_the_real_install_and_the_venv_base(tmp_path):
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    os.symlink(PY, venv / "bin" / "python")
    (venv / "pyvenv.cfg").write_text(f"home = {tmp_path / 'base' / 'bin'}\n")
    roots = _warm.install_roots(str(venv / "bin" / "python"))
    assert str(venv) in roots and "/usr" in roots and str(tmp_path / "base") in roots
    assert _warm.why_not_python(str(venv / "bin" / "python"), (str(tmp_path / "base" / "lib"),))
    assert _warm.why_not_python(str(venv / "bin" / "python"), ("/usr/local",))
    assert _warm.why_not_python(str(venv / "bin" / "python"), ("/",))
    assert _warm.why_not_python(str(venv / "bin" / "python"), (str(tmp_path / "elsewhere"),)) is None


async def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="code must be a str"):
        await zviz.run_snippet(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="warm must be"):
        await zviz.run_snippet("pass", warm="yes")  # type: ignore[arg-type]
    with pytest.raises(zviz.CommandNotFoundError):
        await zviz.run_snippet("pass", python="no-such-python3", warm=True)


async def test_a_large_snippet_goes_through_its_pipe():
    code = "x = %r\nprint(len(x))" % ("y" * 300_000)
    r = await zviz.run_snippet(code, warm=True, python=PY)
    assert r.stdout == b"300000\n", r


def _unprivileged() -> bytes:
    async def main() -> bytes:
        r = await zviz.run_snippet("import os; print(os.getuid() != 0)", warm=True, python=PY)
        return r.stdout

    return anyio.run(main)


@pytest.mark.skipif(not IS_ROOT, reason="runs a caller as nobody: root")
def test_an_unprivileged_caller_gets_warm_snippets_too():
    assert run_as("nobody", _unprivileged) == b"True\n"


def test_the_boot_script_is_not_importable_as_zviz_code():
    # it runs under the policy's interpreter, without zviz's dependencies: stdlib only
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(_warm.BOOT).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_the_sync_facade_runs_snippets_from_several_threads():
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda i: zviz.sync.run_snippet(f"print({i})", python=PY).stdout, range(8)))
    assert outs == [f"{i}\n".encode() for i in range(8)]


async def test_an_interpreter_that_cannot_serve_is_refused_once_and_remembered(tmp_path):
    import attrs

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python3"
    fake.write_text("#!/bin/sh\necho not-a-python\nexit 3\n")
    fake.chmod(0o755)
    for d in (tmp_path, bindir):
        os.chmod(d, 0o755)
    p = Policy.python()
    policy = attrs.evolve(p, fs=attrs.evolve(p.fs, read_only=(*p.fs.read_only, str(tmp_path))))
    with pytest.raises(zviz.FeatureUnavailable, match="cannot serve as a warm interpreter"):
        await zviz.run_snippet("pass", policy, python=str(fake), warm=True)
    assert str(fake) in _warm._refused
    started = len(_warm._servers)
    with pytest.raises(zviz.FeatureUnavailable, match="cannot serve as a warm interpreter"):
        await zviz.run_snippet("pass", policy, python=str(fake), warm=True)
    assert len(_warm._servers) == started
    r = await zviz.run_snippet("pass", policy, python=str(fake))  # falls back: the "interpreter" runs in the sandbox
    assert (r.exit_code, r.stdout) == (3, b"not-a-python\n")


async def test_site_packages_code_runs_in_the_sandbox_never_in_the_server(tmp_path):
    # a .pth file in the interpreter's site-packages (here: a venv's, read-only to the sandbox) runs at every
    # interpreter's start: with the warm path, in each snippet's sandbox (as it would there), not on the host
    import attrs

    venv = tmp_path / "venv"
    site_dir = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site_dir.mkdir(parents=True)
    (venv / "bin").mkdir()
    os.symlink(PY, venv / "bin" / "python3")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    (site_dir / "zz_probe.pth").write_text(
        "import os; open('/tmp/pth-ran-in-' + str(os.getpid()), 'w').close()\n")
    for d in (tmp_path, *[p for p in site_dir.parents if str(p).startswith(str(tmp_path))], site_dir):
        os.chmod(d, 0o755)
    p = Policy.python()
    policy = attrs.evolve(p, fs=attrs.evolve(p.fs, read_only=(*p.fs.read_only, str(tmp_path))))
    before = {f for f in os.listdir("/tmp") if f.startswith("pth-ran-in-")}
    r = await zviz.run_snippet("import os, sys; print(sorted(f for f in os.listdir('/tmp') if f.startswith('pth-')),"
                               " sys.prefix)", policy, python=str(venv / "bin" / "python3"), warm=True)
    assert r.exit_code == 0, r
    assert r.stdout.decode().split("] ")[0] == "['pth-ran-in-2'", r.stdout  # in the sandbox: the snippet's pid 2
    assert str(venv) in r.stdout.decode()
    assert {f for f in os.listdir("/tmp") if f.startswith("pth-ran-in-")} == before  # never on the host


async def test_snippets_cancelled_at_any_moment_leave_nothing_and_the_server_stays_in_step():
    # cancelled before, during and after the spawn's request to the server: its reply (a live sandbox) is
    # never left unread for the next request, and nothing of any of them is left running
    await zviz.run_snippet("pass", warm=True, python=PY)  # (the fork server, a child of ours, is up before)
    snap = Snapshot()
    for i in range(30):
        with anyio.move_on_after(i * 0.0007):
            await zviz.run_snippet("import time; time.sleep(5)", warm=True, python=PY)
    r = await zviz.run_snippet("print('in step')", warm=True, python=PY)
    assert r.stdout == b"in step\n", r
    await snap.assert_released()
    for s in _servers():
        assert s._proc is not None
        with open(f"/proc/{s._proc.pid}/task/{s._proc.pid}/children") as f:
            assert f.read().split() == []


async def test_a_snippet_cancelled_right_after_its_request_is_sent_leaves_nothing(monkeypatch):
    import socket

    await zviz.run_snippet("pass", warm=True, python=PY)
    snap = Snapshot()
    scopes: list[anyio.CancelScope] = []
    send = socket.send_fds

    def send_then_cancel(*args, **kw):
        n = send(*args, **kw)
        scopes[-1].cancel()  # the request is with the server: its reply will name a live sandbox
        return n

    monkeypatch.setattr(_warm.socket, "send_fds", send_then_cancel)
    with anyio.CancelScope() as scope:
        scopes.append(scope)
        await zviz.run_snippet("import time; time.sleep(5)", warm=True, python=PY)
    assert scope.cancelled_caught
    monkeypatch.setattr(_warm.socket, "send_fds", send)
    r = await zviz.run_snippet("print('in step')", warm=True, python=PY)
    assert r.stdout == b"in step\n", r
    await snap.assert_released()


def test_a_program_that_used_the_sync_facade_exits_at_once():
    # its loop thread is stopped before the interpreter joins threads at exit (else: a hang at exit)
    import subprocess

    code = f"import zviz.sync; print(zviz.sync.run_snippet('print(5)', python={PY!r}).stdout)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(zviz.__file__)))
    assert r.returncode == 0 and r.stdout == b"b'5\\n'\n", r


async def test_a_failed_set_up_step_in_the_fork_is_reported_like_any_sandboxs_and_the_server_goes_on():
    import attrs

    from zviz._sandbox import _open_sandbox

    async with _open_sandbox(Policy.python(), zygote=False, use_pool=False) as sb:
        runner = sb._runner
        runner._stage = attrs.evolve(runner._stage, hostname="h" * 100)  # over HOST_NAME_MAX: sethostname fails
        runner._stage_packed = None
        with pytest.raises(zviz.SandboxSetupError, match="'hostname'") as info:
            await _warm._run_warm_in(sb, PY, "print(1)", b"", None, {}, insist=True)
        assert info.value.errno == 22  # EINVAL, from the fork's own step, through the server
    r = await zviz.run_snippet("print('still serving')", warm=True, python=PY)
    assert r.stdout == b"still serving\n", r


def test_the_fork_server_speaks_the_same_records_as_zviz():
    # _warmboot cannot import zviz (it runs under the policy's interpreter): its copies of the fd
    # numbers and the slots must stay those of the stage and the host (its pid 1, in C, writes the
    # status record: zviz/_stage.c warm_init)
    from zviz import _abi, _warmboot

    assert _warmboot.STATUS_FD == _abi.STATUS_FD
    assert _warmboot.INPUT_FD == _abi.INIT_FD
    assert _warmboot.SLOT == _warm.SLOT


@pytest.mark.anyio
async def test_a_warm_sandboxs_pid_1_runs_no_python():
    """pid 1 of a warm snippet's sandbox is the stage's C reaper (zviz/_stage.c
    warm_init) in the fork of the server, not the interpreter: it touches
    next to none of the pages it shares with the server, where a Python
    pid 1 (forking the snippet with os.fork) copied ~100-200 of them per
    snippet. Read from the host while the snippet sleeps: its pid 1's minor
    faults since the fork, and that the snippet is its child, pid 2 inside."""
    import time

    code = "import os, sys, time\nprint(os.getpid(), os.getppid(), flush=True)\ntime.sleep(1.5)\n"
    async with anyio.create_task_group() as tg:
        got: dict[str, object] = {}

        async def run() -> None:
            got["r"] = await zviz.run_snippet(code, warm=True, python=PY)

        tg.start_soon(run)
        deadline = time.monotonic() + 10
        init = None
        while init is None and time.monotonic() < deadline:
            await anyio.sleep(0.02)
            for server in _warm._servers.values():
                if server._proc is not None:
                    for pid in child_pids(server._proc.pid):
                        if child_pids(pid):
                            init = pid
        assert init is not None, "no warm sandbox appeared"
        with open(f"/proc/{init}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        minflt = int(fields[7])  # (field 10 of stat(5))
    r = got["r"]
    assert r.exit_code == 0 and r.stdout.split()[:2] == [b"2", b"1"], r  # type: ignore[attr-defined]
    assert minflt < 40, f"pid 1 took {minflt} page faults: it runs Python again?"



@pytest.mark.anyio
async def test_a_warm_snippet_is_a_proper_fork_for_libc():
    """The snippet is forked by libc's fork(), so libc's thread descriptor
    holds its own thread id: with a raw clone it kept the server's host tid,
    and what reads it failed (pthread_getcpuclockid: EINVAL from
    clock_gettime; recursive and robust mutexes compare owners by it)."""
    code = ("import os, threading, time\n"
            "clock = time.pthread_getcpuclockid(threading.get_ident())\n"
            "print(time.clock_gettime(clock) > 0, threading.get_native_id() == os.getpid() == 2)\n")
    r = await zviz.run_snippet(code, warm=True, python=PY)
    assert (r.exit_code, r.stdout) == (0, b"True True\n"), r
