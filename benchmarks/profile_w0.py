#!/usr/bin/env python3
"""Where the time of one W0 spawn (`await sb.run(["/bin/true"])`) goes.

    .venv/bin/python benchmarks/profile_w0.py [-n N] [--cprofile-only | --phases-only | --plain]

1. plain: N runs, no instrumentation (the reference wall time per run);
2. phases: N runs with light perf_counter wrappers around the steps of
   Sandbox.run (installed by monkeypatching in this process only; zviz's code
   is not changed). Nested steps are indented; "(rest)" lines are what a
   parent spent outside the children listed;
3. cProfile: N runs, the functions with the most own time, in microseconds
   per spawn (cProfile roughly doubles the cost of Python-heavy code: read it
   for the distribution, phases for the absolute numbers).

`--plain` runs only N uninstrumented spawns (for an external sampler:
`py-spy record -r 2000 -o w0.svg -- .venv/bin/python benchmarks/profile_w0.py --plain -n 3000`).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import io
import pstats
import statistics
import time
from collections import defaultdict

import trio

import zviz
from zviz import _kernel, _plan, _process, _proxy, _records, _runner, _sandbox, _supervisor, _zygote

ACC: dict[str, list[float]] = defaultdict(list)


def _wrap(owner: object, attr: str, label: str) -> None:
    f = getattr(owner, attr)
    if inspect.iscoroutinefunction(f):
        @functools.wraps(f)
        async def aw(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return await f(*a, **k)
            finally:
                ACC[label].append(time.perf_counter() - t0)
        setattr(owner, attr, aw)
    else:
        @functools.wraps(f)
        def w(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                ACC[label].append(time.perf_counter() - t0)
        setattr(owner, attr, w)


# (owner, attribute, label, depth): the label's indentation shows nesting.
PHASES = [
    (_sandbox.Sandbox, "run", "Sandbox.run (whole call)", 0),
    (_sandbox.Sandbox, "_start", "Sandbox._start", 1),
    (_sandbox.Sandbox, "_resolve", "Sandbox._resolve (exe lookup)", 2),
    (_plan, "command_spec", "_plan.command_spec", 2),
    (_kernel, "open_devnull", "_kernel.open_devnull", 2),
    (_kernel, "pipe", "_kernel.pipe", 2),
    (_kernel, "dup_above_stdio", "_kernel.dup_above_stdio", 2),
    (_zygote, "encode_request", "_zygote.encode_request", 2),
    (_runner.Runner, "_zygote_run", "Runner._zygote_run (= spawn_s_total)", 2),
    (_zygote.Zygote, "request", "Zygote.request (send; the zygote forks; reply with the pidfd)", 3),
    (_kernel, "spawn", "_kernel.spawn (C stage: clone..exec; the zygote, once)", 2),
    (_supervisor.Supervisor, "attach", "Supervisor.attach (listener task)", 2),
    (_process.Process, "__init__", "Process.__init__", 2),
    (_proxy.FdReceiveStream, "__init__", "FdReceiveStream.__init__", 2),
    (_process, "_drive", "_process._drive (run-init forks, exec true, exit; pipes drained)", 1),
    (_process.Process, "wait", "Process.wait (child runs: init, fork, exec true, exit)", 1),
    (_process.Process, "_reap", "Process._reap", 2),
    (_kernel, "read_init_status", "_kernel.read_init_status", 3),
    (_process, "finish", "_process.finish (listener done, close)", 1),
    (_process.Process, "_close_streams", "Process._close_streams", 2),
    (_records.RunResult, "__init__", "RunResult.__init__", 1),
]


async def spawns(n: int, warmup: int = 20) -> list[float]:
    out = []
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            r = await sb.run(["/bin/true"])
            dt = time.perf_counter() - t0
            if r.exit_code != 0:
                raise SystemExit(f"/bin/true failed in the sandbox: {r}")
            if i >= warmup:
                out.append(dt)
            if i == warmup - 1:
                ACC.clear()
                spawn0 = sb.statistics().spawn_s_total
        out_spawn = (sb.statistics().spawn_s_total - spawn0) / n
    print(f"  {n} runs: median {statistics.median(out) * 1e3:.3f} ms, mean {statistics.fmean(out) * 1e3:.3f} ms; "
          f"spawn_s_total per spawn {out_spawn * 1e6:.0f} us")
    return out


async def bare(n: int) -> None:
    out = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        await trio.run_process(["/bin/true"])
        if i >= 20:
            out.append(time.perf_counter() - t0)
    print(f"  bare trio.run_process, {n} runs: median {statistics.median(out) * 1e3:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--phases-only", action="store_true")
    ap.add_argument("--cprofile-only", action="store_true")
    a = ap.parse_args()
    n = a.n
    if a.plain:
        trio.run(spawns, n)
        return
    if not a.cprofile_only:
        print("== plain")
        trio.run(bare, n)
        trio.run(spawns, n)

        print("== phases (us per spawn = total / spawns; median single call; calls per spawn)")
        for owner, attr, label, _ in PHASES:
            _wrap(owner, attr, label)
        trio.run(spawns, n)
        by_depth: list[tuple[str, int]] = [(label, d) for _, _, label, d in PHASES]
        totals = {label: sum(ACC[label]) / n * 1e6 for label, _ in by_depth}
        for i, (label, d) in enumerate(by_depth):
            xs = ACC[label]
            if not xs:
                continue
            calls = len(xs) / n
            print(f"  {'  ' * d}{label:<{62 - 2 * d}} {totals[label]:8.1f} us/spawn"
                  f"  (median call {statistics.median(xs) * 1e6:7.1f} us, {calls:.0f}x)")
            # the parent's own time outside the children listed
            kids = []
            for lab2, d2 in by_depth[i + 1:]:
                if d2 <= d:
                    break
                if d2 == d + 1:
                    kids.append(lab2)
            if kids:
                rest = totals[label] - sum(totals[k] for k in kids)
                print(f"  {'  ' * (d + 1)}{'(rest)':<{62 - 2 * (d + 1)}} {rest:8.1f} us/spawn")
        # undo (a fresh import would be cleaner; a second process is simpler)
    if not a.phases_only:
        print("== cProfile (own time, us per spawn; top 35)")
        pr = cProfile.Profile()

        async def profiled() -> None:
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                for _ in range(20):
                    await sb.run(["/bin/true"])
                pr.enable()
                for _ in range(n):
                    await sb.run(["/bin/true"])
                pr.disable()

        trio.run(profiled)
        st = pstats.Stats(pr)
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            rows.append((tt, ct, nc, f"{file.split('site-packages/')[-1].split('/work/main/')[-1]}:{line}({fn})"))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"  total profiled: {total / n * 1e6:.0f} us/spawn (with profiler overhead)")
        print(f"  {'own us':>8} {'cum us':>8} {'calls':>6}  function")
        for tt, ct, nc, name in rows[:35]:
            print(f"  {tt / n * 1e6:8.1f} {ct / n * 1e6:8.1f} {nc / n:6.1f}  {name}")
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
        with open("/tmp/zviz_w0_cprofile_cumulative.txt", "w") as f:
            f.write(s.getvalue())
        print("  (cumulative listing: /tmp/zviz_w0_cprofile_cumulative.txt)")


if __name__ == "__main__":
    main()
