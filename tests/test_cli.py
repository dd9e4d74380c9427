"""The command line, as a person and a script use it."""

import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

ZVIZ = [sys.executable, "-m", "zviz._cli"]


def zviz(*args, input=None, timeout=60, **kw):
    return subprocess.run([*ZVIZ, *args], input=input, capture_output=True, timeout=timeout, **kw)


def test_run_passes_stdio_and_exit_status():
    r = zviz("run", "--", "python3", "-c", "import sys; print(sys.stdin.read().upper()); sys.exit(3)", input=b"abc")
    assert r.returncode == 3 and r.stdout == b"ABC\n"


def test_exit_statuses():
    assert zviz("run", "--", "python3", "-c", "import os; os.kill(os.getpid(), 9)").returncode == 128 + 9
    r = zviz("run", "--timeout", "0.5", "--", "sleep", "10")
    assert r.returncode == 124 and b"timed out" in r.stderr
    r = zviz("run", "--", "no-such-command")
    assert r.returncode == 127 and r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    r = zviz("run", "--", "./no-such-file")
    assert r.returncode == 127 and b"no such file" in r.stderr and b"PATH" not in r.stderr
    r = zviz("run", "--", os.path.realpath(sys.executable), "-c", "1")  # on the host, outside the policy's paths
    assert r.returncode == 127 and b"not found in the sandbox" in r.stderr and b"policy's paths" in r.stderr
    r = zviz("run", "--ro", "/nonexistent/path", "--", "true")
    assert r.returncode == 125 and b"fs.read_only" in r.stderr and b"Traceback" not in r.stderr
    r = zviz("run", "--preset", "nope", "--", "true")
    assert r.returncode == 125
    r = zviz("run", "--memory", "lots", "--", "true")
    assert r.returncode == 125 and b"--memory" in r.stderr
    for workdir in ("/nonexistent/dir", "/etc/passwd"):
        r = zviz("run", "--workdir", workdir, "--", "true")
        assert r.returncode == 125 and b"--workdir" in r.stderr and b"create it first" in r.stderr, r.stderr
        assert r.stderr.count(b"\n") == 1, r.stderr
    r = zviz("run")
    assert r.returncode == 2 and b"a command is needed" in r.stderr
    assert zviz("bogus").returncode == 2
    r = zviz("--debug", "run", "--", "no-such-command")
    assert r.returncode == 127 and b"Traceback" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="a root caller's sandbox runs as a uid of its own (as root only)")
@pytest.mark.parametrize("through_server", [False, True])
def test_a_workdir_the_sandbox_cannot_write_is_a_usage_error(tmp_path, through_server):
    """As root, each sandbox is a fresh uid: a --workdir only root may write is
    refused with the fix named (exit 2), not the server's or the process's
    traceback."""
    env = {**os.environ, "ZVIZ_SERVER": "1" if through_server else "0", "ZVIZ_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    try:
        for _ in range(2):  # (the first run through the server starts it in its own process)
            r = subprocess.run([sys.executable, "-m", "zviz", "run", "--workdir", str(work), "--", "true"], env=env,
                               capture_output=True, timeout=60)
            assert r.returncode == 2 and b"chmod 1777" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    finally:
        subprocess.run([sys.executable, "-m", "zviz", "gc"], env={**env, "ZVIZ_SERVER": "0"}, capture_output=True,
                       timeout=60)


def test_json_record():
    r = zviz("run", "--json", "--", "python3", "-c",
             "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('hi')")
    d = json.loads(r.stdout)
    assert d["stdout"] == "hi\n" and d["exit_code"] == 0 and d["denials"] == {"ptrace": 1}
    assert d["events"] and "ptrace" in d["events"][0]
    assert r.returncode == 0


def test_paths_and_network_flags(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("shared")
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o777)
    os.chmod(data / "in.txt", 0o644)
    r = zviz("run", "--ro", str(data), "--", "cat", str(data / "in.txt"))
    assert r.stdout == b"shared" and r.returncode == 0
    r = zviz("run", "--ro", str(data), "--", "sh", "-c", f"echo x > {data}/new")
    assert r.returncode != 0 and not (data / "new").exists()
    r = zviz("run", "--rw", str(data), "--", "sh", "-c", f"echo x > {data}/new")
    assert r.returncode == 0 and (data / "new").read_text() == "x\n"
    r = zviz("run", "--net", "loopback", "--", "python3", "-c",
             "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
             "c = socket.create_connection(s.getsockname()); print('loop ok')")
    assert r.stdout == b"loop ok\n", r.stderr


def test_policy_file_toml_and_oci(tmp_path):
    import zviz as z

    toml = tmp_path / "p.toml"
    toml.write_text(z.Policy.python().to_toml())
    r = zviz("run", "--policy", str(toml), "--", "python3", "-c", "print(2)")
    assert r.stdout == b"2\n"
    oci = tmp_path / "p.json"
    names = sorted(z.Policy.python().syscalls.names() - {"socket"})
    oci.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": names,
                                                                               "action": "SCMP_ACT_ALLOW"}]}))
    r = zviz("run", "--json", "--policy", str(oci), "--", "python3", "-c",
             "import socket; socket.socket(socket.AF_UNIX)")
    d = json.loads(r.stdout)
    assert d["exit_code"] == 1 and d["denials"] == {"socket": 1}
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    r = zviz("run", "--policy", str(bad), "--", "true")
    assert r.returncode == 125 and b"defaultAction" in r.stderr
    r = zviz("run", "--policy", str(tmp_path / "missing.toml"), "--", "true")
    assert r.returncode == 125 and b"readable file" in r.stderr


def test_check_reports_features_and_fixes():
    r = zviz("check")
    assert r.returncode == 0
    out = r.stdout.decode()
    for word in ("landlock", "user namespaces", "seccomp user notification", "ADDFD", "SYNC_WAKE_UP", "cgroup v2",
                 "bcc"):
        assert word in out
    d = json.loads(zviz("check", "--json").stdout)
    assert d["landlock_abi"] >= 0 and "missing" in d


def test_terminal_is_never_handed_to_the_sandbox(tmp_path):
    """Under a real terminal, the sandbox gets pipes: TIOCSTI has nothing to
    inject into, /dev/tty does not exist, and the terminal's input queue stays
    empty."""
    code = ("import fcntl, termios, os\n"
            "for fd in (0, 1, 2):\n"
            "    try: fcntl.ioctl(fd, termios.TIOCSTI, b'x'); print('INJECTED', fd)\n"
            "    except OSError as e: print('refused', fd, e.errno)\n"
            "try: os.open('/dev/tty', os.O_RDWR); print('TTY OPEN')\n"
            "except OSError as e: print('no tty', e.errno)\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen([*ZVIZ, "run", "--", "python3", "-c", code], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    out = b""
    deadline = time.monotonic() + 30
    while proc.poll() is None or select.select([master], [], [], 0.1)[0]:
        if select.select([master], [], [], 0.1)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
        assert time.monotonic() < deadline
    assert b"INJECTED" not in out and b"TTY OPEN" not in out, out
    assert out.count(b"refused") == 3 and b"no tty" in out, out
    import fcntl
    import struct

    pending = struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0" * 4))[0]
    assert pending == 0
    os.close(master)
    os.close(slave)


def test_relative_paths_from_a_removed_current_directory(tmp_path):
    """A shell whose directory was removed: a relative path is a one-line error
    that says what to do, not a traceback; an absolute one still works."""
    gone = tmp_path / "gone"
    zviz_cmd = " ".join(ZVIZ)
    for flags in ("--ro data", "--policy p.toml", "--template t", "--bind data:/d"):
        gone.mkdir()
        r = subprocess.run(["sh", "-c", f"cd {gone} && rmdir {gone} && exec {zviz_cmd} run {flags} -- true"],
                           capture_output=True, timeout=60)
        assert r.returncode == 2 and b"Traceback" not in r.stderr, (flags, r.stderr)
        assert b"current directory no longer exists" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    gone.mkdir()
    r = subprocess.run(["sh", "-c", f"cd {gone} && rmdir {gone} && exec {zviz_cmd} run --ro /usr -- echo ok"],
                       capture_output=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr


# argv[1:] exec'd with SIGTERM, SIGHUP and SIGINT at their default action: a
# suite run under nohup, or as a background job of a script, hands its
# children SIGHUP or SIGINT ignored, and `zviz run` leaves a signal that its
# caller ignores alone (as the program it runs would)
_DEFAULT_SIGNALS_THEN_EXEC = ("import os, signal, sys\n"
                              "for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
                              "    signal.signal(s, signal.SIG_DFL)\n"
                              "os.execv(sys.argv[1], sys.argv[1:])\n")


def test_sigterm_or_sighup_closes_the_sandbox_and_leaves_nothing(tmp_path):
    """`zviz run` in its own process (no CLI server), stopped by SIGTERM or a
    hang-up: the sandbox is closed as on Ctrl-C (status 128+N), its processes
    dead and its workdir gone, not left on disk for `zviz gc`."""
    import signal

    os.chmod(tmp_path, 0o755)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        # (-X faulthandler: if it hangs, SIGABRT makes it print where every thread is)
        p = subprocess.Popen([sys.executable, "-c", _DEFAULT_SIGNALS_THEN_EXEC, sys.executable, "-X", "faulthandler",
                              *ZVIZ[1:], "run", "--", "sh", "-c", "echo up; exec sleep 61.25"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline() == b"up\n"
        p.send_signal(sig)
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            _, err = p.communicate(timeout=10)
            pytest.fail(f"zviz run did not end within 30 s of {sig.name}; its threads:\n{err.decode(errors='replace')}")
        assert rc == 128 + sig, p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        left = [str(x) for x in tmp_path.rglob("*")]
        assert left in ([], [str(tmp_path / f"zviz-{os.geteuid()}")]), (sig, left)
        assert subprocess.run(["pgrep", "-fx", "sleep 61.25"], capture_output=True).stdout == b""


def test_gc_dry_run_lists_what_gc_removes(tmp_path):
    """`zviz gc --dry-run` lists everything `zviz gc` then removes: a killed
    `zviz run`'s workdir and, for a root caller, its uid lease too (the
    lease's workdir still existed in the dry run, so it was left out)."""
    import signal

    os.chmod(tmp_path, 0o755)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = dict(os.environ, TMPDIR=str(tmp_path), ZVIZ_CACHE_DIR=str(cache))
    p = subprocess.Popen([*ZVIZ, "run", "--", "sh", "-c", "echo up; exec sleep 60"], env=env,
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"up\n"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    from zviz import _ids

    ours = []  # (other leases, of other processes' sandboxes, may come and go meanwhile)
    if os.geteuid() == 0:
        for name in os.listdir(_ids.LEASE_DIR):
            with contextlib.suppress(OSError), open(os.path.join(_ids.LEASE_DIR, name)) as f:
                if str(tmp_path) in f.read():
                    ours.append(f"uid lease {_ids.LEASE_DIR}/{name}")
        assert ours
    dry = zviz("gc", "--dry-run", env=env).stdout.decode().splitlines()
    done = zviz("gc", env=env).stdout.decode().splitlines()
    for what in ours:
        assert f"would remove {what}" in dry and f"removed {what}" in done, (what, dry, done)
    workdirs = [line for line in done if line.startswith(f"removed {tmp_path}/zviz-")]
    assert workdirs and all(line.replace("removed", "would remove", 1) in dry for line in workdirs), (dry, done)
