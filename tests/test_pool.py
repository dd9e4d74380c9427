"""The pool of pre-started sandboxes (zviz/_pool.py): a pooled sandbox is a
fresh sandbox made early, and nothing else.

What the tests check from the host: namespace inodes (/proc/PID/ns/*) of the
sandboxes' zygotes, workdir paths, files, processes and pid numbers seen
inside, what is left on disk and running after the loop ends."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import time

import anyio
import attrs
import pytest
import trio

import zviz
from zviz import _lifecycle, _netns, _pool

from .conftest import needs_userns

pytestmark = needs_userns()


@pytest.fixture
def pool_size():
    """Set the pool's size for one test; back to the environment's after."""
    yield zviz.set_pool_size
    zviz.set_pool_size(None)


async def _filled(policy: zviz.Policy, n: int, timeout: float = 20.0) -> list[zviz.Sandbox]:
    """Wait (idle: the pool fills only while its loop is idle) until `n` are ready."""
    pool = _pool.current()
    assert pool is not None
    with anyio.fail_after(timeout):
        while len(pool.ready.get((policy, True), ())) < n:
            await anyio.sleep(0.01)
    return list(pool.ready[(policy, True)])


def _ns(sb: zviz.Sandbox) -> dict[str, int]:
    pid = sb._zygote.pid
    return {k: os.stat(f"/proc/{pid}/ns/{k}").st_ino for k in ("user", "pid", "mnt", "net", "ipc", "uts")}


PROBE = ("echo pid=$$; ls -A /tmp | tr '\\n' ' '; echo; ls -A . | tr '\\n' ' '; echo; "
         "set -- /proc/[0-9]*; echo $#")  # (a glob of sh itself: an ls | grep would race with its own grep)


@pytest.mark.trio
async def test_pooled_sandboxes_are_fresh_and_apart(pool_size):
    pool_size(2)
    policy = zviz.Policy.python()
    async with zviz.open_sandbox(policy) as first:  # a miss: made by the caller; the pool fills behind it
        fresh = await first.run(["sh", "-c", PROBE])
    pooled = await _filled(policy, 2)
    async with zviz.open_sandbox(policy) as a, zviz.open_sandbox(policy) as b:
        assert {a, b} == set(pooled)  # both came from the pool
        assert a.workdir != b.workdir and os.path.isdir(a.workdir) and os.path.isdir(b.workdir)
        assert os.listdir(a.workdir) == [] and os.listdir(b.workdir) == []
        na, nb = _ns(a), _ns(b)
        blank = _netns.blank_fd() if _netns.usable() else None
        for kind in na:  # every namespace its own (the host sees different inodes) ...
            if kind == "net" and blank is not None:  # ... but the blank one, which nothing can change
                assert na[kind] == nb[kind] == os.fstat(blank).st_ino  # (tests/escape/test_blank_netns.py)
            else:
                assert na[kind] != nb[kind], kind
        # A leaves files in its /tmp and workdir and a process behind; B sees none of it
        await a.run(["sh", "-c", "echo x > /tmp/left; echo y > left; (sleep 60 &)"])
        ra, rb = await a.run(["sh", "-c", PROBE]), await b.run(["sh", "-c", PROBE])
        assert b"left" in ra.stdout
        # B looks exactly like a fresh, unpooled sandbox's first command: same pid
        # number in its own pid namespace, empty /tmp and workdir, as many processes
        assert rb.stdout == fresh.stdout, (rb.stdout, fresh.stdout)
        assert b"left" not in rb.stdout
    await _lifecycle.released()  # (aclose returns at their processes' death; the workdirs go right after)
    assert not os.path.exists(a.workdir) and not os.path.exists(b.workdir)


@pytest.mark.trio
async def test_a_pooled_sandbox_is_handed_out_once(pool_size):
    pool_size(1)
    policy = zviz.Policy.python()
    seen: list[zviz.Sandbox] = []
    async with zviz.open_sandbox(policy):  # the pool learns the policy at its first request
        pass
    for _ in range(3):
        await _filled(policy, 1)
        async with zviz.open_sandbox(policy) as sb:
            assert sb not in seen
            seen.append(sb)
            assert not sb.closed
        assert sb.closed
    pool = _pool.current()
    assert pool is not None and all(s not in pool.ready[(policy, True)] for s in seen)


@pytest.mark.trio
async def test_pool_is_keyed_by_the_whole_policy(pool_size):
    pool_size(1)
    a = zviz.Policy.python()
    b = attrs.evolve(a, limits=attrs.evolve(a.limits, wall_s=a.limits.wall_s + 1))  # differs in one limit
    assert a != b
    async with zviz.open_sandbox(a):
        pass
    (pooled_a,) = await _filled(a, 1)
    async with zviz.open_sandbox(b) as sb:
        assert sb is not pooled_a and sb.policy == b
    pool = _pool.current()
    assert pool is not None and list(pool.ready[(a, True)]) == [pooled_a]  # still waiting for a caller of A
    async with zviz.open_sandbox(attrs.evolve(a)) as sb:  # an equal policy (another object) is served
        assert sb is pooled_a


@pytest.mark.trio
async def test_a_pooled_sandbox_shows_the_host_paths_as_they_are_now(pool_size, tmp_path):
    """A pooled sandbox bound its host paths when it was made: once one of them
    names another file (a directory replaced, a file saved by rename), it is
    not handed out (a fresh sandbox would show the new one): closed instead.
    Host evidence: which pooled sandbox the caller got, its zygote gone."""
    pool_size(1)
    os.chmod(tmp_path, 0o755)
    data, conf = tmp_path / "data", tmp_path / "conf.txt"
    data.mkdir(mode=0o755)
    (data / "f").write_text("old")
    conf.write_text("old")
    for p in (data / "f", conf):
        p.chmod(0o644)
    policy = zviz.Policy.shell().with_paths(read_only=[str(data)])
    policy = attrs.evolve(policy, fs=attrs.evolve(policy.fs, binds=(zviz.Bind.parse(f"{conf}:/conf.txt"),)))
    probe = ["sh", "-c", f"cat {data}/f /conf.txt"]
    async with zviz.open_sandbox(policy):
        pass
    (pooled,) = await _filled(policy, 1)
    async with zviz.open_sandbox(policy) as sb:  # nothing changed: the pooled one
        assert sb is pooled and (await sb.run(probe)).stdout == b"oldold"
    for change in ("replace the directory", "save the file by rename"):
        (pooled,) = await _filled(policy, 1)
        zygote = pooled._zygote.pid
        if change == "replace the directory":
            data.rename(tmp_path / "data.old")
            data.mkdir(mode=0o755)
            (data / "f").write_text("new")
            (data / "f").chmod(0o644)
        else:
            (tmp_path / "conf.new").write_text("new")
            (tmp_path / "conf.new").chmod(0o644)
            (tmp_path / "conf.new").rename(conf)
        async with zviz.open_sandbox(policy) as sb:
            assert sb is not pooled, change
            out = (await sb.run(probe)).stdout
        assert out == (b"newold" if change == "replace the directory" else b"newnew"), change
        with anyio.fail_after(10):
            while pooled._life.done.is_set() is False or os.path.exists(f"/proc/{zygote}"):
                await anyio.sleep(0.01)
        assert not os.path.exists(pooled.workdir)


@pytest.mark.trio
async def test_other_options_bypass_the_pool(pool_size, tmp_path):
    pool_size(1)
    policy = zviz.Policy.python()
    async with zviz.open_sandbox(policy):
        pass
    (pooled,) = await _filled(policy, 1)
    os.chmod(tmp_path, 0o777)
    async with zviz.open_sandbox(policy, workdir=tmp_path) as sb:
        assert sb is not pooled and sb.workdir == os.path.realpath(tmp_path)
    async with zviz.open_sandbox(policy, keep_workdir=True) as sb:
        assert sb is not pooled
        kept = sb.workdir
    assert os.path.isdir(kept)
    snap, wd = tmp_path / "tmpl", tmp_path / "w"
    wd.mkdir(mode=0o777)
    os.chmod(wd, 0o777)
    async with zviz.open_sandbox(policy, workdir=wd) as sb:
        await sb.snapshot(str(snap))
    async with zviz.open_sandbox(policy, template=str(snap)) as sb:  # a template: its own fresh workdir
        assert sb is not pooled
    sb = await zviz.Sandbox.create(policy)  # the other way to open one is served too
    try:
        assert sb is pooled
    finally:
        await sb.aclose()


def _loop_end_script(backend: str) -> str:
    return textwrap.dedent(f"""
        import json, os, sys, anyio, zviz
        from zviz import _pool
        zviz.set_pool_size(2)
        policy = zviz.Policy.python()
        out = {{}}
        async def main():
            async with zviz.open_sandbox(policy) as sb:
                r = await sb.run(["true"])
                assert r.exit_code == 0
            pool = _pool.current()
            with anyio.fail_after(20):
                while len(pool.ready.get((policy, True), ())) < 2:
                    await anyio.sleep(0.01)
            out["workdirs"] = [s.workdir for s in pool.ready[(policy, True)]]
            out["pids"] = [s._zygote.pid for s in pool.ready[(policy, True)]]
        anyio.run(main, backend={backend!r})
        print(json.dumps(out))
    """)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_the_loop_end_closes_the_pool_and_leaves_nothing(backend, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    os.chmod(tmp_path, 0o755)
    p = subprocess.run([sys.executable, "-W", "error", "-c", _loop_end_script(backend)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no ResourceWarning about the pooled sandboxes
    out = json.loads(p.stdout)
    assert len(out["workdirs"]) == 2 and len(out["pids"]) == 2
    for w in out["workdirs"]:
        assert not os.path.exists(w), w
    for pid in out["pids"]:
        assert not os.path.exists(f"/proc/{pid}"), pid
    assert os.listdir(tmp_path) in ([], ["zviz-0"]) or all(not os.listdir(tmp_path / d) for d in os.listdir(tmp_path))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio", "asyncio"])
async def test_pool_on_both_loops(pool_size, anyio_backend):
    pool_size(1)
    policy = zviz.Policy.python()
    async with zviz.open_sandbox(policy):
        pass
    (pooled,) = await _filled(policy, 1)
    async with zviz.open_sandbox(policy) as sb:
        assert sb is pooled
        r = await sb.run(["sh", "-c", "echo $$"])
        assert r.exit_code == 0 and r.stdout.strip().isdigit()


@pytest.mark.trio
async def test_a_failing_refill_is_reported_and_backs_off(pool_size, monkeypatch):
    calls = []

    async def broken(policy, zygote=True):
        calls.append(trio.current_time())
        raise RuntimeError("no more uids (simulated)")

    monkeypatch.setattr(_pool, "make", broken)
    pool_size(1)
    policy = zviz.Policy.python()
    async with zviz.open_sandbox(policy) as sb:  # a miss: the caller's own sandbox works
        assert (await sb.run(["true"])).exit_code == 0
    await trio.sleep(1.0)
    # backs off 0.1, 0.2, 0.4, 0.8 s...: a handful of tries in a second, never a hot loop
    assert 2 <= len(calls) <= 5, calls
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(g2 > g1 for g1, g2 in itertools.pairwise(gaps)), gaps
    with pytest.warns(zviz.ZvizWarning, match=r"pre-starting a sandbox failed .*no more uids \(simulated\)"):
        async with zviz.open_sandbox(policy) as sb:
            assert (await sb.run(["true"])).exit_code == 0
    # reported once, not at every open
    async with zviz.open_sandbox(policy):
        pass


@pytest.mark.trio
async def test_size_zero_disables_and_lowering_the_size_closes_idle_ones(pool_size):
    pool_size(0)
    policy = zviz.Policy.python()
    async with zviz.open_sandbox(policy):
        pass
    await trio.sleep(0.05)
    assert _pool.current(create=False) is None  # nothing was started
    pool_size(2)
    async with zviz.open_sandbox(policy):
        pass
    pooled = await _filled(policy, 2)
    pool_size(0)
    with trio.fail_after(10):
        while not all(s._life.done.is_set() for s in pooled):  # closed, and torn down
            await trio.sleep(0.01)
    for s in pooled:
        assert not os.path.exists(s.workdir)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_the_size_may_be_set_from_another_thread(pool_size, backend):
    """An application runs its event loop in a thread and sets the size from
    another: the pool's task is woken on its own loop (trio refused a wake-up
    from a foreign thread: RuntimeError), and lowering the size to 0 closes
    its idle sandbox (host evidence: its zygote exits)."""
    import threading

    pool_size(1)
    filled, lowered, out = threading.Event(), threading.Event(), {}

    async def main() -> None:
        async with zviz.open_sandbox(zviz.Policy.shell()):
            pass
        (pooled,) = await _filled(zviz.Policy.shell(), 1)
        out["zygote"] = pooled._zygote.pid
        filled.set()
        while not lowered.is_set():
            await anyio.sleep(0.01)
        with anyio.fail_after(10):
            while pooled._life.done.is_set() is False:
                await anyio.sleep(0.01)
        out["ready"] = sum(len(q) for q in _pool.current().ready.values())

    t = threading.Thread(target=lambda: anyio.run(main, backend=backend))
    t.start()
    try:
        assert filled.wait(30)
        zviz.set_pool_size(0)  # (from this thread, not the loop's)
    finally:
        lowered.set()
        t.join(60)
    assert out.get("ready") == 0 and not os.path.exists(f"/proc/{out['zygote']}"), out


def test_size_setting_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="between 0 and"):
        zviz.set_pool_size(-1)
    with pytest.raises(TypeError):
        zviz.set_pool_size("2")  # type: ignore[arg-type]
    zviz.set_pool_size(None)
    monkeypatch.setenv("ZVIZ_POOL_SIZE", "lots")
    with pytest.raises(zviz.PolicyError, match="ZVIZ_POOL_SIZE"):
        _pool.pool_size()
    for odd in ("-1", " 2", "2.0", "65", "\u00b2", "\u0661"):  # (the last two: str.isdigit's, not int's, or not ASCII)
        monkeypatch.setenv("ZVIZ_POOL_SIZE", odd)
        with pytest.raises(zviz.PolicyError, match=r"ZVIZ_POOL_SIZE.*an integer from 0 to 64"):
            _pool.pool_size()
    monkeypatch.setenv("ZVIZ_POOL_SIZE", "3")
    assert _pool.pool_size() == 3
    zviz.set_pool_size(0)
    try:
        assert _pool.pool_size() == 0  # the call wins over the environment
    finally:
        zviz.set_pool_size(None)


def test_the_blocking_facade_never_starts_a_pool(pool_size):
    # each zviz.sync sandbox runs its own event loop, which ends with it: a
    # pre-started sandbox there would be made for nothing
    pool_size(2)
    made: list[object] = []
    real = _pool.make

    async def counting(policy, zygote=True):
        made.append(policy)
        return await real(policy, zygote)

    import unittest.mock

    with unittest.mock.patch.object(_pool, "make", counting):
        for _ in range(2):
            with zviz.sync.open_sandbox(zviz.Policy.python()) as sb:
                assert sb.run(["true"]).exit_code == 0
                time.sleep(0.3)  # its loop idles here: a pool would fill now
    assert made == []


def test_zviz_run_never_starts_a_pool(tmp_path):
    # one command, then the process ends: a pre-started sandbox would be made for nothing
    os.chmod(tmp_path, 0o755)
    script = textwrap.dedent("""
        import sys
        from zviz import _cli, _pool
        made = []
        real = _pool.make
        async def counting(policy, zygote=True):
            made.append(policy)
            return await real(policy, zygote)
        _pool.make = counting
        code = _cli.main(["run", "--", "sh", "-c", "sleep 0.3; echo ran"])
        print("made", len(made))
        sys.exit(code)
    """)
    p = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, ZVIZ_POOL_SIZE="2", TMPDIR=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "ran" in p.stdout and "made 0" in p.stdout, p.stdout


@pytest.mark.trio
async def test_warm_snippets_take_pooled_sandboxes_without_a_zygote(pool_size):
    """zviz.run_snippet's sandboxes (no zygote: the fork of a warm interpreter
    is pid 1) are pooled apart from open_sandbox's: made up to their
    supervisor, nothing running in them, each handed out once, fresh."""
    pool_size(1)
    policy = zviz.Policy.python()
    probe = ("import os, sys; print(os.getpid(), sys.flags.isolated, sorted(os.listdir('/tmp')), "
             "sorted(os.listdir('.'))); open('/tmp/mine', 'w').close(); open('left', 'w').close()")
    r = await zviz.run_snippet(probe, policy)  # a miss: its own sandbox; the pool makes one for the next
    assert r.stdout == b"2 1 [] []\n", r
    pool = _pool.current()
    assert pool is not None
    with anyio.fail_after(20):
        while not pool.ready.get((policy, False)):
            await anyio.sleep(0.01)
    ready = pool.ready[(policy, False)][0]
    assert ready._zygote is None and not pool.ready.get((policy, True))  # nothing started in it; no zygote kind
    taken = []
    for _ in range(3):
        with anyio.fail_after(20):
            while not pool.ready.get((policy, False)):
                await anyio.sleep(0.01)
        ready = pool.ready[(policy, False)][0]
        r = await zviz.run_snippet(probe, policy)
        assert r.stdout == b"2 1 [] []\n", r  # fresh: its own /tmp and workdir, pid 1 its own
        assert ready.closed and ready not in pool.ready[(policy, False)]  # handed out once, closed after
        taken.append(ready)
    assert len({id(sb) for sb in taken}) == 3


@pytest.mark.trio
async def test_a_caller_during_a_refill_takes_the_sandbox_being_made(pool_size, monkeypatch):
    """A refill no longer holds the loop while its zygote sets up (round 15):
    a caller that comes then finds nothing ready. It waits for the sandbox
    being made (it started earlier: it is up sooner than the caller's own
    would be) instead of making one; before, the refill's spawn held it."""
    pool_size(1)
    policy = zviz.Policy.python()
    pool = _pool.current()
    assert pool is not None
    real = _pool.make
    in_make = trio.Event()

    async def slow(policy, zygote=True):
        in_make.set()
        sb = await real(policy, zygote)
        await trio.sleep(0.002)  # (a refill's last moments: the caller comes in meanwhile)
        return sb

    monkeypatch.setattr(_pool, "make", slow)
    async with zviz.open_sandbox(policy) as first:  # a miss: the pool starts, and fills behind it
        assert (await first.run(["true"])).exit_code == 0
    with trio.fail_after(20):
        await in_make.wait()
    assert not pool.ready.get((policy, True)) and (policy, True) in pool.making
    made_before = pool.made
    created = []
    from zviz import _sandbox

    real_prepare = _sandbox._prepare

    def counting(*a, **kw):
        created.append(kw.get("warn"))
        return real_prepare(*a, **kw)

    monkeypatch.setattr(_sandbox, "_prepare", counting)
    async with zviz.open_sandbox(policy) as sb:
        assert pool.made == made_before + 1 and created in ([], [False])  # the pool's make, not a sandbox of its own
        assert (await sb.run(["true"])).exit_code == 0
