"""The workdir cannot fill the host's disk (issue 16, item 7): `fs.disk` makes
the workdir a tmpfs of that size for the sandbox's life (root callers).

Host-side evidence: the free space of the filesystem that holds the host's
temp directory (where workdirs are made) before and during the attack; what
the host's statvfs says of the workdir; the mount gone after close."""

from __future__ import annotations

import os
import threading

import pytest
import trio

import zviz

from ..conftest import IS_ROOT

MIB = 1024**2

FILL = r"""
import os, sys
n = total = 0
try:
    while total < 256 * 2**20:
        with open(f'f{n}', 'wb') as f:           # many files: RLIMIT_FSIZE caps each, not their sum
            for _ in range(8):
                f.write(b'x' * 2**20)
                total += 2**20
        n += 1
except OSError as e:
    print('stopped', e.errno, total >> 20, flush=True)
    sys.exit(1)
print('wrote', total >> 20, flush=True)
"""


def _policy(disk: str) -> zviz.Policy:
    base = zviz.Policy.python()
    try:
        fs = zviz.Filesystem(read_only=base.fs.read_only, disk=disk)
    except TypeError:  # a zviz without fs.disk: the attack runs unbounded (the old behaviour)
        fs = zviz.Filesystem(read_only=base.fs.read_only)
    return zviz.Policy.python(fs=fs, limits=zviz.Limits(file_size="8M", wall_s=60))


@pytest.mark.skipif(not IS_ROOT, reason="fs.disk is enforced for root callers (a tmpfs mounted on the workdir)")
def test_disk_limit_holds_and_the_host_disk_is_untouched():
    import tempfile

    host_fs = tempfile.gettempdir()
    free0 = os.statvfs(host_fs).f_bavail * os.statvfs(host_fs).f_frsize
    low = [free0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            st = os.statvfs(host_fs)
            low[0] = min(low[0], st.f_bavail * st.f_frsize)

    async def main() -> dict:
        async with zviz.open_sandbox(_policy("32M")) as sb:
            r = await sb.run(["python3", "-c", FILL])
            st = os.statvfs(sb.workdir)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            stats = sb.statistics()
            wd = sb.workdir
            host_read = await sb.read_file("f0")  # the host still reads what the sandbox wrote
        with open("/proc/self/mountinfo") as f:
            still_mounted = any(line.split()[4] == wd for line in f)
        return {"out": r.stdout.decode() + r.stderr.decode(), "status": r.status, "limit": r.limit, "used": used,
                "disk_used": getattr(stats, "disk_used", None), "disk_limit": getattr(stats, "disk_limit", None),
                "host_read": len(host_read), "mounted_after": still_mounted, "exists_after": os.path.exists(wd)}

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        r = trio.run(main)
    finally:
        stop.set()
        t.join()
    consumed = free0 - low[0]
    assert consumed < 64 * MIB, (consumed >> 20, r)  # host side: its disk did not pay for the attack
    assert r["used"] <= 33 * MIB, r
    assert "stopped 28" in r["out"], r  # ENOSPC (errno 28) inside, at the limit
    assert r["limit"] == "disk" and r["status"] == 1, r
    assert r["disk_limit"] == 32 * MIB and r["disk_used"] <= 33 * MIB, r
    assert r["host_read"] == 8 * MIB
    assert not r["mounted_after"] and not r["exists_after"], r


def test_disk_limit_needs_a_workdir_zviz_makes(tmp_path):
    with pytest.raises(zviz.PolicyError, match=r"fs\.disk"):
        async def main() -> None:
            async with zviz.open_sandbox(_policy("32M"), workdir=str(tmp_path)):
                pass
        trio.run(main)
    with pytest.raises(zviz.PolicyError, match="keep_workdir"):
        async def main2() -> None:
            async with zviz.open_sandbox(_policy("32M"), keep_workdir=True):
                pass
        trio.run(main2)


def test_disk_in_toml():
    p = zviz.Policy.from_toml('preset = "python"\n[fs]\ndisk = "1G"\n')
    assert p.fs.disk == 1024**3
    assert zviz.Policy.from_toml(p.to_toml()).fs.disk == 1024**3
