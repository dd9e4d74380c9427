"""The file API (`sb.files`) against a hostile sandbox: while the host reads,
writes and removes, the sandboxed code swaps symlinks in, replaces a
directory by a symlink mid-walk, plants FIFOs and hardlinks, and the host
names paths with `..` and magic links. The host must never read, write or
remove anything outside the sandbox's own view. Evidence is host-side: the
secret never comes back, the host files are unchanged, nothing appears in the
host directory. The host side here is root: the most it could do wrong."""

from __future__ import annotations

import errno
import os

import anyio
import pytest
import trio

import zviz

PYP = zviz.Policy.python()

RACER = """
import os, sys
target, mode = sys.argv[1], sys.argv[2]
print("ready", flush=True)
n = 0
while True:
    n += 1
    if mode == "file":
        os.symlink(target, "f.tmp"); os.replace("f.tmp", "f")
        with open("r.tmp", "w") as fh: fh.write("benign")
        os.replace("r.tmp", "f")
    elif mode == "dir":
        os.makedirs("d.tmp/sub", exist_ok=True)
        try: os.rename("d.tmp", "dd")
        except OSError: pass
        os.symlink(target, "l.tmp")
        try:
            os.rename("dd", "old"); os.rename("l.tmp", "dd")
            os.unlink("dd"); os.rename("old", "dd")
        except OSError: pass
        for junk in ("l.tmp", "old"):
            try: os.unlink(junk)
            except OSError: pass
"""


async def _racing(sb: zviz.Sandbox, target: str, mode: str):
    await sb.files.write("racer.py", RACER)
    p = await sb.start(["python3", "racer.py", target, mode], stdin=False, timeout=60)
    assert await p.stdout.receive_some() == b"ready\n"
    return p


def test_symlink_swaps_during_reads_never_leak(target):
    d, token = target
    secret = f"{d}/secret.txt"

    async def main():
        async with zviz.open_sandbox(PYP) as sb, await _racing(sb, secret, "file"):
            got, refused = 0, 0
            deadline = trio.current_time() + 20
            # until the race went both ways (bounded: a loaded machine may need many tries)
            while (got < 20 or refused < 20) and trio.current_time() < deadline:
                try:
                    data = await sb.files.read("f")
                except OSError as e:
                    assert e.errno in (errno.ENOENT, errno.EACCES), e  # noqa: PT017
                    refused += 1
                    continue
                assert token.encode() not in data
                assert data in (b"", b"benign")
                got += 1
            return got, refused

    got, refused = trio.run(main)
    assert got >= 20 and refused >= 20, (got, refused)  # the race ran both ways


def test_symlink_swaps_during_writes_never_write_outside(target):
    d, _token = target
    victim = os.path.join(d, "victim.txt")
    with open(victim, "w") as f:
        f.write("untouched")
    os.chmod(victim, 0o666)

    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            async with await _racing(sb, victim, "file"):
                wrote = tries = 0
                deadline = trio.current_time() + 20
                while (wrote < 20 or tries < 300) and trio.current_time() < deadline:
                    tries += 1
                    try:
                        await sb.files.write("f", b"pwned")
                        wrote += 1
                    except OSError as e:
                        assert e.errno in (errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EAGAIN), e  # noqa: PT017
            async with await _racing(sb, d, "dir"):
                for _ in range(300):
                    try:
                        await sb.files.write("dd/new.txt", b"pwned", parents=False)
                    except OSError:
                        pass
            return wrote

    assert trio.run(main) > 0
    with open(victim) as f:
        assert f.read() == "untouched"
    assert sorted(os.listdir(d)) == ["secret.txt", "victim.txt"]


def test_directory_replaced_by_a_symlink_mid_walk_removes_nothing_outside(target):
    d, _token = target
    os.mkdir(os.path.join(d, "keep"))
    with open(os.path.join(d, "keep", "file"), "w") as f:
        f.write("keep")

    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            async with await _racing(sb, d, "dir"):
                for _ in range(200):
                    try:
                        await sb.files.remove("dd", recursive=True)
                    except OSError:
                        pass
            # and planted before the walk: a symlink to the host dir inside the tree
            await sb.run(["sh", "-c", f"mkdir -p t/a && ln -s {d} t/a/host && ln -s / t/root"])
            await sb.files.remove("t", recursive=True)
            assert not await sb.files.exists("t")

    trio.run(main)
    assert os.path.exists(os.path.join(d, "secret.txt"))
    with open(os.path.join(d, "keep", "file")) as f:
        assert f.read() == "keep"


def test_fifos_and_devices_are_never_opened():
    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            r = await sb.run(["sh", "-c", "mkfifo p && ln -s /dev/zero z"])
            assert r.ok, r.stderr
            with anyio.fail_after(5):  # opening the FIFO would block until a writer came
                for call in (sb.files.read("p"), sb.files.write("p", b"x"), sb.files.read("z"),
                             sb.files.read("/dev/zero")):
                    with pytest.raises(OSError) as ei:
                        await call
                    assert ei.value.errno == errno.EINVAL and "not a regular file" in str(ei.value)
            assert (await sb.files.stat("p")).type == "fifo"

    trio.run(main)


def test_hardlinks_cannot_reach_outside_files(target):
    d, _token = target

    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            prog = (f"import os\nfor src in ({d + '/secret.txt'!r}, '/etc/passwd', '/usr/bin/env'):\n"
                    "    try: os.link(src, 'h'); print('linked', src)\n"
                    "    except OSError as e: print('refused', src, e.errno)\n")
            r = await sb.run(["python3", "-c", prog])
            assert b"linked" not in r.stdout, r.stdout
            with pytest.raises(FileNotFoundError):
                await sb.files.read("h")
            # a hardlink the sandbox may make (within its workdir) is just its own file
            await sb.files.write("mine", b"1")
            assert (await sb.run(["ln", "mine", "mine2"])).ok
            await sb.files.write("mine2", b"2")
            assert await sb.files.read("mine") == b"2"

    trio.run(main)
    with open("/etc/passwd", "rb") as f:
        assert f.read() != b"2"


def test_dotdot_absolute_and_magic_links_stay_in_the_view(target):
    d, token = target

    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            await sb.run(["true"])
            zpid = sb._zygote.pid
            for path in (f"{d}/secret.txt", "../" * 30 + d.lstrip("/") + "/secret.txt",
                         f"/proc/1/root{d}/secret.txt", f"/proc/{zpid}/root{d}/secret.txt",
                         f"/proc/self/root{d}/secret.txt", f"/proc/1/cwd/../../..{d}/secret.txt"):
                with pytest.raises(OSError) as ei:
                    data = await sb.files.read(path)
                    assert token.encode() not in data
                assert ei.value.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.EXDEV), (path, ei.value)
            for path in (f"{d}/new.txt", "../" * 30 + d.lstrip("/") + "/new.txt"):
                with pytest.raises(OSError):
                    await sb.files.write(path, b"x")
            with pytest.raises(OSError):
                await sb.files.remove(f"{d}/secret.txt")
            with pytest.raises(OSError):
                await sb.files.rename("/etc/passwd", "stolen")

    trio.run(main)
    assert sorted(os.listdir(d)) == ["secret.txt"]


def test_mkdir_parents_tells_nothing_of_host_paths(target):
    """`write(..., parents=True)` and `mkdir(parents=True)` look at each
    parent before making it. A link the sandbox planted to an absolute host
    path must be followed in the sandbox's root, as its own `mkdir -p` would:
    before, a plain `stat` beside the parent's fd resolved it on the host, so
    a link to an existing host file answered "exists and is not a directory"
    and one to a missing path "no such file": an oracle on the host's files
    (as the sandbox's uid; and a stat on any host path, an automount or a
    dead network mount included). Now both links get the same answer, the
    one the sandbox's own view gives."""
    d, _token = target
    present, absent = f"{d}/secret.txt", f"{d}/no-such-file"

    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            r = await sb.run(["sh", "-c", f"ln -s {present} p; ln -s {absent} a; ln -s {d} dir"])
            assert r.exit_code == 0, r.stderr
            out = {}
            for name in ("p", "a", "dir"):
                for op in ("write", "mkdir"):
                    try:
                        if op == "write":
                            await sb.files.write(f"{name}/x", b"1")
                        else:
                            await sb.files.mkdir(f"{name}/x", parents=True)
                        out[name, op] = "ok"
                    except OSError as e:
                        out[name, op] = (type(e).__name__, e.errno)
            return out

    out = trio.run(main)
    assert out["p", "write"] == out["a", "write"] == out["dir", "write"] == ("FileNotFoundError", errno.ENOENT), out
    assert out["p", "mkdir"] == out["a", "mkdir"] == out["dir", "mkdir"] == ("FileNotFoundError", errno.ENOENT), out
    assert sorted(os.listdir(d)) == ["secret.txt"]  # and nothing was made on the host


def test_a_huge_directory_is_not_read_whole_by_the_host():
    """The sandbox decides how many entries a directory holds (its workdir
    is on the host's disk: 120,000 names of 100 bytes here, millions if it
    likes). Before, `files.list` (and the MCP server's `list_files`, which an
    agent calls innocently) read and stat'ed them all: +237 MiB of the host's
    memory for 300,000 entries. Now the host stops past `max_entries`
    (default 100,000; the agent tools' 10,000) with E2BIG, and never holds
    more than that many."""
    import tracemalloc

    from zviz._tools import SessionConfig, ToolSession

    make = ("import os\nos.mkdir('d')\nfor i in range(120000):\n"
            "    os.close(os.open('d/%0100d' % i, os.O_CREAT | os.O_WRONLY))")

    async def main():
        s = ToolSession(SessionConfig(policy=PYP))
        try:
            r = await s.run_command(["python3", "-c", make], timeout=60)
            assert r.exit_code == 0, r.stderr
            sb = await s.sandbox()
            tracemalloc.start()
            try:
                with pytest.raises(OSError) as big:
                    await sb.files.list("d")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            with pytest.raises(OSError) as tool:
                await s.list_files("d")
            assert len(await sb.files.list("d", max_entries=200_000)) == 120_000  # the caller may ask for more
            return big.value, tool.value, peak
        finally:
            await s.aclose()

    big, tool, peak = trio.run(main)
    assert big.errno == errno.E2BIG and "max_entries=100000" in str(big), big
    assert tool.errno == errno.E2BIG and "max_entries=10000" in str(tool), tool
    assert peak < 64 << 20, f"the host held {peak >> 20} MiB for one listing"


def test_a_command_named_through_a_planted_link_tells_nothing_of_host_paths(tmp_path):
    """The host checks a command before it asks the zygote to run it (a
    missing one is CommandNotFoundError). Links the sandbox planted in its
    workdir (run as `./a`, or found on a PATH into the workdir) to a host
    file in a root-only directory and to a missing host path: before, the
    host followed them on the host, as root, so the first ran (127 inside)
    and the second raised CommandNotFoundError: an oracle on any host path.
    Now a link in what the sandbox writes is left to the exec inside: both
    get the same answer."""
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir()
    (secret_dir / "present").write_text("x")
    os.chmod(secret_dir / "present", 0o755)
    os.chmod(secret_dir, 0o700)

    async def main():
        async with zviz.open_sandbox(PYP) as sb:
            r = await sb.run(["sh", "-c", f"mkdir bin; ln -s {secret_dir}/present a; ln -s {secret_dir}/absent b; "
                                          f"ln -s {secret_dir}/present bin/t1; ln -s {secret_dir}/absent bin/t2"])
            assert r.exit_code == 0, r.stderr
            out = {}
            path = {"PATH": "/workspace/bin:/usr/bin:/bin"}
            for key, argv, env in (("a", ["./a"], None), ("b", ["./b"], None), ("t1", ["t1"], path),
                                   ("t2", ["t2"], path)):
                try:
                    out[key] = (await sb.run(argv, env=env)).status
                except zviz.CommandNotFoundError:
                    out[key] = "not found"
            # an ordinary missing command is still said on the host
            with pytest.raises(zviz.CommandNotFoundError):
                await sb.run(["./no-such-file"])
            return out

    out = trio.run(main)
    assert out["a"] == out["b"] and out["t1"] == out["t2"], out
