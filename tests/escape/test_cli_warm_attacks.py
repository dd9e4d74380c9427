"""`zviz run -- PYTHON -c CODE` through the CLI server (zviz/_cli.py `_warm_code`,
zviz/_warm.py `started`): the snippet is a fork of an interpreter the server
started ON THE HOST. The attacker controls CODE and the flags, and the code of
earlier sandboxes of the same server. Each test looks at what the host saw:
marker files at host paths no sandbox sees, the server's process tree."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from tests.test_cliserver import ZVIZ, Server
from tests.test_warm import PY, _same_python

from ..conftest import IS_ROOT

pytestmark = [pytest.mark.skipif(not IS_ROOT, reason="the CLI's warm-path attacks run the server as root (CI does)"),
              pytest.mark.skipif(not _same_python(), reason=f"{PY} is not a CPython of this one's version: the "
                                 "warm path loads zviz's C stage into it")]


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def _run(server: Server, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*ZVIZ, "run", *args], env=server.env, input=input, capture_output=True, timeout=60)


def _plant(server: Server, shared: str, marker: str) -> str:
    """An earlier sandbox, given `shared` read-write, writes `shared`/bin/python3:
    a script that leaves `marker` (a host path no sandbox sees) where it runs."""
    fake = f"{shared}/bin/python3"
    script = f"#!/bin/sh\\nid -u > {marker}\\nexit 3\\n"
    r = _run(server, "--rw", shared, "--", "sh", "-c",
             f"mkdir -p {shared}/bin && printf '{script}' > {fake} && chmod 755 {fake}")
    assert r.returncode == 0, r
    assert os.stat(fake).st_uid != 0  # (written by the sandbox's own host uid)
    return fake


@pytest.mark.parametrize("how", ["path", "PATH", "locked"])
def test_a_python3_an_earlier_sandbox_wrote_never_runs_on_the_host(server, tmp_path, how):
    """Sandbox 1 writes a `python3` into a directory it was given read-write;
    the next run lists that directory read-only (so no path of ITS policy is
    writable) and names the file as its interpreter: by path, through
    `--env PATH`, or after the host made the directory 0755 again (the file
    and bin/ still the sandbox uid's). The warm path must not start it on the
    host. Before: the marker said uid 0 (the script ran as root, CapEff full,
    no seccomp), then the snippet ran cold."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = tmp_path / "ran-on-the-host"
    fake = _plant(server, str(shared), str(marker))
    if how == "locked":
        shared.chmod(0o755)
    if how == "PATH":
        r = _run(server, "--ro", str(shared), "--env", f"PATH={shared}/bin:/usr/bin:/bin", "--", "python3", "-c",
                 "pass")
    else:
        r = _run(server, "--ro", str(shared), "--", fake, "-c", "pass")
    assert not marker.exists(), f"the sandbox-written python3 ran on the host as uid {marker.read_text().strip()}"
    assert r.returncode == 3, r  # (it ran, cold, in the sandbox: the marker's directory is absent there)


def test_a_root_owned_interpreter_still_starts_warm(server):
    # the check above refuses what a sandbox may have written, not the system's own interpreter
    r = _run(server, "--", PY, "-c", "import sys; print(sys.flags.isolated)")
    assert (r.returncode, r.stdout) == (0, b"1\n"), r


_ISOLATED = "import sys; print(sys.flags.isolated)"


@pytest.mark.parametrize("flags", [
    ("--env", "LD_PRELOAD=/workspace/evil.so"),
    ("--env", "GCONV_PATH=/workspace"),
    ("--env", "PYTHONSTARTUP=/workspace/s.py"),
    ("--env", "LC_ALL=/workspace/locale"),
], ids=lambda f: f[1].split("=")[0])
def test_loader_and_start_up_variables_keep_a_cli_snippet_cold(server, flags):
    # held: what the server's start-up on the host would read, or a fork cannot redo, runs the snippet cold
    r = _run(server, *flags, "--", PY, "-c", _ISOLATED)
    assert r.stdout == b"0\n", r


@pytest.mark.parametrize("how", ["relative", "PATH"])
def test_an_interpreter_in_the_workdir_runs_cold(server, tmp_path, how):
    # held: the workdir is the sandbox's to write (and shows at /workspace, another path than the host's)
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(PY, wd / "python3")
    tmp_path.chmod(0o755)
    wd.chmod(0o1777)  # (a root caller's sandbox runs as a host uid of its own)
    if how == "relative":
        r = _run(server, "--workdir", str(wd), "--", "./python3", "-c", _ISOLATED)
    else:
        r = _run(server, "--workdir", str(wd), "--env", "PATH=/workspace:/usr/bin:/bin", "--", "python3", "-c",
                 _ISOLATED)
    assert r.stdout == b"0\n", r


_VIEW = """import os, resource, sys
st = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
print(sys.flags.isolated)
print([st[k].strip() for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                               "NoNewPrivs", "Seccomp", "Seccomp_filters")])
print([(r, resource.getrlimit(getattr(resource, r))) for r in sorted(dir(resource)) if r.startswith("RLIMIT_")])
print(sorted(l.split()[4] + " " + l.split()[5] for l in open("/proc/self/mountinfo")))
print(sorted(os.environ.items()), os.getcwd(), sorted(os.listdir("/proc/self/fd")), os.umask(0o22))
print(open("/proc/self/cgroup").read(), sys.path)
"""


def test_a_cli_warm_snippet_s_sandbox_is_the_cold_one_s(server, tmp_path):
    """held: with the flags a harness passes, the warm snippet's credentials,
    capabilities, no_new_privs, seccomp, rlimits, mounts, environment, cwd,
    fds, umask and cgroup are what --cold shows (only -I -S differ)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    flags = ("--ro", str(ro), "--memory", "300M", "--env", "A=1", "--net", "loopback", "--timeout", "30")
    runs = [_run(server, *flags, *how, "--", PY, "-c", _VIEW) for how in (("--cold",), ())]
    (cold, warm) = runs
    assert cold.returncode == warm.returncode == 0, runs
    assert (cold.stdout[:2], warm.stdout[:2]) == (b"0\n", b"1\n"), runs
    cold_lines, warm_lines = cold.stdout.splitlines(), warm.stdout.splitlines()
    assert cold_lines[1:-1] == warm_lines[1:-1]
    assert b"CapEff" not in warm.stdout and b"'0000000000000000', '0000000000000000'" in warm.stdout


def _plant_then_snippet(shared: str, marker: str) -> tuple[bool, int]:
    """As the caller (here uid 65534): a sandbox given `shared` read-write writes
    `shared`/bin/python3 (a script leaving `marker`), then a snippet whose
    policy lists `shared` read-only names it."""
    import attrs
    import trio

    import zviz

    fake = f"{shared}/bin/python3"

    async def main() -> tuple[bool, int]:
        p = zviz.Policy.python()
        rw = attrs.evolve(p, fs=attrs.evolve(p.fs, read_write=(*p.fs.read_write, shared)))
        async with zviz.open_sandbox(rw) as sb:
            r = await sb.run(["sh", "-c", f"mkdir -p {shared}/bin && printf '#!/bin/sh\\nid -u > {marker}\\n"
                                          f"exit 3\\n' > {fake} && chmod 755 {fake}"])
            assert r.exit_code == 0, r
        ro = attrs.evolve(p, fs=attrs.evolve(p.fs, read_only=(*p.fs.read_only, shared)))
        r = await zviz.run_snippet("pass", ro, python=fake)
        return os.path.exists(marker), r.exit_code

    return trio.run(main)


def test_an_unprivileged_caller_s_sandbox_written_python3_never_runs_on_the_host(request):
    """The same attack for a caller without root, whose sandboxes write files
    as its own uid: the owner of the planted file is the caller's, so
    "owned by the caller" is not "no sandbox wrote it". Before: the script ran
    on the host as uid 65534, outside any sandbox."""
    from ..conftest import _warm_up, run_as

    _warm_up()
    base = pathlib.Path(tempfile.mkdtemp(prefix="cli-warm-"))  # (tmp_path's parents are root's alone: 0700)
    base.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    shared = base / "shared"
    shared.mkdir()
    os.chown(shared, 65534, 65534)
    outside = base / "outside"  # (a host directory no sandbox sees, the caller's to write)
    outside.mkdir()
    os.chown(outside, 65534, 65534)
    ran, status = run_as("nobody", _plant_then_snippet, str(shared), str(outside / "marker"))
    assert not ran, "the sandbox-written python3 ran on the host"
    assert status == 3  # it ran cold, in a sandbox where the marker's directory is absent


def test_an_installation_path_anyone_may_still_make_is_refused(tmp_path):
    """A venv (root's, 0755) whose pyvenv.cfg `home` does not exist yet, in a
    sticky world-writable directory (/tmp's kind): whoever makes that path
    first chooses the standard library the server loads on the host. Before:
    accepted (no policy path overlaps it)."""
    from zviz import _warmcheck

    tmp_path.chmod(0o755)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(PY, venv / "bin" / "python3")
    (venv / "pyvenv.cfg").write_text(f"home = {open_dir}/base/bin\n")
    assert _warmcheck.why_not_python(str(venv / "bin" / "python3"), ())
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert _warmcheck.why_not_python(str(venv / "bin" / "python3"), ()) is None
    assert _warmcheck.why_not_python(PY, ()) is None


def test_an_installation_whose_prefix_anyone_may_add_to_is_refused(tmp_path):
    # root's bin/ under a sticky world-writable prefix: anyone may make prefix/lib/pythonX.Y there first
    from zviz import _warmcheck

    tmp_path.chmod(0o755)
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    prefix.chmod(0o1777)
    os.symlink(PY, prefix / "bin" / "python3")
    assert _warmcheck.why_not_python(str(prefix / "bin" / "python3"), ())
    prefix.chmod(0o755)
    assert _warmcheck.why_not_python(str(prefix / "bin" / "python3"), ()) is None


def _leftovers() -> tuple[list[str], list[str]]:
    tmp = tempfile.gettempdir()
    base = os.path.join(tmp, f"zviz-{os.geteuid()}")
    workdirs = sorted(os.listdir(base)) if os.path.isdir(base) else []
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f if tmp in line)
    return workdirs, mounts


def test_a_killed_json_client_leaves_nothing(server):
    """held: --json runs the snippet to its end in the server (_run_warm_in);
    its client killed mid-run (SIGKILL), with a cgroup and a tmpfs workdir:
    the snippet's process, its workdir and its mount go."""
    import signal
    import time

    from tests.test_cliserver import _sleeper, alive

    assert _run(server, "--", PY, "-c", "pass").returncode == 0  # (the warm server is up)
    before = _leftovers()
    code = "import os; open('f', 'w').write('x'); os.execvp('sleep', ['sleep', '300'])"
    with subprocess.Popen([*ZVIZ, "run", "--json", "--memory", "256M", "--disk", "32M", "--", PY, "-c", code],
                          env=server.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as p:
        try:
            sleeper = _sleeper(server.pid())
            assert sleeper is not None
            with open(f"/proc/{sleeper}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                assert b"_warmboot.py" in f.read()  # (its pid 1 is a fork of the warm server: it ran warm)
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            deadline = time.monotonic() + 10
            while alive(sleeper) or _leftovers() != before:
                assert time.monotonic() < deadline, ("left behind", alive(sleeper), _leftovers(), before)
                time.sleep(0.05)
        finally:
            p.kill()


def test_a_python3_saved_in_a_template_never_runs_on_the_host(server, tmp_path):
    """`--snapshot PATH` copies the sandbox's workdir to PATH as the caller:
    root's files, 0755, which the ownership rule alone takes for the host's
    own. A sandbox writes bin/python3 into its workdir, is saved as a
    template, and the next run lists the template read-only and names that
    file. Before (with the ownership rule only): the marker said uid 0."""
    from zviz import _snapshot, _warmcheck

    assert (_warmcheck.TEMPLATE_MANIFEST, _warmcheck.TEMPLATE_PARTIAL) == (_snapshot.MANIFEST, ".zviz-partial-")
    marker = tmp_path / "ran-on-the-host"
    snap = tmp_path / "snap"
    r = _run(server, "--snapshot", str(snap), "--", "sh", "-c",
             f"mkdir bin && printf '#!/bin/sh\\nid -u > {marker}\\nexit 3\\n' > bin/python3 && chmod 755 bin/python3")
    assert r.returncode == 0, r
    fake = snap / _snapshot.FILES / "bin" / "python3"
    assert os.stat(fake).st_uid == 0
    r = _run(server, "--ro", str(snap / _snapshot.FILES), "--", str(fake), "-c", "pass")
    assert not marker.exists(), f"the template's python3 ran on the host as uid {marker.read_text().strip()}"
    assert r.returncode != 0, r  # (cold: in the sandbox the template's 0700 top is not the sandbox's to pass)


@pytest.mark.parametrize("net", [("--allow-domain", "example.test"), ("--net", "loopback"), ("--net", "none")],
                         ids=lambda n: n[-1])
def test_a_warm_snippet_s_network_is_the_policy_s(server, net):
    """held: a sandbox without a zygote (the warm fork is its pid 1) gets the
    domains mode's egress supervised on each connect (the proxy does not
    listen inside its namespace): a direct TCP connect and a UDP datagram to
    a host listener on 127.0.0.1 reach nothing."""
    import socket

    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    port, uport = tcp.getsockname()[1], udp.getsockname()[1]
    code = ("import socket, sys\nprint(sys.flags.isolated)\n"
            f"s = socket.socket(); s.settimeout(2)\ntry: s.connect(('127.0.0.1', {port})); print('connected')\n"
            "except OSError as e: print('refused', e.errno)\n"
            f"try: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {uport}))\n"
            "except OSError as e: print('refused', e.errno)\n")
    try:
        r = _run(server, *net, "--", PY, "-c", code)
        assert r.stdout.startswith(b"1\n") and b"connected" not in r.stdout, r
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(10)
    finally:
        tcp.close()
        udp.close()


def test_an_interpreter_that_cannot_be_started_runs_cold(server):
    """A `python3` that is a directory (/usr/lib/python3): the warm server's
    exec fails on the host. It is the cold start's error (126, "cannot
    execute"), not a traceback of the server's with status 1."""
    target = "/usr/lib/python3"
    if not os.path.isdir(target):
        pytest.skip(f"{target} is not a directory here")
    warm, cold = (_run(server, *flags, "--", target, "-c", "pass") for flags in ((), ("--cold",)))
    assert (warm.returncode, warm.stderr) == (cold.returncode, cold.stderr) == (126, cold.stderr), (warm, cold)
    assert b"Traceback" not in warm.stderr


def test_what_cli_warm_snippets_share_and_what_cold_does_not(server):
    """Documented (security-model.md, "The CLI server"): warm snippets of
    the server's clients share the server's hash secret; --cold gets its own;
    `random` is seeded anew in each."""
    code = "import random; print(hash('zviz'), random.random())"
    runs = [_run(server, *flags, "--", PY, "-c", code).stdout.split() for flags in ((), (), ("--cold",))]
    (h1, r1), (h2, r2), (h3, _) = runs
    assert h1 == h2 != h3 and r1 != r2, runs
