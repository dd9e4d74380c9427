"""Workspace templates: `Sandbox.snapshot(path)` and `open_sandbox(template=)`
(zviz/_snapshot.py): round trip, isolation, the template never changed, every
bad input, nothing left behind. Run as root (overlay) and as uid 65534 (copy)."""

from __future__ import annotations

import json
import os
import stat
import tempfile

import attrs
import pytest
import trio

import zviz
from zviz import _snapshot

from .conftest import IS_ROOT, run_as, template_parent, zviz_tempdirs

pytestmark = pytest.mark.filterwarnings("ignore::zviz.ZvizWarning")




def _overlays() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if " - overlay " in line)


def _tree(root: str) -> dict[str, tuple[str, int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return out


def _round_trip(parent: str) -> dict:
    dest = os.path.join(parent, "t")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            r = await sb.run("mkdir -p pkg/sub && printf 'v1' > pkg/sub/data && chmod 640 pkg/sub/data && "
                             "printf '#!/bin/sh\\necho run\\n' > tool && chmod 755 tool && ln -s pkg/sub/data rel && "
                             "ln -s /etc/hostname abs && mkdir empty && chmod 750 empty", shell=True)
            assert r.exit_code == 0, r.stderr
            info = await sb.snapshot(dest)
        assert info.path == os.path.realpath(dest) and info.files == 7 and info.bytes == 2 + 19
        saved = _tree(os.path.join(dest, "files"))
        with open(os.path.join(dest, _snapshot.MANIFEST)) as f:
            manifest = json.load(f)
        # two sandboxes from the template: each starts with it, neither sees the other's changes
        async with zviz.open_sandbox(zviz.Policy.shell(), template=dest) as a, \
                zviz.open_sandbox(zviz.Policy.shell(), template=dest) as b:
            ra = await a.run("cat pkg/sub/data; ./tool; readlink rel abs; stat -c %a pkg/sub/data empty; "
                             "echo changed > pkg/sub/data; rm tool; rm -r empty; mkdir new; echo n > new/f; id -u",
                             shell=True)
            rb = await b.run("cat pkg/sub/data; ls; test -e new || echo no-new", shell=True)
            again = await a.run("cat pkg/sub/data; ls", shell=True)
            host_view = (await a.read_file("pkg/sub/data"), sorted(os.listdir(a.workdir)))
        return {"saved": saved, "manifest": manifest, "ra": (ra.exit_code, ra.stdout, ra.stderr),
                "rb": (rb.exit_code, rb.stdout), "again": again.stdout, "host_view": host_view,
                "after": _tree(os.path.join(dest, "files"))}

    return trio.run(main)


def test_round_trip_and_isolation(identity):
    from .conftest import child_pids

    parent = template_parent(identity)
    before, mounts, kids = zviz_tempdirs(), _overlays(), child_pids()
    out = run_as(identity, _round_trip, parent)
    saved = out["saved"]
    assert saved["pkg/sub/data"] == ("file", 0o640, b"v1")
    assert saved["tool"][:2] == ("file", 0o755)
    assert saved["rel"] == ("link", 0, b"pkg/sub/data")  # kept as links, never followed
    assert saved["abs"] == ("link", 0, b"/etc/hostname")
    assert saved["empty"] == ("dir", 0o750, b"")
    assert out["manifest"]["format"] == _snapshot.FORMAT and out["manifest"]["zviz"] == zviz.__version__
    code, stdout, stderr = out["ra"]
    assert code == 0, stderr
    assert stdout.splitlines()[:6] == [b"v1run", b"pkg/sub/data", b"/etc/hostname", b"640", b"750",
                                       b"1000"] or stdout.startswith(b"v1run\npkg/sub/data\n/etc/hostname\n640\n750\n")
    assert out["rb"] == (0, b"v1abs\nempty\npkg\nrel\ntool\nno-new\n")  # b sees the template, not a's changes
    assert out["again"] == b"changed\nabs\nnew\npkg\nrel\n"
    assert out["host_view"] == (b"changed\n", ["abs", "new", "pkg", "rel"])
    assert out["after"] == saved  # the template is untouched
    assert zviz_tempdirs() <= before
    assert _overlays() == mounts  # nothing left mounted
    assert child_pids() <= kids  # the overlays' helpers were reaped


def _bad_inputs(parent: str) -> list[str]:
    msgs = []
    notempl = os.path.join(parent, "plain")
    os.mkdir(notempl)
    newer = os.path.join(parent, "newer")
    os.makedirs(os.path.join(newer, "files"))
    with open(os.path.join(newer, _snapshot.MANIFEST), "w") as f:
        json.dump({"kind": _snapshot.KIND, "format": _snapshot.FORMAT + 1, "zviz": "9.0"}, f)
    corrupt = os.path.join(parent, "corrupt")
    os.makedirs(os.path.join(corrupt, "files"))
    with open(os.path.join(corrupt, _snapshot.MANIFEST), "w") as f:
        f.write("{not json")
    full = os.path.join(parent, "full")
    os.mkdir(full)
    open(os.path.join(full, "x"), "w").close()

    async def main():
        for bad in (os.path.join(parent, "missing"), notempl, newer, corrupt):
            with pytest.raises(zviz.TemplateError) as e:
                async with zviz.open_sandbox(zviz.Policy.shell(), template=bad):
                    pass
            msgs.append(str(e.value))
        with pytest.raises(TypeError):
            async with zviz.open_sandbox(zviz.Policy.shell(), template=3):  # type: ignore[arg-type]
                pass
        with pytest.raises(ValueError, match="template= starts a fresh workdir"):
            async with zviz.open_sandbox(zviz.Policy.shell(), template=notempl, keep_workdir=True):
                pass
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            await sb.write_file("f", b"x")
            link = os.path.join(parent, "link")
            os.symlink(full, link)
            for bad in (full, os.path.join(sb.workdir, "inside"), os.path.join(parent, "nodir", "t"), "/proc/t",
                        link):
                with pytest.raises(zviz.TemplateError) as e:
                    await sb.snapshot(bad)
                msgs.append(str(e.value))
            p = await sb.start(["sleep", "5"])
            with pytest.raises(RuntimeError, match="still run"):
                await sb.snapshot(os.path.join(parent, "busy"))
            p.kill()
            await p.wait()
            with pytest.raises(zviz.TemplateError, match="max_files"):
                await sb.snapshot(os.path.join(parent, "small"), max_files=0)
            with pytest.raises(zviz.TemplateError, match="max_bytes"):
                await sb.snapshot(os.path.join(parent, "small"), max_bytes=0)
        return msgs

    return trio.run(main)


def test_bad_inputs_name_the_fix(identity):
    parent = template_parent(identity)
    before = set(os.listdir(parent))
    msgs = run_as(identity, _bad_inputs, parent)
    missing, plain, newer, corrupt, full, inside, nodir, unwritable, link = msgs
    assert "does not exist" in missing and "sb.snapshot(path)" in missing
    assert "not a zviz template" in plain
    assert "newer zviz" in newer and "upgrade zviz" in newer
    assert "damaged" in corrupt
    assert "not empty" in full
    assert "workdir" in inside
    assert "parent" in nodir and "create it" in nodir
    assert "no directory can be made in /proc" in unwritable and "you may write in" in unwritable
    assert "is a symbolic link" in link and "the directory it names" in link
    # the failed snapshots left nothing (no partial directory)
    assert set(os.listdir(parent)) - before == {"plain", "newer", "corrupt", "full", "link"}, os.listdir(parent)
    assert not any(n.startswith(".") for n in os.listdir(parent))


def _unreadable_dir(parent: str) -> tuple[tuple[tuple[str, str], ...], dict]:
    dest = os.path.join(parent, "t")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            r = await sb.run("mkdir -p locked/in && echo secret > locked/in/f && echo ok > open && chmod 000 locked",
                             shell=True)
            assert r.exit_code == 0, r.stderr
            info = await sb.snapshot(dest)
        return info.skipped, _tree(os.path.join(dest, "files"))

    return trio.run(main)


def test_a_directory_the_sandbox_made_unreadable(identity):
    """A sandbox's `chmod 000 dir`: a non-root caller may not read it, so the
    snapshot copies the rest, keeps the directory empty with its mode, and
    says so in `skipped` (before: a bare PermissionError, and no template).
    A root caller reads it like any other."""
    parent = template_parent(identity)  # ("self": this process, root on CI; "nobody": uid 65534)
    skipped, tree = run_as(identity, _unreadable_dir, parent)
    assert tree["open"][2] == b"ok\n"
    assert tree["locked"][:2] == ("dir", 0)
    if identity == "self" and IS_ROOT:
        assert skipped == () and tree["locked/in/f"][2] == b"secret\n"
    else:
        assert [p for p, _ in skipped] == ["locked"] and "may not read" in skipped[0][1], skipped
        assert not any(k.startswith("locked/") for k in tree), tree


def test_template_must_be_callers_own(tmp_path):
    t = tmp_path / "t"
    (t / "files").mkdir(parents=True)
    (t / _snapshot.MANIFEST).write_text(json.dumps({"kind": _snapshot.KIND, "format": 1}))
    os.chmod(t, 0o777)
    with pytest.raises(zviz.TemplateError, match="not writable by others"):
        _snapshot.open_template(str(t))
    os.chmod(t, 0o700)
    assert _snapshot.open_template(str(t)).files == str(t / "files")
    with pytest.raises(zviz.TemplateError, match="read-write"):
        _snapshot.open_template(str(t), read_write=(str(tmp_path),))


def test_sync_facade_and_empty_destination(tmp_path):
    dest = tmp_path / "t"
    dest.mkdir()  # an existing empty directory is fine
    with zviz.sync.open_sandbox(zviz.Policy.shell()) as sb:
        sb.write_file("hello.txt", b"hi")
        info = sb.snapshot(str(dest))
    assert info.files == 1 and isinstance(info, zviz.SnapshotInfo)
    with zviz.sync.open_sandbox(zviz.Policy.shell(), template=dest) as sb:
        assert sb.run(["cat", "hello.txt"]).stdout == b"hi"


@pytest.mark.skipif(not IS_ROOT, reason="fs.disk needs root")
def test_disk_limit_with_template(tmp_path):
    dest = tmp_path / "t"
    mounts = _overlays()

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            await sb.write_file("base", b"b" * 1000)
            await sb.snapshot(dest)
        p = zviz.Policy.shell()
        policy = attrs.evolve(p, fs=attrs.evolve(p.fs, disk=1 << 20))
        async with zviz.open_sandbox(policy, template=dest) as sb:
            r = await sb.run("cat base | wc -c; head -c 3000000 /dev/zero > big; echo $?", shell=True)
            assert r.stdout.splitlines()[0] == b"1000"
            assert r.stdout.splitlines()[-1] != b"0"  # the upper layer lies on the 1 MiB tmpfs: ENOSPC
            assert _overlays() == mounts + 1
        assert _overlays() == mounts

    trio.run(main)
    assert os.path.getsize(dest / "files" / "base") == 1000


def test_cli_template_and_snapshot(tmp_path):
    import subprocess
    import sys

    def zviz_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zviz", "run", *args], capture_output=True, timeout=60)

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert zviz_run("--snapshot", one, "--", "sh", "-c", "echo one > a").returncode == 0
    r = zviz_run("--template", one, "--snapshot", two, "--", "sh", "-c", "cat a; echo two >> a")
    assert (r.returncode, r.stdout) == (0, b"one\n")
    assert zviz_run("--template", two, "--", "cat", "a").stdout == b"one\ntwo\n"
    assert zviz_run("--template", one, "--", "cat", "a").stdout == b"one\n"
    r = zviz_run("--template", str(tmp_path / "missing"), "--", "true")
    assert r.returncode != 0 and b"--snapshot PATH" in r.stderr
    # one line naming the fix, never a traceback
    r = zviz_run("--template", one, "--workdir", str(tmp_path), "--", "true")
    assert r.returncode == 2 and b"drop --workdir" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    for flag in ("--template", "--snapshot", "--workdir"):
        r = zviz_run(flag, "", "--", "true")
        assert r.returncode == 2 and f"{flag} needs a path".encode() in r.stderr, r.stderr
    r = zviz_run("--snapshot", "/proc/t", "--", "true")
    assert r.returncode == 126 and b"you may write in" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr


@pytest.mark.skipif(not IS_ROOT, reason="the overlay is a root caller's")
def test_failure_mid_way_leaves_nothing(tmp_path, monkeypatch):
    """The template swapped for a symlink after its check: the stage's open
    (no symlinks) fails the mount; no workdir, mount or helper process is left."""
    from .conftest import child_pids

    dest = tmp_path / "t"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    async def make():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            await sb.write_file("f", b"x")
            await sb.snapshot(dest)

    trio.run(make)
    real_open = _snapshot.open_template

    def swapped(path, **kw):
        t = real_open(path, **kw)
        os.rename(dest / "files", tmp_path / "files.moved")
        os.symlink(elsewhere, dest / "files")
        return t

    monkeypatch.setattr(_snapshot, "open_template", swapped)
    before, mounts, kids = zviz_tempdirs(), _overlays(), child_pids()

    async def main():
        with pytest.raises(zviz.SandboxSetupError) as e:
            async with zviz.open_sandbox(zviz.Policy.shell(), template=dest):
                pass
        return e.value

    err = trio.run(main)
    assert "open the template" in str(err)
    assert zviz_tempdirs() <= before
    assert _overlays() == mounts
    assert child_pids() <= kids  # the idmapping's helper was reaped


@pytest.mark.skipif(not IS_ROOT, reason="the overlay is a root caller's")
def test_a_crashed_owners_template_sandbox_is_swept(tmp_path):
    """The host process dies (SIGKILL) with a template sandbox open: its
    overlay stays mounted on the host; the next sweep detaches and removes it."""
    import signal
    import subprocess
    import sys

    from zviz import _workdir

    dest = tmp_path / "t"

    async def make():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            await sb.write_file("f", b"x")
            await sb.snapshot(dest)

    trio.run(make)
    mounts, before = _overlays(), zviz_tempdirs()
    code = ("import sys, trio, zviz\n"
            "async def main():\n"
            "    async with zviz.open_sandbox(zviz.Policy.shell(), template=sys.argv[1]) as sb:\n"
            "        print(sb.workdir, flush=True)\n"
            "        await trio.sleep(60)\n"
            "trio.run(main)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(dest)], stdout=subprocess.PIPE, env=dict(
        os.environ, TMPDIR=tempfile.gettempdir()))
    try:
        workdir = p.stdout.readline().decode().strip()
        assert workdir and _overlays() == mounts + 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    assert _overlays() == mounts + 1  # left mounted by the dead owner
    from zviz import _hostside

    stale = _workdir.sweep(min_age=0, on_stale=_hostside.reclaim)
    assert any(s.path == workdir for s in stale)
    assert _overlays() == mounts
    assert not os.path.exists(workdir)
    assert zviz_tempdirs() <= before
    assert (dest / "files" / "f").read_bytes() == b"x"


@pytest.mark.skipif(not IS_ROOT, reason="the overlay is a root caller's")
def test_unclosed_template_sandbox_is_unmounted(tmp_path):
    """A sandbox nobody closed: its loop ends, the finalizer unmounts the
    overlay before the workdir goes (which would otherwise empty the view)."""
    import gc

    dest = tmp_path / "t"

    async def make():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            await sb.write_file("f", b"x")
            await sb.snapshot(dest)

    trio.run(make)
    mounts, before = _overlays(), zviz_tempdirs()

    async def leak():
        sb = await zviz.Sandbox.create(zviz.Policy.shell(), template=dest)
        assert _overlays() == mounts + 1
        return sb.workdir

    def leak_and_collect() -> str:
        workdir = trio.run(leak)
        gc.collect()
        return workdir

    with pytest.warns(ResourceWarning):
        workdir = leak_and_collect()
    assert _overlays() == mounts
    assert not os.path.exists(workdir)
    assert zviz_tempdirs() <= before
    assert (dest / "files" / "f").read_bytes() == b"x"


def _mounts_naming(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if path in line]


@pytest.mark.skipif(not IS_ROOT, reason="the overlay is mounted for root callers only")
def test_close_leaves_no_mount_and_no_reference(tmp_path):
    """Close detaches the overlay at once (nothing in mountinfo names the
    workdir, as mount point or upper layer, the moment close returns, even
    with a process still running at close) and hands the last reference to
    the closer thread: once it has run, no fd of ours is left either."""
    from zviz import _kernel

    dest = tmp_path / "t"

    async def make():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            await sb.write_file("f", b"x")
            await sb.snapshot(dest)

    trio.run(make)
    _kernel.settle_closes()
    fds, mounts = len(os.listdir("/proc/self/fd")), _overlays()

    async def main() -> list[str]:
        workdirs = []
        for busy in (False, True):
            async with zviz.open_sandbox(zviz.Policy.shell(), template=dest) as sb:
                workdirs.append(sb.workdir)
                assert _mounts_naming(sb.workdir), "the overlay is mounted on the workdir while open"
                await sb.run("echo y > g", shell=True)
                if busy:
                    await sb.start(["sleep", "60"])
            assert _mounts_naming(sb.workdir) == []
            assert not os.path.exists(sb.workdir)
        return workdirs

    trio.run(main)
    assert _overlays() == mounts
    assert _kernel.settle_closes(), "the closer thread finished every overlay's shutdown"
    assert len(os.listdir("/proc/self/fd")) == fds, "no reference to a detached overlay is left open"
    assert (dest / "files" / "f").read_bytes() == b"x"
    assert not (dest / "files" / "g").exists()
