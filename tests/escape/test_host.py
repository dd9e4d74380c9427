"""Attacks on what the sandbox leaves to the host: its workdir, its teardown
and its host identity. Each test looks at the host afterwards: a decoy's mode
and contents, the temp dir's mode, surviving processes, who can open what.

Scenarios that could damage their temp dir on a broken zviz run in a
subprocess with TMPDIR pointing at a private directory of the test."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import trio

import zviz

from ..conftest import IS_ROOT, _in_child, alive, run_as

ROOT_ONLY = pytest.mark.skipif(not IS_ROOT, reason="needs root (a second host uid, per-sandbox uids)")



@pytest.fixture
def reachable_tmp():
    """A test directory every uid can traverse (pytest's tmp_path is 0700
    root's), removed afterwards."""
    import pathlib
    import shutil

    d = pathlib.Path(tempfile.mkdtemp(prefix="host-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _private_tmp(tmp_path, name="tmp"):
    d = tmp_path / name
    d.mkdir()
    os.chmod(d, 0o1777)  # like /tmp
    return d


# ---------------------------------------------------------------- teardown follows no symlink, leaves no process

DAEMON = textwrap.dedent("""
    import os, sys, time
    decoy = sys.argv[1]
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    os.setsid()                       # out of the command's process group
    null = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    end = time.time() + 25
    n = 0
    while time.time() < end:
        try:
            for i in range(20):       # keep the workdir non-empty while the host removes it
                open(f"f{n}-{i}", "w").close()
            os.makedirs("full", exist_ok=True)
            for i in range(20):
                open(f"full/x{i}", "w").close()
            os.rename("full", "old")  # a full directory swapped for a symlink to the decoy
            os.symlink(decoy, "full")
            os.unlink("full")
            os.rename("old", "full")
        except OSError:
            pass
        n += 1
""")


def _teardown_scenario(tmpdir: str, decoy: str) -> dict:
    """Runs in a forked child (as the caller or as uid 65534): the workdir's
    parent is the test's private temp dir."""
    import warnings

    warnings.simplefilter("ignore")
    tempfile.tempdir = tmpdir

    async def main():
        pol = zviz.Policy.python(namespaces=zviz.Namespaces(pid=False))
        async with zviz.open_sandbox(pol) as sb:
            wd = sb.workdir
            degraded = sb.statistics().degraded
            r = await sb.run(["python3", "-c", DAEMON, decoy])
            pid = int(r.stdout.split()[0])
            await trio.sleep(0.5)  # the daemon is at work
        return {"workdir": wd, "daemon": pid, "degraded": degraded}

    return trio.run(main)


def _sweep_in(tmpdir: str) -> int:
    from zviz import _workdir

    tempfile.tempdir = tmpdir
    return len(_workdir.sweep())


def _make_decoy(base) -> str:
    decoy = base / "decoy"
    decoy.mkdir()
    (decoy / "keep.txt").write_text("host data")
    os.chmod(decoy, 0o755)
    os.chmod(base, 0o755)
    return str(decoy)


@pytest.mark.parametrize("identity", ["self", "nobody"] if IS_ROOT else ["self"])
def test_teardown_follows_no_planted_symlink_and_leaves_no_process(reachable_tmp, identity):
    """No pid namespace; a setsid daemon outlives its command and, while the
    host removes the workdir, keeps refilling it and swaps a full directory
    for a symlink to a decoy outside. Old code: the decoy made 0700 and
    emptied, the temp dir (the workdir's parent) left 0700, the daemon alive.
    Now: the daemon is killed by the sandbox's own host uid before removal
    (root), and removal is fd-relative (every mode)."""
    tmp_path = reachable_tmp
    tmpdir = _private_tmp(tmp_path)
    host = tmp_path / "host"
    host.mkdir()
    decoy = _make_decoy(host)
    if identity == "nobody":
        for p in (tmp_path, host, decoy, decoy + "/keep.txt"):
            os.chown(p, 65534, 65534)
    res = None
    try:
        if identity == "self":
            res = _in_child(lambda: None, _teardown_scenario, (str(tmpdir), decoy), "as the caller")
        else:
            res = run_as(identity, _teardown_scenario, str(tmpdir), decoy)
        time.sleep(0.5)
        st = os.stat(tmpdir)
        assert stat.S_IMODE(st.st_mode) == 0o1777, f"the temp dir's mode became {stat.S_IMODE(st.st_mode):o}"
        assert stat.S_IMODE(os.stat(decoy).st_mode) == 0o755, "the decoy's mode changed"
        assert os.path.exists(decoy + "/keep.txt"), "the decoy was emptied"
        if identity == "self" and IS_ROOT:
            assert not os.path.exists(res["workdir"]), "the workdir is left"
            assert not alive(res["daemon"]), "the sandbox's daemon outlived teardown"
            assert any("no pid namespace" in d for d in res["degraded"])
        else:
            # An unprivileged caller's sandbox is the caller's own uid: there
            # is no handle on a process that left the group (documented, and
            # said in the degraded list). While it refills the workdir the
            # removal gives up (harmlessly); once it is gone, the sweep
            # removes the entry.
            assert any("can outlive teardown" in d for d in res["degraded"])
            if os.path.exists(res["workdir"]):
                assert alive(res["daemon"])
            os.kill(res["daemon"], signal.SIGKILL)
            time.sleep(0.2)
            state = sorted(os.listdir(os.path.dirname(res["workdir"])))
            swept = run_as(identity, _sweep_in, str(tmpdir))
            assert not os.path.exists(res["workdir"]), f"the sweep left the workdir ({swept} swept; {state})"
    finally:
        if res is not None and alive(res["daemon"]):
            os.kill(res["daemon"], signal.SIGKILL)


# ---------------------------------------------------------------- a host uid per sandbox


@ROOT_ONLY
def test_two_sandboxes_are_two_host_uids(reachable_tmp):
    """Sandbox A and B list the same world-writable directory. B leaves a
    0600 file there and keeps a secret in its workdir; A tries to read and
    rewrite both. Old code: both were uid 65534, A read and rewrote them.
    Evidence: the files' contents on the host, and the two workdirs' owners."""
    shared = reachable_tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    tmpdir = tempfile.gettempdir()

    async def main():
        pol = zviz.Policy.python().with_paths(read_write=[str(shared), tmpdir])
        async with zviz.open_sandbox(pol) as a, zviz.open_sandbox(pol) as b:
            rb = await b.run(["python3", "-c", textwrap.dedent(f"""
                import os
                fd = os.open({str(shared / 'b-secret')!r}, os.O_WRONLY | os.O_CREAT, 0o600)
                os.write(fd, b"B's secret")
                open("mine.txt", "w").write("B's workdir file")
                os.chmod(".", 0o700)
            """)])
            assert rb.ok, rb.stderr
            ra = await a.run(["python3", "-c", textwrap.dedent(f"""
                import os
                for p in ({str(shared / 'b-secret')!r}, {os.path.join(b.workdir, 'mine.txt')!r}):
                    try:
                        print("READ", p, open(p).read())
                        open(p, "w").write("overwritten by A")
                        print("WROTE", p)
                    except OSError as e:
                        print("DENIED", p, e.errno)
            """)])
            owners = os.stat(a.workdir).st_uid, os.stat(b.workdir).st_uid
            secret = (shared / "b-secret").read_text()
            mine = Path(b.workdir, "mine.txt").read_text()
            b_uid = os.stat(shared / "b-secret").st_uid
            return ra.stdout.decode(), owners, secret, mine, b_uid

    out, owners, secret, mine, b_uid = trio.run(main)
    assert "READ" not in out and "WROTE" not in out, out
    assert secret == "B's secret" and mine == "B's workdir file"
    assert owners[0] != owners[1], f"both sandboxes are host uid {owners[0]}"
    from zviz import _ids

    assert owners[0] in _ids.id_range() and owners[1] in _ids.id_range() and b_uid == owners[1]


@ROOT_ONLY
def test_uid_is_not_reused_while_a_kept_workdir_holds_its_files(monkeypatch, tmp_path):
    """A range of two uids: a kept workdir keeps its uid out of use; the
    other is handed out twice in a row; once the kept workdir is removed
    the uid comes back."""
    base = 0x70000000 + 60000 + (os.getpid() % 1000) * 2  # a slice of the range for this test
    monkeypatch.setenv("ZVIZ_HOST_IDS", f"{base}:2")

    async def one(keep):
        async with zviz.open_sandbox(zviz.Policy.shell(), keep_workdir=keep) as sb:
            await sb.run(["sh", "-c", "echo x > f"])
            return sb.workdir, os.stat(sb.workdir).st_uid

    kept, uid0 = trio.run(one, True)
    try:
        uids = [trio.run(one, False)[1] for _ in range(3)]
        assert uid0 not in uids and len(set(uids)) == 1, (uid0, uids)
    finally:
        import shutil

        shutil.rmtree(kept)
    assert uid0 in {trio.run(one, False)[1] for _ in range(2)}


@ROOT_ONLY
def test_given_workdir_keeps_its_uid(reachable_tmp):
    """A workdir the caller gives keeps the files of its sandboxes, so it keeps
    their uid: the next sandbox on it gets the same uid (the files stay its
    own), and the range is not used up by runs on one directory."""
    wd = reachable_tmp / "given"
    wd.mkdir()
    os.chmod(wd, 0o1777)

    async def one(i):
        async with zviz.open_sandbox(zviz.Policy.shell(), workdir=wd) as sb:
            r = await sb.run(["sh", "-c", f"echo {i} >> log; cat log; id -u"])
            assert r.ok, r.stderr
            return os.stat(wd / "log").st_uid

    uids = [trio.run(one, i) for i in range(3)]
    assert len(set(uids)) == 1, uids
    assert (wd / "log").read_text().split() == ["0", "1", "2"]


# ---------------------------------------------------------------- other host users cannot reach a workdir


NAMESPACE_MODES = {
    "default": zviz.Namespaces(),
    "no mount ns": zviz.Namespaces(mount=False),
    "no user ns": zviz.Namespaces(user=False),
    "no pid/mount ns": zviz.Namespaces(mount=False, pid=False),
}


@ROOT_ONLY
@pytest.mark.parametrize("mode", list(NAMESPACE_MODES))
@pytest.mark.parametrize("identity", ["self", "nobody"])
def test_other_host_users_cannot_reach_the_workdir(mode, identity):
    """While the sandbox is open, its workdir holds a file it made world-readable
    (and the workdir itself 0777, as the finding's PoC did). Another host uid
    (4242) tries to open it. Old code: the workdir lay directly in the temp
    dir and uid 4242 opened the file (and could run a set-id copy there).
    The sandbox must still reach its own workdir in every mode."""
    result = run_as(identity, _scenario_with_probe, mode)
    assert result["sandbox"] == "sandbox data", result
    assert result["probe"].startswith("errno 13"), f"uid 4242 got {result['probe']!r} from {result['target']}"


LEAVE_A_FILE = ("import os; open('left.txt', 'w').write('sandbox data'); "
                "os.chmod('left.txt', 0o644); os.chmod('.', 0o777); print(open('left.txt').read(), end='')")


def _scenario_with_probe(mode: str) -> dict:
    """Open a sandbox, let it leave a world-readable file in a 0777 workdir,
    and while it is open have uid 4242 try to open that file (through the
    module's helper process, which is uid 4242 already: the scenario itself
    may run as an unprivileged caller)."""
    import warnings

    warnings.simplefilter("ignore")

    async def main():
        pol = zviz.Policy.python(namespaces=NAMESPACE_MODES[mode])
        async with zviz.open_sandbox(pol) as sb:
            r = await sb.run(["python3", "-c", LEAVE_A_FILE])
            target = os.path.join(sb.workdir, "left.txt")
            probe = _PROBE(target)
            return {"sandbox": r.stdout.decode() or r.stderr.decode(), "target": target, "probe": probe}

    return trio.run(main)


def _probe_via_helper(target: str) -> str:
    """Ask the root helper process (started by the test before any drop) to
    open `target` as uid 4242."""
    os.write(_HELPER[1], target.encode() + b"\n")
    return os.read(_HELPER[2], 4096).decode()


_HELPER: list = []
_PROBE = _probe_via_helper


@pytest.fixture(autouse=True, scope="module")
def _probe_helper():
    """A root process that opens a path as uid 4242 on request (so that a
    scenario running as uid 65534 can still ask)."""
    if not IS_ROOT:
        yield
        return
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(req_w)
            os.close(ans_r)
            os.setgroups([])
            os.setresgid(4242, 4242, 4242)
            os.setresuid(4242, 4242, 4242)
            buf = b""
            while True:
                chunk = os.read(req_r, 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        with open(line.decode(), "rb") as f:
                            ans = "OPENED " + f.read(64).decode(errors="replace")
                    except OSError as e:
                        ans = f"errno {e.errno}"
                    os.write(ans_w, ans.encode())
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(ans_w)
    _HELPER[:] = [pid, req_w, ans_r]
    yield
    os.close(req_w)
    os.close(ans_r)
    os.waitpid(pid, 0)
    _HELPER.clear()


# ---------------------------------------------------------------- a dead host's workdirs are swept


def test_dead_hosts_workdir_is_swept_and_gc_spares_live_ones(tmp_path):
    """SIGKILL a host with an open sandbox: its workdir stays (nothing runs
    its teardown). `zviz gc --dry-run` lists it, `zviz gc` removes it; a live
    host's workdir is listed by neither; the next open in a new process
    sweeps stale ones by itself. Old code: no marker, no gc, the dir stays."""
    tmpdir = _private_tmp(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    host_prog = textwrap.dedent("""
        import sys, trio, zviz
        async def main():
            async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
                await sb.run(["sh", "-c", "echo data > f; mkdir -p d/e; echo x > d/e/g"])
                print(sb.workdir, flush=True)
                await trio.sleep(1000)
        trio.run(main)
    """)

    def start_host():
        p = subprocess.Popen([sys.executable, "-c", host_prog], stdout=subprocess.PIPE, env=env, text=True)
        wd = p.stdout.readline().strip()
        assert wd and os.path.isdir(wd), "the host did not open its sandbox"
        return p, wd

    def gc(*args):
        out = subprocess.run([sys.executable, "-m", "zviz._cli", "gc", *args], capture_output=True, text=True,
                             env=env, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout

    hosts = []
    dead, dead_wd = start_host()
    live, live_wd = start_host()
    hosts += [dead, live]
    try:
        dead.kill()
        dead.wait()
        assert os.path.isdir(dead_wd)  # left behind by the killed host
        listed = gc("--dry-run")
        assert dead_wd in listed and live_wd not in listed, listed
        assert os.path.isdir(dead_wd)
        gc()
        assert not os.path.exists(dead_wd), "gc left the dead host's workdir"
        assert os.path.isdir(live_wd), "gc removed a live sandbox's workdir"

        # the next open sweeps by itself (in the background: not on the open's path)
        dead2, dead2_wd = start_host()
        hosts.append(dead2)
        dead2.kill()
        dead2.wait()
        opener = textwrap.dedent("""
            import time, trio, zviz
            async def main():
                async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
                    await sb.run(["true"])
            trio.run(main)
            time.sleep(2)  # the sweep thread
        """)
        subprocess.run([sys.executable, "-c", opener], env=env, check=True, timeout=60)
        assert not os.path.exists(dead2_wd), "the next open did not sweep the dead host's workdir"
        assert os.path.isdir(live_wd)
    finally:
        for p in hosts:
            p.kill()
            p.wait()
            p.stdout.close()
        gc()
    assert os.listdir(tmpdir) in ([], [f"zviz-{os.geteuid()}"])
    base = os.path.join(tmpdir, f"zviz-{os.geteuid()}")
    assert not os.path.exists(base) or os.listdir(base) == []
