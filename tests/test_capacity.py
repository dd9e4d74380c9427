"""Back-pressure and host-resource exhaustion (zviz/_capacity.py): a burst of
sandboxes under a small fd limit waits instead of failing, and what does fail
says which limit ran out; nothing is left on disk either way."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap

import anyio
import pytest
import trio

import zviz

BURST = textwrap.dedent("""
    import collections, json, os, resource, sys, trio, zviz
    nofile = int(sys.argv[1]); n = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    outcomes = collections.Counter()
    messages = []
    async def one():
        try:
            async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
                r = await sb.run(["sh", "-c", "echo ok"])
                outcomes["ok" if r.ok and r.stdout == b"ok\\n" else "wrong"] += 1
        except getattr(zviz, "ResourceExhausted", ()) as e:
            outcomes["ResourceExhausted"] += 1
            messages.append(str(e))
        except BaseException as e:
            outcomes[type(e).__name__] += 1
            messages.append(repr(e))
    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    trio.run(main)
    print(json.dumps({"outcomes": outcomes, "messages": messages[:3]}))
""")


def _burst(nofile: int, n: int, **env: str) -> tuple[dict, str]:
    tmp = tempfile.mkdtemp(prefix="burst-")
    os.chmod(tmp, 0o1777)
    try:
        out = subprocess.run([sys.executable, "-c", BURST, str(nofile), str(n)], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "TMPDIR": tmp, **env}, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        assert mode == 0o1777, f"the temp dir's mode became {mode:o}"
        left = [os.path.join(b, e) for b in os.listdir(tmp) if b.startswith("zviz-")
                for e in os.listdir(os.path.join(tmp, b))]  # workdirs, gates, marks, owner markers
        assert not left, f"{len(left)} workdirs left, e.g. {left[:3]}"
        return res, out.stderr
    finally:
        subprocess.run(["rm", "-rf", tmp], check=False)


def test_400_concurrent_sandboxes_under_ulimit_1024_all_succeed():
    """Old code (measured with this test's program): 106 ran, 294 failed with
    a bare OSError EMFILE, 280 workdirs left, the temp dir left 0700. Now
    every sandbox waits for a slot (the default bound: RLIMIT_NOFILE //
    FDS_PER_SANDBOX)."""
    res, _ = _burst(1024, 400)
    assert res["outcomes"] == {"ok": 400}, res


def test_exhaustion_past_the_bound_is_named_and_cleaned_up():
    """With the bound lifted (ZVIZ_MAX_SANDBOXES) above what the fd limit
    allows, what fails fails as ResourceExhausted naming RLIMIT_NOFILE and
    the fix, and leaves nothing behind."""
    res, _ = _burst(256, 200, ZVIZ_MAX_SANDBOXES="1000")
    outcomes = res["outcomes"]
    assert set(outcomes) <= {"ok", "ResourceExhausted"}, res
    assert outcomes.get("ResourceExhausted", 0) > 0, f"the limit was not reached: {res}"
    assert all("RLIMIT_NOFILE" in m and "ulimit -n" in m for m in res["messages"]), res["messages"]


def test_bound_makes_open_wait(monkeypatch):
    monkeypatch.setenv("ZVIZ_MAX_SANDBOXES", "2")
    order: list[str] = []

    async def holder(name: str, hold: trio.Event, entered: trio.Event):
        async with zviz.open_sandbox(zviz.Policy.shell()):
            order.append(f"{name} in")
            entered.set()
            await hold.wait()
            order.append(f"{name} out")  # (its slot is free once the block is left, maybe before this task resumes)

    async def main():
        release = [trio.Event() for _ in range(3)]
        entered = [trio.Event() for _ in range(3)]
        async with trio.open_nursery() as n:
            n.start_soon(holder, "a", release[0], entered[0])
            n.start_soon(holder, "b", release[1], entered[1])
            await entered[0].wait()
            await entered[1].wait()
            n.start_soon(holder, "c", release[2], entered[2])
            with trio.move_on_after(0.5):
                await entered[2].wait()
            assert not entered[2].is_set(), "a third sandbox opened past ZVIZ_MAX_SANDBOXES=2"
            release[0].set()
            with trio.fail_after(10):
                await entered[2].wait()
            release[1].set()
            release[2].set()

    trio.run(main)
    assert order.index("c in") > order.index("a out")


def test_bound_from_rlimit_and_env(monkeypatch):
    from zviz import _capacity

    monkeypatch.delenv("ZVIZ_MAX_SANDBOXES", raising=False)
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert _capacity.max_sandboxes() == max(1, soft // _capacity.FDS_PER_SANDBOX)
    monkeypatch.setenv("ZVIZ_MAX_SANDBOXES", "7")
    assert _capacity.max_sandboxes() == 7
    monkeypatch.setenv("ZVIZ_MAX_SANDBOXES", "zero")
    with pytest.raises(zviz.PolicyError, match="ZVIZ_MAX_SANDBOXES"):
        _capacity.max_sandboxes()


def test_cancelled_waiter_leaves_the_queue(monkeypatch):
    monkeypatch.setenv("ZVIZ_MAX_SANDBOXES", "1")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()):
            with anyio.move_on_after(0.2):
                async with zviz.open_sandbox(zviz.Policy.shell()):
                    raise AssertionError("opened past the bound")
        with anyio.fail_after(5):  # the cancelled waiter does not block the next
            async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
                assert (await sb.run(["true"])).ok

    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
