"""Soak and load: many sandboxes, random timeouts, cancellations and crashes,
and nothing left behind."""

import random

import pytest
import trio

import zviz

PYP = zviz.Policy.python()

PROGRAMS = [
    (["true"], "ok"),
    (["sh", "-c", "exit 3"], "ok"),
    (["sh", "-c", "kill -SEGV $$"], "ok"),  # crashes
    (["sh", "-c", "sleep 1000 & sleep 1000"], "timeout"),
    (["sh", "-c", "cat /dev/zero | head -c 300000"], "ok"),
    (["python3", "-c", "import os; os.abort()"], "ok"),
    (["sh", "-c", "yes"], "flood"),
]


@pytest.mark.trio
async def test_soak_1000_sandboxes_leave_nothing(snapshot):
    snap = snapshot()
    rng = random.Random(1234)
    counts = {"done": 0, "cancelled": 0, "timed_out": 0}
    limit = trio.CapacityLimiter(24)

    expected_cancels = 0

    async def one(i):
        nonlocal expected_cancels
        argv, kind = rng.choice(PROGRAMS)
        cancel_after = None
        if rng.random() < 0.2:  # cancelled at a random point of its life, from open to teardown
            cancel_after = rng.random() * 0.3
            argv, kind = ["sh", "-c", "sleep 1000"], "cancel"
            expected_cancels += 1
        async with limit:
            with trio.CancelScope() as cs:
                if cancel_after is not None:
                    cs.deadline = trio.current_time() + cancel_after
                async with zviz.open_sandbox(PYP) as sb:
                    r = await sb.run(argv, timeout=0.2 if kind == "timeout" else 100)
                    counts["timed_out"] += r.timed_out
                    if kind == "flood":
                        pass
                counts["done"] += 1
            if cs.cancelled_caught:
                counts["cancelled"] += 1

    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            for i in range(1000):
                n.start_soon(one, i)
    assert counts["done"] + counts["cancelled"] == 1000
    assert counts["cancelled"] == expected_cancels > 100 and counts["timed_out"] > 20
    await snap.assert_released()


@pytest.mark.trio
async def test_load_100_concurrent_sandboxes_all_correct(snapshot):
    snap = snapshot()
    results = {}

    async def one(i):
        async with zviz.open_sandbox(PYP) as sb:
            await sb.write_file("n", str(i).encode())
            r = await sb.run(["python3", "-c", "import time; time.sleep(0.2); print(int(open('n').read()) ** 2)"])
            results[i] = (r.status, r.stdout)

    with trio.fail_after(300):
        async with trio.open_nursery() as n:
            for i in range(100):
                n.start_soon(one, i)
    assert results == {i: (0, f"{i * i}\n".encode()) for i in range(100)}
    await snap.assert_released()
