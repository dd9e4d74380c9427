"""zviz's own host directories are never shown to a sandbox, even under a
listed parent: the start-up cache (cached seccomp filters: rewritten, they
would weaken every later sandbox of the caller; the CLI servers' sockets)
and the workdirs' parent (other live sandboxes' workdirs). A non-root
caller's sandbox runs as the caller's uid, so file modes alone do not keep
it out. Host-side evidence: what the files hold after the sandbox ran."""

import os
import pathlib

import pytest

import zviz
from zviz import Policy, _workdir


@pytest.mark.trio
async def test_a_listed_parent_shows_the_cache_and_the_workdirs_empty_and_read_only(tmp_path, monkeypatch):
    parent = tmp_path / "home"
    cache = parent / ".cache" / "zviz"
    cache.mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    for d in (parent, parent / ".cache"):
        os.chmod(d, 0o777)
    os.chmod(cache, 0o777)  # (as if the sandbox ran as the caller's uid: writable but for the mask)
    entry = cache / "filter-entry"
    entry.write_bytes(b"the cached filter")
    os.chmod(entry, 0o666)
    monkeypatch.setenv("ZVIZ_CACHE_DIR", str(cache))
    workdirs = _workdir.base_path()  # where this process's sandboxes' workdirs are (one is open below)
    policy = Policy.shell().with_paths(read_write=[str(parent)], read_only=[workdirs])
    script = (f"ls -A {cache}; echo x > {cache}/new 2>/dev/null && echo WROTE; "
              f"echo y > {entry} 2>/dev/null && echo OVERWROTE; "
              f"ls -A {workdirs} | wc -l; echo done")
    async with zviz.open_sandbox(policy) as sb:
        r = await sb.run(["/bin/sh", "-c", script])
    assert r.exit_code == 0, r
    lines = r.stdout.decode().split()
    assert "WROTE" not in lines and "OVERWROTE" not in lines, r.stdout
    assert lines == ["0", "done"], r.stdout  # the cache listed empty, no workdir seen
    assert entry.read_bytes() == b"the cached filter"
    assert sorted(p.name for p in cache.iterdir()) == ["filter-entry"]
    # the same parent without zviz's directories in it: shown as it is
    other = parent / "data"
    other.mkdir()
    (other / "f").write_text("seen")
    os.chmod(other, 0o755)
    os.chmod(other / "f", 0o644)
    async with zviz.open_sandbox(policy) as sb:
        r = await sb.run(["/bin/cat", str(other / "f")])
    assert r.stdout == b"seen"


POISON = r"""
import glob, hashlib, os, struct, sys
cache = sys.argv[1]
magic = b"zviz-cache 1\n"
done = 0
for p in glob.glob(cache + "/bpf-*"):
    data = open(p, "rb").read()
    body = data[:-32]
    i = len(magic)
    n = int.from_bytes(body[i:i + 4], "little")
    j = i + 4 + n
    m = int.from_bytes(body[j:j + 4], "little")
    prog = bytearray(body[j + 4:j + 4 + m])
    for k in range(0, len(prog), 8):  # every return but the bad-architecture kill: allow
        code, jt, jf, ret = struct.unpack_from("<HBBI", prog, k)
        if code == 0x06 and ret != 0x80000000:
            struct.pack_into("<HBBI", prog, k, code, jt, jf, 0x7FFF0000)
    new = body[:j + 4] + bytes(prog)
    with open(p + ".x", "wb") as f:
        f.write(new + hashlib.sha256(new).digest())
    os.chmod(p + ".x", 0o600)
    os.rename(p + ".x", p)
    done += 1
open(cache + "/planted", "w").close()
print("poisoned", done)
"""

PTRACE = "import ctypes; print('ptrace', ctypes.CDLL(None).ptrace(0, 0, 0, 0))"


def _first_use(home: str, cache: str) -> tuple[str, str, dict[str, int]]:
    import trio

    from zviz import _bpf

    async def run(code: str, *args: str) -> tuple[str, dict[str, int]]:
        policy = Policy.shell().with_paths(read_write=[home])
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run(["python3", "-c", code, *args])
            return (r.stdout + r.stderr).decode(), dict(sb.statistics().denials)

    attack, _ = trio.run(run, POISON, cache)
    _bpf.program.cache_clear()  # the next sandbox reads its filter back from the cache, as a new process would
    later, denials = trio.run(run, PTRACE)
    return attack, later, denials


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to uid 65534: a caller whose sandbox runs as its own uid")
def test_a_cache_made_while_the_sandbox_opens_is_masked_too(monkeypatch):
    """A caller's first sandbox (no cache directory yet) with a read-write
    parent of it (`zviz run --rw ~`). The mask covers only what exists when
    the sandbox is planned, and the cache was made right after, by the same
    open (its compiled filter is stored): the sandbox saw it, writable (its
    uid is the caller's), and rewrote the cached filter with every return
    but the architecture check's turned into ALLOW and a fresh digest: the
    shape check passed, and the caller's next sandbox of that policy ran
    with no syscall filter at all (`ptrace(TRACEME)` returned 0, no denial).
    Now the cache directory is made before the plan, so it is always masked."""
    import shutil

    from ..conftest import _warm_up, run_as, template_parent

    _warm_up()  # (what the child imports after the drop to uid 65534 must be imported now)

    home = pathlib.Path(template_parent("nobody"))  # (a 0700 directory of uid 65534's, in reach of it)
    cache = home / ".cache" / "zviz"
    monkeypatch.setenv("ZVIZ_CACHE_DIR", str(cache))
    attack, later, denials = run_as("nobody", _first_use, str(home), str(cache))
    # the caller's next sandbox still has its filter: ptrace refused and reported
    assert "ptrace -1" in later, later
    assert denials.get("ptrace") == 1, denials
    assert "planted" not in os.listdir(cache), attack
    assert "poisoned" not in attack or "poisoned 0" in attack, attack
    shutil.rmtree(home)


def _redirect(home: str, listed: str, script: str) -> str:
    import trio

    from zviz import _diskcache

    async def main() -> str:
        async with zviz.open_sandbox(Policy.shell().with_paths(read_write=[listed])) as sb:
            r = await sb.run(["/bin/sh", "-c", script])
            return (r.stdout + r.stderr).decode()

    out = trio.run(main)
    _diskcache.store("probe-entry", b"what the host stores next")  # where the host's next store lands
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to uid 65534: a caller whose sandbox runs as its own uid")
@pytest.mark.parametrize("how", ["rename-the-parent", "listed-through-a-link", "repoint-a-link-on-the-way"])
def test_the_cache_cannot_be_replaced_or_reached_another_way(how, monkeypatch):
    """The mask covers the cache directory itself; the sandbox, as the
    caller's uid with a read-write parent, went around it:
    - rename-the-parent: `mv ~/.cache ~/.c2; mkdir -p ~/.cache/zviz`: the
      host's next process found an empty private directory of the caller's
      at its cache path and filled it with filters the sandbox (still
      running) could read and rewrite. Now every directory between the
      read-write bind and the mask is a mount point of its own: `EBUSY`.
    - listed-through-a-link: `--rw /home/me-link` (a link to the home, as
      on hosts where /home is a link to /var/home): the mask compared the
      cache's real path with the listed name, so nothing was masked and the
      sandbox wrote into the cache. Now a listed link's real path is what
      is compared, and the mask is placed where the link shows it.
    - repoint-a-link-on-the-way: the cache's path goes through a link of
      the caller's (`~/.cache -> cache-real`) in the read-write tree; the
      sandbox re-points it to a private directory of its own, and the
      host's next store went there (the sandbox's to rewrite). Now the cache
      follows no link on its way that root does not own (it is off: set
      ZVIZ_CACHE_DIR to the real path)."""
    import shutil

    from ..conftest import _warm_up, run_as, template_parent

    _warm_up()  # (what the child imports after the drop to uid 65534 must be imported now)

    home = template_parent("nobody")
    cache = os.path.join(home, ".cache", "zviz")
    os.makedirs(cache)
    for d in (os.path.dirname(cache), cache):
        os.chown(d, 65534, 65534)
        os.chmod(d, 0o700)
    with open(os.path.join(cache, "entry"), "wb") as f:
        f.write(b"the host's")
    os.chown(os.path.join(cache, "entry"), 65534, 65534)
    before = os.stat(cache).st_ino
    monkeypatch.setenv("ZVIZ_CACHE_DIR", cache)
    link = home + "-link"
    try:
        if how == "repoint-a-link-on-the-way":
            shutil.rmtree(os.path.join(home, ".cache"))
            os.makedirs(os.path.join(home, "cache-real", "zviz"))
            for d in ("cache-real", "cache-real/zviz"):
                os.chown(os.path.join(home, d), 65534, 65534)
                os.chmod(os.path.join(home, d), 0o700)
            os.symlink("cache-real", os.path.join(home, ".cache"))
            os.lchown(os.path.join(home, ".cache"), 65534, 65534)
            out = run_as("nobody", _redirect, home, home,
                         f"cd {home} && rm .cache && mkdir -p evil/zviz && chmod 700 evil/zviz && ln -s evil .cache")
            assert os.listdir(os.path.join(home, "evil", "zviz")) == [], out  # the host stored nothing there
            return
        if how == "rename-the-parent":
            out = run_as("nobody", _redirect, home, home,
                         f"mv {home}/.cache {home}/.c2 && mkdir -p {cache} && chmod 700 {cache} && echo MOVED")
        else:
            os.symlink(home, link)
            out = run_as("nobody", _redirect, home, link,
                         f"ls -A {link}/.cache/zviz; echo x > {link}/.cache/zviz/entry && echo WROTE; "
                         f"touch {link}/.cache/zviz/planted && echo PLANTED")
        assert "MOVED" not in out and "WROTE" not in out and "PLANTED" not in out, out
        # on the host: the cache is the one the host made, with its entry as it was
        assert os.stat(cache).st_ino == before, out
        assert sorted(n for n in os.listdir(cache) if not n.startswith(("bpf-", "probe-"))) == ["entry"], out
        with open(os.path.join(cache, "entry"), "rb") as f:
            assert f.read() == b"the host's"
        assert not os.path.exists(os.path.join(home, ".c2"))
    finally:
        if os.path.islink(link):
            os.unlink(link)
        shutil.rmtree(home)


def test_a_listed_workdir_parent_that_the_first_sandbox_makes_is_found(tmp_path):
    """A policy may list zviz's workdir parent (a temp dir listed whole):
    in a process's first sandbox, that parent does not exist yet when the
    policy's paths are first looked at (before the host side makes it), and
    the open failed with "a path that exists on this host" (round 15's
    single resolution). It is looked at again once the host side is made:
    the sandbox opens, and the parent is shown without the workdirs in it."""
    import subprocess
    import sys

    fresh = tmp_path / "tmp"
    fresh.mkdir()
    program = (
        "import trio, zviz\n"
        "from zviz import _workdir\n"
        "async def main():\n"
        "    base = _workdir.base_path()\n"
        "    pol = zviz.Policy.shell().with_paths(read_only=[base])\n"
        "    async with zviz.open_sandbox(pol) as sb:\n"
        "        r = await sb.run(['/bin/sh', '-c', f'ls -A {base} | wc -l'])\n"
        "    print(r.exit_code, r.stdout.decode().strip())\n"
        "trio.run(main)\n")
    env = {**os.environ, "TMPDIR": str(fresh)}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "0"], out  # it ran; the workdirs' parent listed empty (its workdir masked)
