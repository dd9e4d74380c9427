"""zviz.ray's SandboxPool on this machine: throughput against the same snippets
run bare and through local sandboxes, in the same run, and what Ray adds per snippet.

    .venv/bin/python benchmarks/ray_pool.py [--quick] [--json out.json]

Needs the `ray` extra; uses .venv-sandbox (scripts/setup-testvenv.sh) for HumanEval's 164
canonical solutions with their checks (else a synthetic set). Starts a local Ray
instance (num_cpus = the machine's cores) under $TMPDIR and shuts it down.

Measures (all at concurrency C = the number of cores, interleaved rounds, medians):
- bare: each snippet by a plain `python -c` subprocess of the same interpreter (no sandbox);
- local, one sandbox per snippet: Sandbox.create + run_python + aclose, no Ray: the
  snippet in one interpreter started for it (run_python's default in a sandbox with no
  template), and the same with fork=True (a template started, then forked);
- local, warm fork: one sandbox per worker, run_python per snippet (isolation of
  Python state only: what fresh_sandbox_every=N>1 gives);
- pool, one sandbox per snippet (the default) and pool with fresh_sandbox_every=50;
- Ray's per-snippet overhead: a trivial snippet, one at a time, through the pool
  (warm sandbox) against the same through a local warm sandbox (latency), and the
  throughput of trivial snippets through the pool against local warm forks.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ray
from cold import at_concurrency, humaneval_programs  # the same HumanEval jobs and runner as cold.py

import zviz
from zviz.ray import SandboxPool

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-sandbox"
HAVE_VENV = os.access(VENV / "bin" / "python", os.X_OK)
PY = str(VENV / "bin" / "python") if HAVE_VENV else "/usr/bin/python3"
POLICY = zviz.Policy.python().with_paths(read_only=[str(VENV)]) if HAVE_VENV else zviz.Policy.python()
SANDBOX_PY = PY if HAVE_VENV else "python3"


def snippets() -> tuple[str, list[str]]:
    if HAVE_VENV:
        return "HumanEval canonical + checks", humaneval_programs()
    return "synthetic", [f"import json\nprint(sum(range({i} * 1000)))\njson.dumps(list(range({i})))"
                         for i in range(164)]


async def bare(code: str) -> bool:
    r = await trio.run_process([PY, "-c", code], capture_stdout=True, capture_stderr=True, check=False)
    return r.returncode == 0


async def fresh_local(code: str) -> bool:
    sb = await zviz.Sandbox.create(POLICY)
    try:
        return (await sb.run_python(code, python=SANDBOX_PY, timeout=30)).ok
    finally:
        await sb.aclose()


async def fresh_local_template(code: str) -> bool:
    sb = await zviz.Sandbox.create(POLICY)
    try:
        return (await sb.run_python(code, python=SANDBOX_PY, timeout=30, fork=True)).ok
    finally:
        await sb.aclose()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 2
    name, jobs = snippets()
    if args.quick:
        jobs = jobs[:60]
    rounds = 1 if args.quick else 3
    out: dict[str, Any] = {"snippets": name, "count": len(jobs), "concurrency": cores, "rounds": rounds}
    times: dict[str, list[float]] = {}
    passes: dict[str, int] = {}

    def note(key: str, seconds: float, ok: int) -> None:
        times.setdefault(key, []).append(seconds)
        passes[key] = min(passes.get(key, ok), ok)

    warm_boxes = [await zviz.Sandbox.create(POLICY) for _ in range(cores)]
    free = list(warm_boxes)

    async def warm_local(code: str) -> bool:
        sb = free.pop()
        try:
            return (await sb.run_python(code, python=SANDBOX_PY, timeout=30, fork=True)).ok
        finally:
            free.append(sb)

    for sb in warm_boxes:
        await sb.run_python("pass", python=SANDBOX_PY, fork=True)
    pool = SandboxPool(POLICY, python=SANDBOX_PY, sandboxes_per_node=cores)
    pool_warm = SandboxPool(POLICY, python=SANDBOX_PY, sandboxes_per_node=cores, fresh_sandbox_every=50)
    try:
        await pool.map_python(["pass"] * cores)
        await pool_warm.map_python(["pass"] * cores)

        cpu: dict[str, list[float]] = {}  # CPU seconds per snippet: the actor's process, this caller

        async def via(p: SandboxPool, key: str) -> tuple[float, int]:
            actors = [a.info["pid"] for a in p._actors if a.info]
            a0, c0, t = sum(map(proc_cpu, actors)), time.process_time(), time.perf_counter()
            rs = await p.map_python(jobs, timeout=30)
            wall = time.perf_counter() - t
            cpu.setdefault(key + "_actor", []).append((sum(map(proc_cpu, actors)) - a0) / len(jobs))
            cpu.setdefault(key + "_caller", []).append((time.process_time() - c0) / len(jobs))
            return wall, sum(r.ok for r in rs)

        for _ in range(rounds):
            note("bare", *await at_concurrency(cores, jobs, bare))
            note("local_fresh_sandbox", *await at_concurrency(cores, jobs, fresh_local))
            note("local_fresh_sandbox_template", *await at_concurrency(cores, jobs, fresh_local_template))
            note("local_warm_fork", *await at_concurrency(cores, jobs, warm_local))
            note("pool_fresh_sandbox", *await via(pool, "pool_fresh_sandbox"))
            note("pool_fresh_every_50", *await via(pool_warm, "pool_fresh_every_50"))
        base = statistics.median(times["bare"])
        for key, ts in times.items():
            m = statistics.median(ts)
            out[key] = {"seconds": round(m, 3), "snippets_per_s": round(len(jobs) / m, 1),
                        "vs_bare": round(m / base, 2), "passed": passes[key]}

        out["cpu_ms_per_snippet"] = {k: round(statistics.median(v) * 1e3, 2) for k, v in cpu.items()}

        # Ray's per-snippet overhead: a trivial snippet, one at a time, warm sandboxes on both sides
        one = SandboxPool(POLICY, python=SANDBOX_PY, sandboxes_per_node=1, in_flight_per_actor=1,
                          fresh_sandbox_every=10**6)
        try:
            await one.map_python(["pass"])
            n = 50 if args.quick else 200
            lat_pool: list[float] = []
            lat_local: list[float] = []
            for _ in range(n):
                t = time.perf_counter()
                await one.map_python(["1"])
                lat_pool.append(time.perf_counter() - t)
                t = time.perf_counter()
                await warm_boxes[0].run_python("1", python=SANDBOX_PY, fork=True)
                lat_local.append(time.perf_counter() - t)
            out["latency_trivial_ms"] = {"pool": round(statistics.median(lat_pool) * 1e3, 2),
                                         "local_warm": round(statistics.median(lat_local) * 1e3, 2),
                                         "ray_adds": round((statistics.median(lat_pool)
                                                            - statistics.median(lat_local)) * 1e3, 2)}
        finally:
            await one.aclose()
        trivial = ["1"] * (200 if args.quick else 600)
        t_pool, _ = await via_trivial(pool_warm, trivial)
        t_local, _ = await at_concurrency(cores, trivial, warm_local)
        out["throughput_trivial_per_s"] = {"pool_warm": round(len(trivial) / t_pool, 1),
                                           "local_warm_fork": round(len(trivial) / t_local, 1),
                                           "ray_adds_ms_per_snippet_per_core":
                                               round((t_pool - t_local) / len(trivial) * cores * 1e3, 2)}
    finally:
        await pool.aclose()
        await pool_warm.aclose()
        for sb in warm_boxes:
            await sb.aclose()
    return out


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (seconds), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def via_trivial(p: SandboxPool, jobs: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    rs = await p.map_python(jobs, timeout=30)
    return time.perf_counter() - t, sum(r.ok for r in rs)


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 snippets, one round")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-")
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False)
    try:
        out = trio.run(main, args)
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    run()
