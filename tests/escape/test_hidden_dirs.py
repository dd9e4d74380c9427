"""zviz's own host directories are never shown to a sandbox, even under a
listed parent: the start-up cache (cached seccomp filters: rewritten, they
would weaken every later sandbox of the caller; the CLI servers' sockets)
and the workdirs' parent (other live sandboxes' workdirs). A non-root
caller's sandbox runs as the caller's uid, so file modes alone do not keep
it out. Host-side evidence: what the files hold after the sandbox ran."""

import os

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
