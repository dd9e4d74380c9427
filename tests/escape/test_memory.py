"""Memory outside every rlimit (issue 16, item 6): memfd pages, pipe buffers and
unix socket buffers show in no process's address space, so RLIMIT_AS never
sees them. The sandbox's memory cgroup charges them all.

Host-side evidence: the host's own count of shared memory (`Shmem` in
/proc/meminfo) and of available memory while the attack holds what it got;
the cgroup's peak as the host reads it; the command's end (killed by the
memory limit). The attack's own report ("held N MiB") is checked too, as a
second opinion."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from typing import Self

import pytest
import trio

import zviz

from ..conftest import IS_ROOT, MEMORY_CGROUP_LINE, run_as

MIB = 1024**2


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class _Sampler:
    """The host's Shmem (max) and MemAvailable (min) while the attack runs."""

    def __init__(self) -> None:
        self.shmem0, self.avail0 = _meminfo("Shmem"), _meminfo("MemAvailable")
        self.shmem_max, self.avail_min = self.shmem0, self.avail0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.shmem_max = max(self.shmem_max, _meminfo("Shmem"))
            self.avail_min = min(self.avail_min, _meminfo("MemAvailable"))

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _held(stdout: str) -> int:
    got = [int(m) for m in re.findall(r"held (\d+) MiB", stdout)]
    return max(got, default=0) * MIB


def _hold(attack_bin: bytes, argv: list[str], memory: str) -> dict:
    async def main() -> dict:
        pol = zviz.Policy.python(limits=zviz.Limits(memory=memory, wall_s=30),
                                 fs=zviz.Filesystem(read_only=zviz.Policy.python().fs.read_only, tmp_size="8M"))
        async with zviz.open_sandbox(pol) as sb:
            await sb.write_file("attack", attack_bin, mode=0o755)
            r = await sb.run(["./attack", *argv], timeout=30)
            st = sb.statistics()
            return {"stdout": r.stdout.decode(errors="replace"), "signal": r.signal, "limit": r.limit,
                    "peak": getattr(st, "memory_peak", None), "mlimit": getattr(st, "memory_limit", None),
                    "kills": getattr(st, "memory_oom_kills", None), "degraded": st.degraded}
    return trio.run(main)


needs_cgroup = pytest.mark.skipif(not IS_ROOT, reason="a memory cgroup needs root here (no delegated cgroup v2)")


@needs_cgroup
def test_memfd_is_bounded_by_the_sandbox_memory(attack_bin):
    """The PoC of the review: memory=128M, tmp_size=8M, a memfd of 1.5 GiB held
    for 3 s. Before: the host's Shmem grew by 1.5 GiB with an RSS of a few MB."""
    with _Sampler() as s:
        r = _hold(attack_bin, ["memfd", "1536", "3"], "128M")
    shmem_growth = s.shmem_max - s.shmem0
    drained = s.avail0 - s.avail_min
    assert shmem_growth < 400 * MIB, (shmem_growth >> 20, r)  # host side: the shared memory never grew past the limit
    assert drained < 700 * MIB, (drained >> 20, r)
    assert _held(r["stdout"]) <= 128 * MIB, r["stdout"][-300:]
    assert r["signal"] == 9 and r["limit"] == "memory", r  # killed by the sandbox's memory limit, and told so
    assert r["mlimit"] == 128 * MIB and r["peak"] <= 128 * MIB and r["kills"] >= 1, r


@needs_cgroup
@pytest.mark.parametrize("kind", ["pipes", "sockbuf"])
def test_pipe_and_socket_buffers_are_bounded(attack_bin, kind):
    """Pipes full of data and unix socket buffers: kernel memory that no
    address space shows, charged to the sandbox's cgroup (kernel memory is
    part of a v1 cgroup's usage on this kernel)."""
    with _Sampler() as s:
        r = _hold(attack_bin, [kind, "512", "3"], "64M")
    drained = s.avail0 - s.avail_min
    assert _held(r["stdout"]) <= 64 * MIB, r["stdout"][-300:]
    assert drained < 400 * MIB, (drained >> 20, r)
    assert r["peak"] is not None and r["peak"] <= 64 * MIB, r
    assert r["signal"] == 9 and r["limit"] == "memory", r


def _scenario_no_cgroup(attack_bin: bytes) -> tuple:
    import warnings

    async def main() -> tuple:
        pol = zviz.Policy.python(limits=zviz.Limits(memory="128M"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with zviz.open_sandbox(pol) as sb:
                await sb.write_file("attack", attack_bin, mode=0o755)
                r = await sb.run(["./attack", "memfd", "64", "0"])
                degraded = sb.statistics().degraded
        opted = attrs_evolve_limits(pol, memfd_without_cgroup=True)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            async with zviz.open_sandbox(opted) as sb:
                await sb.write_file("attack", attack_bin, mode=0o755)
                r2 = await sb.run(["./attack", "memfd", "4", "0"])
        return (r.stdout.decode(), dict(r.denials), degraded, [str(w.message) for w in caught], r2.stdout.decode())
    return trio.run(main)


def attrs_evolve_limits(pol: zviz.Policy, **kw: object) -> zviz.Policy:
    import attrs

    return attrs.evolve(pol, limits=attrs.evolve(pol.limits, **kw))


@pytest.mark.skipif(not IS_ROOT, reason="simulates a non-root caller by dropping from root")
def test_without_a_cgroup_memfd_is_refused_and_said(attack_bin):
    """A caller that cannot make a memory cgroup (uid 65534 here): memfd_create
    is refused by default, the sandbox says why (degraded + one warning), and
    the policy can opt back in."""
    out, _denials, degraded, warns, opted = run_as("nobody", _scenario_no_cgroup, attack_bin)
    assert "memfd_create: FAILED" in out and "held" not in out, out
    assert any(d.startswith(MEMORY_CGROUP_LINE) and "memfd_create is refused" in d for d in degraded), degraded
    assert any("memfd_without_cgroup" in w for w in warns), warns
    assert "memfd held 4 MiB total" in opted, opted


@needs_cgroup
def test_cgroup_is_removed_and_made_per_sandbox():
    """Each sandbox gets its own cgroup, every process of it inside from the
    first instruction (the zygote included), and teardown removes it. Seen
    from the host: inside, a cgroup namespace rooted there shows "/"."""
    async def host_view(sb: zviz.Sandbox) -> str:
        p = await sb.start(["sleep", "30"], stdin=False, stdout=False, stderr=False)
        try:
            with open(f"/proc/{p.pid}/cgroup") as f:
                return f.read()
        finally:
            p.kill()
            await p.wait()

    async def main() -> tuple:
        async with zviz.open_sandbox(zviz.Policy.python(limits=zviz.Limits(memory="256M"))) as a, \
                zviz.open_sandbox(zviz.Policy.python(limits=zviz.Limits(memory="256M"))) as b:
            ra, rb = await host_view(a), await host_view(b)
            paths = (a._resources.cgroup.path, b._resources.cgroup.path)
            zygote_pid = a._zygote.pid if a._zygote is not None else None
            with open(os.path.join(paths[0], "cgroup.procs")) as f:
                members = [int(x) for x in f.read().split()]
            cg = a._resources.cgroup
            joined_by = (cg.kind, cg.procs.label)
        return ra, rb, paths, zygote_pid, members, joined_by

    out_a, out_b, paths, zygote_pid, members, joined_by = trio.run(main)
    # v1: the child joins by writing "0" into `tasks` (no global lock, no RCU grace period); v2: the stage
    # writes its pid into cgroup.procs
    assert joined_by in (("v1", "tasks"), ("v2", "cgroup.procs")), joined_by
    assert zygote_pid is not None
    assert paths[0] != paths[1]
    assert os.path.basename(paths[0]) in out_a and os.path.basename(paths[1]) in out_b
    if zygote_pid is not None:
        assert zygote_pid in members
    time.sleep(0.05)
    assert not os.path.exists(paths[0]) and not os.path.exists(paths[1])


@needs_cgroup
def test_the_sandbox_sees_no_host_cgroup_path():
    """/proc/self/cgroup inside named the host's cgroup tree: its layout
    above zviz (a container's id here) and the cgroup's name, which holds the
    supervisor's pid. A cgroup namespace, made once the stage's child is in
    the sandbox's cgroup, roots every hierarchy there: the zygote and each
    command read "/" while the host still sees them in that cgroup."""
    async def main() -> tuple:
        async with zviz.open_sandbox(zviz.Policy.python(limits=zviz.Limits(memory="256M"))) as sb:
            inside = (await sb.run(["sh", "-c", "cat /proc/self/cgroup /proc/1/cgroup"])).stdout.decode()
            name = os.path.basename(sb._resources.cgroup.path)
            assert sb._zygote is not None
            with open(f"/proc/{sb._zygote.pid}/cgroup") as f:
                host = f.read()
            zygote_ns = os.readlink(f"/proc/{sb._zygote.pid}/ns/cgroup")
        return inside, name, host, zygote_ns

    inside, name, host, zygote_ns = trio.run(main)
    lines = inside.split()
    assert len(lines) >= 2 and all(line.endswith(":/") for line in lines), inside
    assert name not in inside and str(os.getpid()) not in inside
    assert name in host  # (still in its cgroup, as the host sees it)
    assert zygote_ns != os.readlink("/proc/self/ns/cgroup")


@needs_cgroup
def test_a_failed_cgroup_join_fails_the_open_and_leaves_nothing(monkeypatch, snapshot):
    """On a v1 hierarchy the sandbox's first process joins its memory cgroup
    itself (zviz/_stage.c step_cgroup: "0" into `tasks`, which skips the
    kernel's global migration lock; a pid written into cgroup.procs waits for
    an RCU grace period). If that join fails (here: the cgroup was removed
    between its creation and the spawn), nothing of the sandbox may run
    outside it: the open fails naming the step, and no process, fd, cgroup or
    workdir is left."""
    from zviz import _cgroup

    real = _cgroup.MemoryCgroup.create
    made: list[str] = []

    def create(name: str, limit: int):
        cg, reason = real(name, limit)
        assert cg is not None, reason
        made.append(cg.path)
        os.rmdir(cg.path)  # still empty: nothing joined yet
        return cg, reason

    monkeypatch.setattr(_cgroup.MemoryCgroup, "create", staticmethod(create))

    async def main() -> BaseException | None:
        snap = snapshot()
        try:
            async with zviz.open_sandbox(zviz.Policy.python(limits=zviz.Limits(memory="256M"))) as sb:
                await sb.run(["/bin/true"])
        except zviz.SandboxSetupError as e:
            await snap.assert_released()
            return e
        return None

    err = trio.run(main)
    assert made, "no cgroup was made"
    assert isinstance(err, zviz.SandboxSetupError), err
    assert err.step == "cgroup" and err.errno == errno.ENODEV, err
    assert "memory cgroup" in str(err), err
    assert not os.path.exists(made[0])


@needs_cgroup
def test_the_sandbox_keeps_no_way_into_its_cgroup_join_file():
    """The child joins its v1 cgroup through an fd of the host's (`tasks`).
    That fd must not reach anything of the sandbox: neither the zygote nor a
    command holds an fd to a cgroup file (host-side: /proc/PID/fd of both),
    and the cgroup hierarchy cannot be opened for writing from inside (so
    nothing can move itself out to escape the memory limit)."""
    async def main() -> tuple:
        async with zviz.open_sandbox(zviz.Policy.python(limits=zviz.Limits(memory="256M"))) as sb:
            proc = await sb.start(["sleep", "30"])
            cg = sb._resources.cgroup
            held = {}
            for pid in (sb._zygote.pid, proc.pid):
                links = []
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                held[pid] = links
            r = await sb.run(["python3", "-c", (
                "import os\n"
                "for p in ('/sys/fs/cgroup/memory/tasks', '/sys/fs/cgroup/memory/cgroup.procs',\n"
                "          '/sys/fs/cgroup/unified/cgroup.procs'):\n"
                "    try:\n"
                "        fd = os.open(p, os.O_WRONLY); os.write(fd, b'0'); print('MOVED', p)\n"
                "    except OSError as e:\n"
                "        print('refused', p, e.errno)\n")])
            with open(os.path.join(cg.path, "cgroup.procs")) as f:
                members = [int(x) for x in f.read().split()]
            proc.kill()
            await proc.wait()
            return held, r.stdout.decode(), members, sb._zygote.pid

    held, out, members, zygote = trio.run(main)
    for pid, links in held.items():
        assert not [x for x in links if "cgroup" in x], (pid, links)
    assert "MOVED" not in out and out.count("refused") == 3, out
    assert zygote in members


@needs_cgroup
def test_the_cgroups_figures_follow_what_the_sandbox_holds():
    """The peak and the OOM kills are read from files held open since the
    cgroup was made (a pread at offset 0 each time): each read must be the
    kernel's figure at that moment, not the first one read, nor a zero."""
    async def main() -> tuple:
        pol = zviz.Policy.python(limits=zviz.Limits(memory="96M"))
        touch = "b = bytearray({n} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
        async with zviz.open_sandbox(pol) as sb:
            before = sb.statistics()
            await sb.run(["python3", "-c", touch.format(n=24)])
            small = sb.statistics()
            await sb.run(["python3", "-c", touch.format(n=48)])
            big = sb.statistics()
            # (one process cannot pass the limit: RLIMIT_AS stops it first; four of 40 MiB each can)
            forks = "import os, time\nfor _ in range(3):\n    if os.fork() == 0: break\n"
            killed = await sb.run(["python3", "-c", forks + touch.format(n=40) + "time.sleep(2)\n"])
            after_kill = sb.statistics()
        return before, small, big, killed, after_kill, sb.statistics()
    before, small, big, killed, after_kill, closed = trio.run(main)
    assert before.memory_peak is not None and before.memory_peak < 24 * MIB, before
    assert 24 * MIB <= small.memory_peak < 48 * MIB, small.memory_peak
    assert 48 * MIB <= big.memory_peak <= 96 * MIB, big.memory_peak
    assert (before.memory_oom_kills, small.memory_oom_kills, big.memory_oom_kills) == (0, 0, 0)
    assert after_kill.memory_oom_kills >= 1 and after_kill.memory_peak >= 90 * MIB, (killed, after_kill)
    # after the close: the figures as they were at the end (read before the cgroup went)
    assert closed.memory_peak == after_kill.memory_peak or closed.memory_peak >= 90 * MIB, closed
    assert closed.memory_oom_kills == after_kill.memory_oom_kills and closed.memory_limit == 96 * MIB, closed
