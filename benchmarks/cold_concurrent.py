#!/usr/bin/env python3
"""Fresh sandboxes at concurrency C, against the bare command at the same concurrency.

    .venv/bin/python benchmarks/cold_concurrent.py [--n 400] [--c 4] [--blocks 3]

Each block makes N fresh sandboxes (`open_sandbox(Policy.python())` +
`run(["/bin/true"])` + close), C at a time from C trio tasks of one event
loop, and runs the same N `trio.run_process(["/bin/true"])` bare at the same
concurrency; blocks alternate (bare, zviz, bare, zviz, ...). Per command: the
wall time of the block over N, and the system-wide CPU (/proc/stat) over N,
each with its ratio to bare in the same block pair. What it shows: whether
the event loop's thread, which every sandbox's set-up goes through, limits
how many sandboxes one process makes per second (round 15: a sandbox's
child no longer holds it while it sets up).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import zviz

HZ = os.sysconf("SC_CLK_TCK")


def system_cpu_ms() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) * 1000 / HZ  # all but idle and iowait


async def block(n: int, c: int, one: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await one()

    await trio.sleep(0.3)  # (what the last block left to the kernel's workers)
    s0, t0 = system_cpu_ms(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(c):
            nursery.start_soon(worker)
    wall = (time.perf_counter() - t0) * 1e3 / n
    await trio.sleep(0.3)
    return wall, (system_cpu_ms() - s0) / n


async def main(args: argparse.Namespace) -> None:
    zviz.set_pool_size(0)
    policy = zviz.Policy.python()

    async def bare() -> None:
        await trio.run_process(["/bin/true"])

    async def sandboxed() -> None:
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run(["/bin/true"])
            assert r.exit_code == 0, r

    for _ in range(20):  # warm up: the probe, the plan, the filter
        await sandboxed()
        await bare()
    rows: dict[str, list[tuple[float, float]]] = {"bare": [], "zviz": []}
    for _ in range(args.blocks):
        rows["bare"].append(await block(args.n, args.c, bare))
        rows["zviz"].append(await block(args.n, args.c, sandboxed))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.n} commands per block, concurrency {args.c}, {args.blocks} blocks; load at the end {load}")
    print(f"{'':6s} {'wall ms':>9s} {'sys cpu ms':>11s}  per block (wall/cpu)")
    for name, got in rows.items():
        walls, cpus = [w for w, _ in got], [c for _, c in got]
        blocks = "  ".join(f"{w:.2f}/{c:.2f}" for w, c in got)
        print(f"{name:6s} {statistics.median(walls):9.2f} {statistics.median(cpus):11.2f}  {blocks}")
    pairs = list(zip(rows["bare"], rows["zviz"], strict=True))
    wall_x = statistics.median(z[0] / b[0] for b, z in pairs)
    cpu_x = statistics.median(z[1] / b[1] for b, z in pairs if b[1] > 0)
    print(f"zviz per command: wall x{wall_x:.2f} of bare, system-wide CPU x{cpu_x:.2f} (medians of the block pairs)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="commands per block")
    ap.add_argument("--c", type=int, default=4, help="concurrency")
    ap.add_argument("--blocks", type=int, default=3, help="blocks per kind")
    trio.run(main, ap.parse_args())
