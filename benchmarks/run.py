#!/usr/bin/env python3
"""zviz benchmark suite: zviz, zviz + eBPF monitor and peer sandboxes against the same command run bare.

    .venv/bin/python benchmarks/run.py --peers [--quick] [--out DIR] [--no-monitor] [--no-charts]

Every measurement is interleaved A B A B ... in one run (A = the command
spawned unsandboxed with `trio.run_process` from this process, B = the same
command through `zviz.open_sandbox(zviz.Policy.python())`, or through a peer),
so drift of the machine (frequency, page cache, noisy neighbours) hits both
sides alike. Each figure is reported as a median with its spread (p10/p90),
and as a ratio or a difference to the bare median; ratios are the median of
the per-pair ratios (each pair ran back to back).

Workloads (shared/bench/README.md; every python workload runs under Debian's
/usr/bin/python3, in and out of the sandbox):

  W0  /bin/true                    spawn overhead (ms), plus the C spawn path alone
                                   (SandboxStatistics.spawn_s_total per spawn)
  W1  python3 -c 'print(1)'        interpreter start
  W2  python3 w2_agent_snippet.py  a typical agent tool call (ratio)
  W3  python3 w3_syscall_heavy.py  its own us_per_iter (ratio)
  W4  peak memory of W2            the whole process tree's summed PSS

Sections, in order (each records the 1-minute load average at its start and end):

  W0-W3, W4     zviz against bare
  monitor       zviz + eBPF monitor (open_sandbox(..., monitor=True)) against
                zviz and bare on W0-W3; "unavailable" without root/bcc
  peers         (--peers) bubblewrap, firejail, gVisor `runsc do`, sandlock
                (benchmarks/peers.py: the flags, and why) on W0-W4, each
                interleaved with its own bare runs; a peer that is not installed
                is a "not installed" row, never an error
                (sudo benchmarks/install_peers.sh installs what it can)
  throughput    W1 and W2 executions/s from one trio program at concurrency
                1, 2, 8 (, 32): bare, bare in a new session (see the note on
                sched autogroup in the report), zviz with one sandbox per task
                (and for W1, one sandbox shared by all tasks)
  scaling       a fresh child process holding 1..200 sandboxes at once (each
                with a `sleep`): the supervisor's RSS per sandbox, its CPU per
                sandbox opened, per second idle, per spawn while N are held;
                then the Python heap per sandbox by tracemalloc

How (details in the code):
- bare runs get the environment and cwd a sandboxed command gets (the
  policy's env, HOME/TMPDIR/PWD = the workdir), stdin /dev/null, stdout and
  stderr captured like `Sandbox.run` does; W2/W3 run the same file, in the
  sandbox's workdir, on both sides. W0's bare side for the target is the
  plain `trio.run_process(["/bin/true"])`; the cross-sandbox comparison uses
  the captured variant, since every sandbox there captures output;
- W4: see TreeSampler;
- the charts (benchmarks/charts.py, matplotlib) are redrawn from results.json
  by `.venv/bin/python benchmarks/charts.py`.

Results: a summary on stdout; OUT/results.md (every table), OUT/results.json
(raw samples), OUT/ratios.png, OUT/throughput.png, OUT/scaling.png (OUT
defaults to benchmarks/results/, which is git-ignored). Profile of the W0
path: benchmarks/profile_w0.py.

Nothing here fails because something is slow: the targets are reported as
met/MISSED, never asserted; a missing peer, monitor or matplotlib is
reported, not an error. The exit status is non-zero only on a real error (a
sandbox that cannot be opened, a command that fails or prints the wrong
thing under zviz or bare, a workload that cannot be found).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import trio

import zviz
from zviz._sandbox import _open_sandbox

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = "/usr/bin/python3"  # Debian's CPython, inside and outside the sandbox
WORKLOADS = ("w2_agent_snippet.py", "w3_syscall_heavy.py")
RUN_TIMEOUT = 600.0  # only a guard against a hang; slowness is never an error

# The targets this suite reports against (never asserted).
TARGETS = {
    "w0_overhead_ms": 1.0,
    "w2_ratio": 1.05,
    "w3_ratio": 1.10,
    "w4_extra_mb": 1.0,
    "supervisor_mb_per_sandbox": 1.0,
    "throughput_c8_ratio": 0.9,
}


def _children_cpu() -> float:
    """User + system CPU seconds of every reaped descendant so far. Commands
    run one at a time in the interleaved sections, so a delta is one command
    tree's CPU (zviz: zviz-init and its setup included)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class BenchError(Exception):
    """A real error: the benchmark cannot measure what it claims to."""


# ---------------------------------------------------------------- statistics


def pct(xs: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    s = sorted(xs)
    if not s:
        return math.nan
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "median": pct(xs, 50), "p10": pct(xs, 10), "p90": pct(xs, 90),
            "min": min(xs) if xs else math.nan, "max": max(xs) if xs else math.nan,
            "mean": statistics.fmean(xs) if xs else math.nan}


def spread(s: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['p10'])}, {fmt.format(s['p90'])}]"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


UNITS = {"W0": "ms", "W1": "ms", "W2": "ms", "W3": "us/iter", "W4": "MB (PSS, 1 MB = 1024 kB)"}


def _workload_value(w: str, dt: float, out: bytes) -> float:
    """The figure a workload reports (ms of wall time, or W3's own us_per_iter),
    after checking its output: a command that printed the wrong thing is an error."""
    if w == "W1" and out != b"1\n":
        raise BenchError(f"W1 printed {out[-200:]!r}")
    if w in ("W2", "W3"):
        try:
            doc = json.loads(out)
        except ValueError:
            raise BenchError(f"{w} printed no JSON: {out[-300:]!r}") from None
        if w == "W2" and doc.get("_rows") != 20_000:
            raise BenchError(f"W2 printed {doc!r}")
        if w == "W3":
            if "us_per_iter" not in doc:
                raise BenchError(f"W3 printed {doc!r}")
            return float(doc["us_per_iter"])
    return dt * 1e3


# ---------------------------------------------------------------- /proc readers


def _rollup(pid: int | str) -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in kB ({} if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(b":"):
                    out[parts[0][:-1].decode()] = int(parts[1])
    except (OSError, ValueError):
        return {}
    return out


def pss_kb(pid: int | str = "self") -> int:
    return _rollup(pid).get("Pss", 0)


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(root: int) -> list[int]:
    """Every live descendant of `root` (not root itself), by scanning /proc ppids."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # comm may hold spaces or parentheses: the fields start after the last ')'.
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


_OUR_EXE = os.path.realpath("/proc/self/exe")


def _shares_our_image(pid: int) -> bool:
    """True for a child that has not exec'd yet (fork/vfork, or zviz's CLONE_VM
    stage): it runs our executable over our memory (shared, or copy-on-write),
    which the supervisor term already counts. Counting it again would add this
    whole process's PSS to one sample (seen: +12 MB peaks). Gone or unreadable
    processes are skipped too."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == _OUR_EXE
    except OSError:
        return True


class TreeSampler:
    """Peak summed PSS of this process's tree, sampled every `interval` s by a
    thread while armed.

    Method (W4). The bare command and the sandbox are both children of this
    process: trio.run_process forks the bare python3 directly, and zviz's C
    stage clones zviz-init (pid 1 of the sandbox's pid namespace), which forks
    the sandboxed python3. A child that has not exec'd yet shares our memory
    and is skipped (_shares_our_image). zviz's supervisor is a trio task in
    the caller's process, so "the supervisor" is this benchmark process, and
    the sandbox's processes are its descendants. Each sample is

        sum(PSS of every descendant of this process)        # the command's tree
      + (PSS of this process now - PSS of it at `baseline`) # supervisor growth

    where the baseline is read (after gc) right before the sandbox is opened
    (sandboxed run), or right before the command is spawned (bare run). PSS
    splits shared pages between the processes mapping them, so the sum counts
    each page once across the tree; with the growth term, the result is what
    the whole tree costs beyond what this process cost before. The sampler
    thread is started, and its stack touched, before any baseline is read, so
    it is part of the baseline. `desc_kb` (descendants alone) is kept too.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.root = os.getpid()
        self._lock = threading.Lock()
        self._armed = False
        self._stop = False
        self._baseline = 0
        self._peak: dict = {}
        self._samples = 0
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                if self._armed:
                    self._sample()
            time.sleep(self.interval)

    def _sample(self) -> None:
        pids = [p for p in descendants(self.root) if not _shares_our_image(p)]
        desc = sum(pss_kb(p) for p in pids)
        own = pss_kb("self")
        total = desc + own - self._baseline
        self._samples += 1
        if not self._peak or total > self._peak["tree_kb"]:
            self._peak = {"tree_kb": total, "desc_kb": desc, "own_growth_kb": own - self._baseline,
                          "processes": len(pids)}

    def arm(self, baseline_kb: int) -> None:
        with self._lock:
            self._baseline = baseline_kb
            self._peak = {}
            self._samples = 0
            self._armed = True

    def disarm(self) -> dict:
        with self._lock:
            self._armed = False
            return {**self._peak, "samples": self._samples}


# ---------------------------------------------------------------- the harness


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.policy = zviz.Policy.python()
        self.results: dict = {"meta": {}, "workloads": {}, "throughput": {}, "supervisor_memory": {},
                              "monitor": None, "peers": {}, "comparison": {}, "charts": [], "targets": {},
                              "errors": []}
        self.lines: list[str] = []  # Markdown
        self.sources: dict[str, bytes] = {}
        self.bare_dir = tempfile.mkdtemp(prefix="zviz-bench-bare-")
        self.last_cpu_ms = math.nan

    # ---- setup

    def load_workloads(self) -> None:
        shared = REPO.parent / "shared" / "bench"
        where = {}
        for name in WORKLOADS:
            for base in (shared, HERE / "workloads"):
                p = base / name
                if p.is_file():
                    self.sources[name] = p.read_bytes()
                    where[name] = {"path": str(p), "sha256": hashlib.sha256(self.sources[name]).hexdigest()}
                    break
            else:
                raise BenchError(f"workload {name} not found in {shared} nor {HERE / 'workloads'}")
            (Path(self.bare_dir) / name).write_bytes(self.sources[name])
        self.results["meta"]["workloads"] = where

    def bare_env(self, workdir: str) -> dict[str, str]:
        """The environment the sandbox gives a command (zviz/_plan.py), for the bare run."""
        env = dict(self.policy.env)
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(HOME=workdir, TMPDIR=workdir, PWD=workdir)
        return env

    async def bare(self, argv: list[str], cwd: str | None = None, capture: bool = True,
                   new_session: bool = False) -> tuple[float, bytes]:
        """Run bare; returns (wall seconds, stdout)."""
        cwd = cwd or self.bare_dir
        ru0 = _children_cpu()
        t0 = time.perf_counter()
        if capture:
            p = await trio.run_process(argv, cwd=cwd, env=self.bare_env(cwd), stdin=subprocess.DEVNULL,
                                       capture_stdout=True, capture_stderr=True, check=False,
                                       start_new_session=new_session)
        else:
            p = await trio.run_process(argv, check=False)
        dt = time.perf_counter() - t0
        self.last_cpu_ms = (_children_cpu() - ru0) * 1e3
        if p.returncode != 0:
            raise BenchError(f"bare {argv} exited {p.returncode}: {(p.stderr or b'')[-500:]!r}")
        return dt, p.stdout or b""

    async def sandboxed(self, sb: zviz.Sandbox, argv: list[str]) -> tuple[float, bytes]:
        ru0 = _children_cpu()
        t0 = time.perf_counter()
        r = await sb.run(argv, timeout=RUN_TIMEOUT)
        dt = time.perf_counter() - t0
        # One full spawn per command: zviz-init (our child) reaps the command,
        # so its CPU lands in our RUSAGE_CHILDREN with init's own. With the
        # zygote the command is a grandchild of a process we reap only at
        # close: its CPU is the figure zviz-init reports (the program's tree;
        # the zygote's fork of a 10 kB process is not in it).
        if sb._zygote is not None:
            self.last_cpu_ms = r.cpu_s * 1e3
        else:
            self.last_cpu_ms = (_children_cpu() - ru0) * 1e3
        if not r.ok:
            raise BenchError(f"zviz {argv} failed: status {r.status} limit={r.limit} "
                             f"denials={dict(r.denials)} stderr={r.stderr[-500:]!r}")
        return dt, r.stdout

    async def open_sb(self, stack: contextlib.AsyncExitStack, **kw: object) -> zviz.Sandbox:
        sb = await stack.enter_async_context(_open_sandbox(self.policy, **kw))
        for name, data in self.sources.items():
            await sb.write_file(name, data)
        return sb

    @staticmethod
    async def interleave(n: int, warmup: int, contenders: dict) -> dict[str, list]:
        """Call each contender in turn, A B A B ..., `warmup` rounds discarded."""
        out: dict[str, list] = {k: [] for k in contenders}
        for i in range(warmup + n):
            for name, fn in contenders.items():
                v = await fn()
                if i >= warmup:
                    out[name].append(v)
        return out

    # ---- W0..W3

    async def w0_w3(self) -> None:
        q = self.quick
        async with contextlib.AsyncExitStack() as stack:
            sb = await self.open_sb(stack)
            full = await self.open_sb(stack, zygote=False)  # info: one full spawn per command
            wd = sb.workdir

            # W0: the brief's bare baseline is the plain trio.run_process; a
            # captured variant (sb.run always captures stdout/stderr through
            # pipes) is reported alongside, for information.
            n0 = 60 if q else 300
            await self.interleave(0, 10, {"a": lambda: self.bare(["/bin/true"], capture=False),
                                          "b": lambda: self.sandboxed(sb, ["/bin/true"])})
            spawn_ms: list[float] = []
            last_spawn_s = [sb.statistics().spawn_s_total]

            async def zviz_true() -> tuple[float, bytes]:
                # (statistics() is read outside the timed call: it costs
                # ~2 us per run the sandbox has made so far)
                res = await self.sandboxed(sb, ["/bin/true"])
                cpu = self.last_cpu_ms
                now = sb.statistics().spawn_s_total
                spawn_ms.append((now - last_spawn_s[0]) * 1e3)
                last_spawn_s[0] = now
                return (*res, cpu)

            async def with_cpu(fn):  # type: ignore[no-untyped-def]
                return (*(await fn()), self.last_cpu_ms)

            st0 = sb.statistics()
            raw = await self.interleave(n0, 0, {
                "bare": lambda: with_cpu(lambda: self.bare(["/bin/true"], capture=False)),
                "zviz": zviz_true,
                "bare_captured": lambda: with_cpu(lambda: self.bare(["/bin/true"], cwd=wd)),
                "zviz_full_spawn": lambda: with_cpu(lambda: self.sandboxed(full, ["/bin/true"])),
            })
            st1 = sb.statistics()
            spawns = st1.processes_started - st0.processes_started
            w0 = {k: [v[0] * 1e3 for v in vs] for k, vs in raw.items()}
            cpu = {k: [v[2] for v in vs] for k, vs in raw.items()}
            self.results["workloads"]["W0"] = {
                "unit": "ms", "samples": w0, "summary": {k: summary(v) for k, v in w0.items()},
                "cpu_ms": {"samples": cpu, "summary": {k: summary(v) for k, v in cpu.items()}},
                "spawn_path_ms_per_spawn": (st1.spawn_s_total - st0.spawn_s_total) / spawns * 1e3,
                "spawn_path_ms": {"samples": spawn_ms, "summary": summary(spawn_ms)},
                "spawns": spawns,
            }
            print(f"W0 done ({n0} rounds)", flush=True)

            # W1
            n1 = 20 if q else 60
            w1cmd = [PY, "-c", "print(1)"]

            async def check1(fn):  # type: ignore[no-untyped-def]
                dt, out = await fn()
                if out != b"1\n":
                    raise BenchError(f"W1 printed {out!r}")
                return dt * 1e3, self.last_cpu_ms

            raw = await self.interleave(n1, 3, {"bare": lambda: check1(lambda: self.bare(w1cmd, cwd=wd)),
                                                "zviz": lambda: check1(lambda: self.sandboxed(sb, w1cmd))})
            wall = {k: [v[0] for v in vs] for k, vs in raw.items()}
            cpu = {k: [v[1] for v in vs] for k, vs in raw.items()}
            self.results["workloads"]["W1"] = {
                "unit": "ms", "samples": wall, "summary": {k: summary(v) for k, v in wall.items()},
                "cpu_ms": {"samples": cpu, "summary": {k: summary(v) for k, v in cpu.items()}},
            }
            print(f"W1 done ({n1} rounds)", flush=True)

            # W2 (the same file, in the sandbox's workdir, for both)
            n2 = 8 if q else 25
            w2cmd = [PY, "w2_agent_snippet.py"]  # relative: the cwd is the workdir on both sides (/workspace inside)

            async def run2(fn):  # type: ignore[no-untyped-def]
                dt, out = await fn()
                try:
                    doc = json.loads(out)
                except ValueError:
                    raise BenchError(f"W2 printed no JSON: {out[-300:]!r}") from None
                if doc.get("_rows") != 20_000:
                    raise BenchError(f"W2 printed {doc!r}")
                return dt * 1e3, doc["_compute_ms"], self.last_cpu_ms

            raw = await self.interleave(n2, 2, {"bare": lambda: run2(lambda: self.bare(w2cmd, cwd=wd)),
                                                "zviz": lambda: run2(lambda: self.sandboxed(sb, w2cmd))})
            wall = {k: [v[0] for v in vs] for k, vs in raw.items()}
            comp = {k: [v[1] for v in vs] for k, vs in raw.items()}
            cpu = {k: [v[2] for v in vs] for k, vs in raw.items()}
            self.results["workloads"]["W2"] = {
                "unit": "ms", "samples": wall, "summary": {k: summary(v) for k, v in wall.items()},
                "compute_ms": {"samples": comp, "summary": {k: summary(v) for k, v in comp.items()}},
                "cpu_ms": {"samples": cpu, "summary": {k: summary(v) for k, v in cpu.items()},
                           "pair_ratios": summary([z / b for b, z in zip(cpu["bare"], cpu["zviz"]) if b > 0])},
                "pair_ratios": summary([z / b for b, z in zip(wall["bare"], wall["zviz"])]),
            }
            print(f"W2 done ({n2} rounds)", flush=True)

            # W3
            n3 = 7 if q else 20
            w3cmd = [PY, "w3_syscall_heavy.py"]

            async def run3(fn):  # type: ignore[no-untyped-def]
                dt, out = await fn()
                try:
                    doc = json.loads(out)
                    return doc["us_per_iter"], dt * 1e3
                except (ValueError, KeyError):
                    raise BenchError(f"W3 printed {out[-300:]!r}") from None

            raw = await self.interleave(n3, 2, {"bare": lambda: run3(lambda: self.bare(w3cmd, cwd=wd)),
                                                "zviz": lambda: run3(lambda: self.sandboxed(sb, w3cmd))})
            us = {k: [v[0] for v in vs] for k, vs in raw.items()}
            wall = {k: [v[1] for v in vs] for k, vs in raw.items()}
            self.results["workloads"]["W3"] = {
                "unit": "us/iter", "samples": us, "summary": {k: summary(v) for k, v in us.items()},
                "wall_ms": {"samples": wall, "summary": {k: summary(v) for k, v in wall.items()}},
                "pair_ratios": summary([z / b for b, z in zip(us["bare"], us["zviz"])]),
            }
            stats = sb.statistics()
            self.results["workloads"]["sandbox_statistics"] = {
                "processes_started": stats.processes_started, "notifications": stats.notifications,
                "denials": dict(stats.denials), "degraded": list(stats.degraded),
                "spawn_s_total": stats.spawn_s_total,
            }
            print(f"W3 done ({n3} rounds)", flush=True)

    # ---- W4

    async def w4(self) -> None:
        n = 3 if self.quick else 8
        w2 = self.sources["w2_agent_snippet.py"]
        with TreeSampler() as sampler:
            await trio.sleep(0.05)  # the sampler thread is up (and in every baseline)

            async def bare_rep() -> dict:
                gc.collect()
                base = pss_kb()
                sampler.arm(base)
                await self.bare([PY, os.path.join(self.bare_dir, "w2_agent_snippet.py")])
                await trio.sleep(0)
                return sampler.disarm()

            async def zviz_rep() -> dict:
                gc.collect()
                base = pss_kb()  # before the sandbox is opened
                async with zviz.open_sandbox(self.policy) as sb:
                    await sb.write_file("w2_agent_snippet.py", w2)
                    sampler.arm(base)
                    await self.sandboxed(sb, [PY, os.path.join(sb.workspace, "w2_agent_snippet.py")])
                    return sampler.disarm()

            raw = await self.interleave(n, 1, {"bare": bare_rep, "zviz": zviz_rep})
        tree = {k: [v["tree_kb"] / 1024 for v in vs] for k, vs in raw.items()}
        desc = {k: [v["desc_kb"] / 1024 for v in vs] for k, vs in raw.items()}
        self.results["workloads"]["W4"] = {
            "unit": "MB (PSS, 1 MB = 1024 kB)", "samples": tree, "summary": {k: summary(v) for k, v in tree.items()},
            "descendants_only": {"samples": desc, "summary": {k: summary(v) for k, v in desc.items()}},
            "peaks": raw,
        }
        print(f"W4 done ({n} rounds)", flush=True)

    # ---- throughput

    async def throughput(self) -> None:
        """W1 and W2 executions per second from this one trio program, at
        concurrency 1, 2, 8 (, 32): c worker tasks loop over the command until
        a time slice ends (runs in flight are finished and counted; the rate is
        runs / elapsed). Contenders, interleaved round by round: bare
        (trio.run_process), zviz with one sandbox per task, and for W1 also
        bare in a new session and zviz with one sandbox shared by all tasks."""
        levels = [1, 2, 8] if self.quick else [1, 2, 8, 32]
        w1cmd = [PY, "-c", "print(1)"]
        w2cmd = [PY, "w2_agent_snippet.py"]  # relative: cwd is the bare dir / the sandbox's workdir

        def check1(out: bytes) -> None:
            if out != b"1\n":
                raise BenchError(f"W1 printed {out!r}")

        def check2(out: bytes) -> None:
            try:
                ok = json.loads(out).get("_rows") == 20_000
            except ValueError:
                ok = False
            if not ok:
                raise BenchError(f"W2 printed {out[-300:]!r}")

        async def batch(runners: list, duration: float, check) -> float:  # type: ignore[no-untyped-def]
            done = 0
            deadline = time.perf_counter() + duration

            async def worker(run) -> None:  # type: ignore[no-untyped-def]
                nonlocal done
                while time.perf_counter() < deadline:
                    _dt, out = await run()
                    check(out)
                    done += 1

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for r in runners:
                    nursery.start_soon(worker, r)
            return done / (time.perf_counter() - t0)

        plans = {
            # workload: (command, check, rounds, slice seconds, with the W1-only contenders)
            "W1": (w1cmd, check1, 3 if self.quick else 5, 0.5 if self.quick else 1.0, True),
            "W2": (w2cmd, check2, 2 if self.quick else 3, 1.0 if self.quick else 2.0, False),
        }
        for wl, (cmd, check, rounds, duration, extra) in plans.items():
            out = self.results["throughput"].setdefault(wl, {})
            for c in levels:
                async with contextlib.AsyncExitStack() as stack:
                    per_worker = [await self.open_sb(stack) for _ in range(c)]
                    contenders = {
                        "bare": lambda: batch([lambda: self.bare(cmd)] * c, duration, check),
                        "zviz": lambda: batch([(lambda sb=sb: self.sandboxed(sb, cmd)) for sb in per_worker],
                                              duration, check),
                        # zviz's stage calls setsid(): with sched autogroup on, each
                        # sandboxed command is its own CPU-fairness group. Under load
                        # from other sessions that is an advantage bare children
                        # (in our session) do not get; this contender shows it.
                        "bare_setsid": lambda: batch([lambda: self.bare(cmd, new_session=True)] * c,
                                                     duration, check),
                    }
                    if extra:
                        shared = await self.open_sb(stack)
                        contenders["zviz_shared"] = lambda: batch([lambda: self.sandboxed(shared, cmd)] * c,
                                                                  duration, check)
                    raw = await self.interleave(rounds, 1, contenders)
                out[str(c)] = {"unit": "executions/s", "samples": raw, "summary": {k: summary(v) for k, v in raw.items()},
                               "pair_ratios": summary([z / b for b, z in zip(raw["bare"], raw["zviz"]) if b > 0]),
                               "pair_ratios_vs_setsid": summary([z / b for b, z in zip(raw["bare_setsid"], raw["zviz"])
                                                                 if b > 0]),
                               "slice_s": duration, "loadavg_1min": os.getloadavg()[0]}
                print(f"throughput {wl} c={c} done", flush=True)

    # ---- supervisor memory per sandbox

    async def supervisor_memory(self) -> None:
        """Run in a fresh process (this one's heap has been through every other
        section: freed arenas would absorb the first sandboxes and read as 0)."""
        argv = [sys.executable, str(Path(__file__).resolve()), "--_child", "supervisor-memory"]
        if self.quick:
            argv.append("--quick")
        p = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                   stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise BenchError(f"supervisor-memory child exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
        self.results["supervisor_memory"] = json.loads(p.stdout)
        for row in self.results["supervisor_memory"]["rows"]:
            print(f"supervisor memory N={row['sandboxes']} done", flush=True)

    # ---- monitor (optional)

    async def monitor(self) -> None:
        """zviz with the eBPF monitor attached. The monitor's tracepoints fire
        for every system call on the host while it is loaded (docs/monitoring.md),
        so bare runs made while it is loaded pay too. Hence three phases, each
        interleaving its contenders round by round: A without a monitor (bare,
        zviz), B with a sandbox open with monitor=True (bare, zviz, zviz +
        monitor), C without again (bare, zviz). The monitor row compares B's
        zviz + monitor with the mean of A's and C's bare of the same round
        index (A B A design against drift); B's own bare gives the host-wide tax."""
        try:
            async with zviz.open_sandbox(self.policy, monitor=True) as sb:
                r = await sb.run(["/bin/true"], timeout=RUN_TIMEOUT)
                if not r.ok:
                    raise BenchError(f"/bin/true under the monitor: status {r.status} {r.stderr[-300:]!r}")
        except Exception as e:  # noqa: BLE001 - the monitor needs root, bcc, a kernel build tree: reported, not fatal
            reason = f"{type(e).__name__}: {e}".strip()
            print(f"monitor: unavailable ({reason})", flush=True)
            self.results["monitor"] = {"available": False, "reason": reason}
            return
        n = {"W0": 30, "W1": 6, "W2": 3, "W3": 3} if self.quick else {"W0": 80, "W1": 15, "W2": 6, "W3": 6}
        res: dict = {"available": True}
        raw: dict[str, dict[str, list]] = {w: {} for w in n}

        async def phase(tag: str, sb: zviz.Sandbox, mon: zviz.Sandbox | None) -> None:
            wd = sb.workdir
            for w in n:
                cmd = {"W0": ["/bin/true"], "W1": [PY, "-c", "print(1)"],
                       "W2": [PY, "w2_agent_snippet.py"], "W3": [PY, "w3_syscall_heavy.py"]}[w]

                async def bare(cmd=cmd, w=w) -> float:  # type: ignore[no-untyped-def]
                    return _workload_value(w, *(await self.bare(cmd, cwd=wd)))

                async def plain(cmd=cmd, w=w) -> float:  # type: ignore[no-untyped-def]
                    return _workload_value(w, *(await self.sandboxed(sb, cmd)))

                contenders = {f"bare_{tag}": bare, f"zviz_{tag}": plain}
                if mon is not None:
                    async def monitored(cmd=cmd, w=w) -> float:  # type: ignore[no-untyped-def]
                        return _workload_value(w, *(await self.sandboxed(mon, cmd)))

                    contenders["zviz_monitor"] = monitored
                got = await self.interleave(n[w], 2 if w != "W0" else 5, contenders)
                raw[w].update(got)
            print(f"monitor phase {tag} done", flush=True)

        async with contextlib.AsyncExitStack() as stack:
            sb = await self.open_sb(stack)
            await phase("A", sb, None)
            async with contextlib.AsyncExitStack() as mstack:
                t0 = time.perf_counter()
                mon = await self.open_sb(mstack, monitor=True)
                res["open_with_monitor_s"] = time.perf_counter() - t0
                await phase("B", sb, mon)
                st = mon.statistics()
                res["statistics"] = {"processes_started": st.processes_started,
                                     "syscalls_top": dict(sorted((st.syscalls or {}).items(),
                                                                 key=lambda kv: -kv[1])[:10])}
            await phase("C", sb, None)
        for w, d in raw.items():
            # bare without a monitor, per round: the mean of phase A's and C's
            d["bare"] = [(a + c) / 2 for a, c in zip(d["bare_A"], d["bare_C"])]
            d["zviz"] = [(a + c) / 2 for a, c in zip(d["zviz_A"], d["zviz_C"])]
            res[w] = {"unit": UNITS[w], "samples": d, "summary": {k: summary(v) for k, v in d.items()},
                      "pair_ratios": summary([m / b for b, m in zip(d["bare"], d["zviz_monitor"]) if b > 0]),
                      "pair_ratios_vs_zviz": summary([m / z for z, m in zip(d["zviz_B"], d["zviz_monitor"]) if z > 0]),
                      "host_tax": summary([b / a for a, b in zip(d["bare"], d["bare_B"]) if a > 0])}
        self.results["monitor"] = res

    # ---- peers (optional)

    async def peers(self) -> None:
        """Each peer of benchmarks/peers.py that is installed runs W0-W3 (and
        W4) interleaved with the same command bare, in its own workdir."""
        sys.path.insert(0, str(HERE))
        import peers as peers_mod  # benchmarks/peers.py

        n = ({"W0": 10, "W1": 5, "W2": 3, "W3": 2, "W4": 2} if self.quick
             else {"W0": 40, "W1": 15, "W2": 8, "W3": 4, "W4": 3})
        cmds = {"W0": ["/bin/true"], "W1": [PY, "-c", "print(1)"],
                "W2": [PY, "w2_agent_snippet.py"], "W3": [PY, "w3_syscall_heavy.py"]}
        out = self.results["peers"]
        for peer in peers_mod.all_peers():
            peer.probe()
            entry = out[peer.key] = {"name": peer.name, "short": peer.short_label(), "version": peer.version,
                                     "flags": peer.flags,
                                     "installed": peer.installed, "reason": peer.reason, "extra": peer.extra}
            if peer.reason is not None:
                print(f"peer {peer.key}: {peer.reason}", flush=True)
                continue
            wd = tempfile.mkdtemp(prefix=f"zviz-bench-{peer.key}-")
            os.chmod(wd, 0o755)
            for name, data in self.sources.items():
                (Path(wd) / name).write_bytes(data)
            env = self.bare_env(wd)
            t_peer = time.perf_counter()
            try:
                try:
                    await peer.run(["/bin/true"], wd, env)
                except peers_mod.PeerFailed as e:
                    entry["reason"] = f"does not run here: {e}"
                    print(f"peer {peer.key}: {entry['reason']}", flush=True)
                    continue
                for w, cmd in cmds.items():
                    async def bare(cmd=cmd, w=w) -> float:  # type: ignore[no-untyped-def]
                        return _workload_value(w, *(await self.bare(cmd, cwd=wd)))

                    async def wrapped(cmd=cmd, w=w) -> float:  # type: ignore[no-untyped-def]
                        r = await peer.run(cmd, wd, env)
                        try:
                            return _workload_value(w, r.wall_s, r.stdout)
                        except BenchError as e:  # the peer's failure, not the suite's
                            raise peers_mod.PeerFailed(f"{peer.key}: {e}") from None

                    raw = await self.interleave(n[w], 1 if w in ("W2", "W3") else 3, {"bare": bare, "sandbox": wrapped})
                    entry[w] = {"unit": UNITS[w], "samples": raw, "summary": {k: summary(v) for k, v in raw.items()},
                                "pair_ratios": summary([z / b for b, z in zip(raw["bare"], raw["sandbox"]) if b > 0])}
                    print(f"peer {peer.key} {w} done ({n[w]} rounds)", flush=True)

                # W4: peak tree PSS of W2 under the peer, as in self.w4
                async def w4_bare() -> None:
                    await self.bare(cmds["W2"], cwd=wd)

                async def w4_peer() -> None:
                    await peer.run(cmds["W2"], wd, env)

                raw4 = await self._tree_peaks(n["W4"], {"bare": w4_bare, "sandbox": w4_peer})
                tree = {k: [v["tree_kb"] / 1024 for v in vs] for k, vs in raw4.items()}
                entry["W4"] = {"unit": UNITS["W4"], "samples": tree, "summary": {k: summary(v) for k, v in tree.items()},
                               "peaks": raw4}
                print(f"peer {peer.key} W4 done ({n['W4']} rounds)", flush=True)
            except peers_mod.PeerFailed as e:
                entry["failed"] = str(e)
                print(f"peer {peer.key} failed: {e}", flush=True)
            finally:
                entry["elapsed_s"] = round(time.perf_counter() - t_peer, 1)
                peer.close()
                shutil.rmtree(wd, ignore_errors=True)

    async def _tree_peaks(self, n: int, contenders: dict) -> dict[str, list]:
        """Peak tree PSS (TreeSampler) of each contender's run, interleaved, one warm-up round."""
        with TreeSampler() as sampler:
            await trio.sleep(0.05)

            def measured(fn):  # type: ignore[no-untyped-def]
                async def rep() -> dict:
                    gc.collect()
                    sampler.arm(pss_kb())
                    await fn()
                    await trio.sleep(0)
                    return sampler.disarm()
                return rep

            return await self.interleave(n, 1, {k: measured(fn) for k, fn in contenders.items()})

    # ---- the comparison across sandboxes (zviz, zviz + monitor, peers)

    def compare(self) -> dict:
        """One row per sandbox, each against the bare command measured
        interleaved with it in the same run: per workload the medians, the
        median of the per-pair ratios with its p10/p90, the ratio of the
        medians and the difference. W0's bare side is the captured spawn
        (stdout/stderr through pipes, as every sandbox here captures them)."""
        R = self.results
        W = R["workloads"]

        def cell(bare: list[float], box: list[float]) -> dict | None:
            if not bare or not box:
                return None
            pr = [z / b for b, z in zip(bare, box) if b > 0]
            mb, mz = pct(bare, 50), pct(box, 50)
            return {"bare": mb, "box": mz, "diff": mz - mb, "ratio": pct(pr, 50), "p10": pct(pr, 10),
                    "p90": pct(pr, 90), "ratio_of_medians": ratio(mz, mb), "n": len(pr)}

        rows = []
        z: dict = {"key": "zviz", "label": "zviz `Policy.python()`", "short": "zviz", "status": "ok"}
        if "W0" in W:
            z["W0"] = cell(W["W0"]["samples"]["bare_captured"], W["W0"]["samples"]["zviz"])
        for w in ("W1", "W2", "W3", "W4"):
            if w in W:
                z[w] = cell(W[w]["samples"]["bare"], W[w]["samples"]["zviz"])
        rows.append(z)
        mon = R["monitor"]
        if mon is not None:
            m: dict = {"key": "zviz_monitor", "label": "zviz + eBPF monitor", "short": "zviz + monitor"}
            if mon.get("available"):
                m["status"] = "ok"
                tax: dict = {"key": "bare_monitor_loaded", "short": "bare, monitor loaded",
                             "label": "(info) bare, while a monitor is loaded", "status": "ok"}
                for w in ("W0", "W1", "W2", "W3"):
                    if w in mon:
                        m[w] = cell(mon[w]["samples"]["bare"], mon[w]["samples"]["zviz_monitor"])
                        tax[w] = cell(mon[w]["samples"]["bare"], mon[w]["samples"]["bare_B"])
                rows.append(m)
                rows.append(tax)
            else:
                m["status"] = f"unavailable: {mon.get('reason')}"
                rows.append(m)
        for key, e in R["peers"].items():
            version = "" if e["version"] in ("?", "") else e["version"]
            r: dict = {"key": key, "label": f"{e['name']} {version}".strip(), "short": e.get("short", key)}
            if not e["installed"]:
                r["status"] = "not installed"
                r["reason"] = e["reason"]
            elif e.get("reason"):
                r["status"] = "not run"
                r["reason"] = e["reason"]
            else:
                r["status"] = "failed" if e.get("failed") else "ok"
                if e.get("failed"):
                    r["reason"] = e["failed"]
                for w in ("W0", "W1", "W2", "W3", "W4"):
                    if w in e:
                        r[w] = cell(e[w]["samples"]["bare"], e[w]["samples"]["sandbox"])
            rows.append(r)
        R["comparison"] = {"rows": rows}
        return R["comparison"]

    def comparison_md(self) -> list[str]:
        rows = self.results["comparison"].get("rows", [])
        if not rows:
            return []
        md = ["## All sandboxes against the bare command\n",
              "Each row against the bare command run interleaved with it (A B A B) in the same run. Ratios: "
              "median of the per-pair ratios sandboxed/bare, [p10, p90] of those ratios. W0 overhead: "
              "difference of the medians (bare captured through pipes, as every sandbox here captures). "
              "W3: the script's own us_per_iter. W4: peak summed PSS of the whole tree (supervisor growth "
              "included) while W2 runs, difference of the medians.\n",
              "| sandbox | W0 `/bin/true` overhead | W0 x bare | W1 `print(1)` x bare | W2 agent snippet x bare | "
              "W3 us/iter x bare | W4 tree PSS vs bare |",
              "|---|---|---|---|---|---|---|"]

        def rfmt(c: dict | None) -> str:
            return "-" if not c else f"x{c['ratio']:.2f} [{c['p10']:.2f}, {c['p90']:.2f}]"

        for r in rows:
            if r["status"] != "ok" and not any(r.get(w) for w in ("W0", "W1", "W2", "W3", "W4")):
                md.append(f"| {r['label']} | {r['status']} | | | | | |")
                continue
            w0, w4 = r.get("W0"), r.get("W4")
            over = "-" if not w0 else "{:+.2f} ms".format(w0["diff"])
            mem = "-" if not w4 else "{:+.2f} MB (x{:.2f})".format(w4["diff"], w4["ratio"])
            status = "" if r["status"] == "ok" else f" ({r['status']})"
            md.append(f"| {r['label']}{status} | {over} | {rfmt(w0)} | {rfmt(r.get('W1'))} | {rfmt(r.get('W2'))} | "
                      f"{rfmt(r.get('W3'))} | {mem} |")
        md.append("")
        md.append("Absolute medians, bare → sandboxed (each row's own bare runs):\n")
        md.append("| sandbox | W0 ms | W1 ms | W2 ms | W3 us/iter | W4 MB |")
        md.append("|---|---|---|---|---|---|")
        fmts = {"W0": "{:.2f}", "W1": "{:.1f}", "W2": "{:.0f}", "W3": "{:.1f}", "W4": "{:.1f}"}
        for r in rows:
            cells = []
            for w, f in fmts.items():
                c = r.get(w)
                cells.append("-" if not c else f"{f.format(c['bare'])} → {f.format(c['box'])}")
            md.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        md.append("")
        notes = [r for r in rows if r.get("reason")]
        for r in notes:
            md.append(f"- {r['label']}: {r['status']}: {r['reason']}")
        if notes:
            md.append("")
        peers = self.results["peers"]
        if peers:
            md.append("How each peer was run (benchmarks/peers.py):\n")
            for k, e in peers.items():
                installed = "" if e["installed"] and not e.get("reason") else " (not run here)"
                md.append(f"- {e['name']}{installed}: `{e['flags']}`")
            md.append("")
        return md

    # ---- report

    def report(self) -> str:
        R = self.results
        W = R["workloads"]
        T = R["targets"]
        md: list[str] = []
        m = R["meta"]
        md.append(f"# zviz benchmarks ({'quick' if self.quick else 'full'})\n")
        md.append(f"{m.get('when')} · host {m.get('host')} · kernel {m.get('kernel')} · {m.get('cpus')} CPUs · "
                  f"zviz {m.get('zviz')} ({m.get('git')}, sources {m.get('zviz_sources_sha256')}) · runner Python {m.get('python')} · "
                  f"commands run by {PY} · policy `Policy.python()`\n")
        md.append("Medians with [p10, p90]; A B A B interleaved in one run; bare = `trio.run_process` "
                  "from the same process.\n")
        la = m.get("loadavg_1min", {})
        if la:
            secs = m.get("section_s", {})
            md.append("1-min load average at the start/end of each section, and its duration (the CPUs may be "
                      "shared with other work): " + ", ".join(
                          f"{k} {'/'.join(f'{x:.2f}' for x in v)} ({secs.get(k, math.nan):.0f} s)"
                          for k, v in la.items()) + ".\n")

        def met(ok: bool | None) -> str:
            return "-" if ok is None else ("met" if ok else "**MISSED**")

        md.extend(self.comparison_md())
        if R["charts"]:
            md.append("Charts: " + ", ".join(f"[{Path(c).name}]({Path(c).name})" for c in R["charts"]) + ".\n")
        elif R.get("charts_error"):
            md.append(f"Charts: not written ({R['charts_error']}).\n")

        md.append("## zviz in detail: latency and memory\n")
        md.append("| workload | unit | bare | zviz | zviz / bare | zviz - bare | target | |")
        md.append("|---|---|---|---|---|---|---|---|")
        if "W0" in W:
            s = W["W0"]["summary"]
            over = s["zviz"]["median"] - s["bare"]["median"]
            T["w0_overhead_ms"] = {"value": over, "target": f"<= {TARGETS['w0_overhead_ms']} ms",
                                   "met": over <= TARGETS["w0_overhead_ms"]}
            md.append(f"| W0 `/bin/true` | ms | {spread(s['bare'], '{:.3f}')} | {spread(s['zviz'], '{:.3f}')} | "
                      f"x{ratio(s['zviz']['median'], s['bare']['median']):.2f} | {over:+.3f} ms | "
                      f"overhead <= 1 ms | {met(T['w0_overhead_ms']['met'])} |")
            over_c = s["zviz"]["median"] - s["bare_captured"]["median"]
            md.append(f"| W0 vs bare with stdout/stderr captured (info) | ms | {spread(s['bare_captured'], '{:.3f}')} | "
                      f"{spread(s['zviz'], '{:.3f}')} | x{ratio(s['zviz']['median'], s['bare_captured']['median']):.2f} | "
                      f"{over_c:+.3f} ms | | |")
            if "zviz_full_spawn" in s:
                md.append(f"| W0 zviz without the zygote: namespaces, root, Landlock and filter per command (info) | ms | "
                          f"{spread(s['bare'], '{:.3f}')} | {spread(s['zviz_full_spawn'], '{:.3f}')} | "
                          f"x{ratio(s['zviz_full_spawn']['median'], s['bare']['median']):.2f} | "
                          f"{s['zviz_full_spawn']['median'] - s['bare']['median']:+.3f} ms | | |")
            c = W["W0"]["cpu_ms"]["summary"]
            md.append(f"| W0 CPU of the command tree, user+sys (info; zviz: the program's, as zviz-init reports it) | ms | "
                      f"{spread(c['bare'], '{:.3f}')} | {spread(c['zviz'], '{:.3f}')} | "
                      f"x{ratio(c['zviz']['median'], c['bare']['median']):.2f} | "
                      f"{c['zviz']['median'] - c['bare']['median']:+.3f} ms | | |")
            sp = W["W0"]["spawn_path_ms"]["summary"]
            md.append(f"| W0 spawn path alone (`spawn_s_total` per spawn: the zygote's request and reply) | ms | | "
                      f"{spread(sp, '{:.3f}')} (mean {W['W0']['spawn_path_ms_per_spawn']:.3f}) | | "
                      f"{sp['median'] / s['zviz']['median'] * 100:.0f}% of zviz | | |")
        if "W1" in W:
            s = W["W1"]["summary"]
            md.append(f"| W1 `python3 -c 'print(1)'` | ms | {spread(s['bare'])} | {spread(s['zviz'])} | "
                      f"x{ratio(s['zviz']['median'], s['bare']['median']):.3f} | "
                      f"{s['zviz']['median'] - s['bare']['median']:+.2f} ms | | |")
            c = W["W1"]["cpu_ms"]["summary"]
            md.append(f"| W1 CPU of the command tree, user+sys (info) | ms | {spread(c['bare'])} | {spread(c['zviz'])} | "
                      f"x{ratio(c['zviz']['median'], c['bare']['median']):.3f} | "
                      f"{c['zviz']['median'] - c['bare']['median']:+.2f} ms | | |")
        if "W2" in W:
            s = W["W2"]["summary"]
            r = ratio(s["zviz"]["median"], s["bare"]["median"])
            pr = W["W2"]["pair_ratios"]
            # The verdict reads the median of the per-pair ratios (each A/B pair
            # ran back to back, so load drift over the run cancels out).
            T["w2_ratio"] = {"value": pr["median"], "target": f"<= {TARGETS['w2_ratio']}",
                             "met": pr["median"] <= TARGETS["w2_ratio"], "ratio_of_medians": r}
            md.append(f"| W2 agent snippet | ms | {spread(s['bare'], '{:.1f}')} | {spread(s['zviz'], '{:.1f}')} | "
                      f"x{r:.3f} (pairs {spread(pr, '{:.3f}')}) | {s['zviz']['median'] - s['bare']['median']:+.1f} ms | "
                      f"<= x1.05 | {met(T['w2_ratio']['met'])} |")
            c = W["W2"]["compute_ms"]["summary"]
            md.append(f"| W2 in-script `_compute_ms` (info) | ms | {spread(c['bare'], '{:.1f}')} | "
                      f"{spread(c['zviz'], '{:.1f}')} | x{ratio(c['zviz']['median'], c['bare']['median']):.3f} | | | |")
            c = W["W2"]["cpu_ms"]["summary"]
            cp = W["W2"]["cpu_ms"]["pair_ratios"]
            md.append(f"| W2 CPU of the command tree, user+sys (info: steadier than wall under load) | ms | "
                      f"{spread(c['bare'], '{:.1f}')} | {spread(c['zviz'], '{:.1f}')} | "
                      f"x{ratio(c['zviz']['median'], c['bare']['median']):.3f} (pairs {spread(cp, '{:.3f}')}) | "
                      f"{c['zviz']['median'] - c['bare']['median']:+.1f} ms | | |")
        if "W3" in W:
            s = W["W3"]["summary"]
            r = ratio(s["zviz"]["median"], s["bare"]["median"])
            pr = W["W3"]["pair_ratios"]
            # The verdict reads the median of the per-pair ratios (each A/B pair
            # ran back to back, so load drift over the run cancels out).
            T["w3_ratio"] = {"value": pr["median"], "target": f"<= {TARGETS['w3_ratio']}",
                             "met": pr["median"] <= TARGETS["w3_ratio"], "ratio_of_medians": r}
            md.append(f"| W3 syscall heavy `us_per_iter` | us/iter | {spread(s['bare'])} | {spread(s['zviz'])} | "
                      f"x{r:.3f} (pairs {spread(pr, '{:.3f}')}) | {s['zviz']['median'] - s['bare']['median']:+.2f} us | "
                      f"<= x1.10 | {met(T['w3_ratio']['met'])} |")
            w = W["W3"]["wall_ms"]["summary"]
            md.append(f"| W3 wall (info) | ms | {spread(w['bare'], '{:.1f}')} | {spread(w['zviz'], '{:.1f}')} | "
                      f"x{ratio(w['zviz']['median'], w['bare']['median']):.3f} | | | |")
        if "W4" in W:
            s = W["W4"]["summary"]
            extra = s["zviz"]["median"] - s["bare"]["median"]
            T["w4_extra_mb"] = {"value": extra, "target": f"<= bare + {TARGETS['w4_extra_mb']} MB",
                                "met": extra <= TARGETS["w4_extra_mb"]}
            md.append(f"| W4 peak tree PSS of W2 (+ supervisor growth) | MB | {spread(s['bare'])} | {spread(s['zviz'])} | "
                      f"x{ratio(s['zviz']['median'], s['bare']['median']):.2f} | {extra:+.2f} MB | <= bare + 1 MB | "
                      f"{met(T['w4_extra_mb']['met'])} |")
            d = W["W4"]["descendants_only"]["summary"]
            md.append(f"| W4 descendants only (info) | MB | {spread(d['bare'])} | {spread(d['zviz'])} | "
                      f"x{ratio(d['zviz']['median'], d['bare']['median']):.2f} | "
                      f"{d['zviz']['median'] - d['bare']['median']:+.2f} MB | | |")
        md.append("")

        if R["throughput"]:
            md.append("## Throughput: executions per second from one trio program\n")
            md.append("c tasks loop over the command for a time slice (runs in flight are finished and counted); "
                      "zviz: one sandbox per task (and, for W1, one sandbox shared by all tasks). "
                      "Ratio: median of the per-round ratios (each round ran bare and zviz back to back).\n")
            md.append("| workload | concurrency | bare | zviz, a sandbox per task | zviz / bare | zviz, one shared sandbox "
                      "| / bare | bare + setsid (info) | zviz / bare + setsid | load | target |")
            md.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for wl, levels in R["throughput"].items():
                for c, row in levels.items():
                    s = row["summary"]
                    r1 = row["pair_ratios"]["median"]
                    sh = s.get("zviz_shared")
                    st = s.get("bare_setsid")
                    tgt = ""
                    rs = row.get("pair_ratios_vs_setsid", {}).get("median") if st else None
                    if c == "8":
                        # The verdict takes the lower of zviz/bare and zviz/(bare + setsid):
                        # under load from other sessions, setsid alone (autogroup) is worth
                        # more CPU, which is not the sandbox's merit.
                        key = f"throughput_c8_ratio_{wl}"
                        v = min(r1, rs) if rs is not None else r1
                        T[key] = {"value": v, "target": f">= {TARGETS['throughput_c8_ratio']}",
                                  "met": v >= TARGETS["throughput_c8_ratio"], "vs_bare": r1,
                                  "ratio_of_medians": ratio(s["zviz"]["median"], s["bare"]["median"])}
                        if rs is not None:
                            T[key]["vs_bare_setsid"] = rs
                        if sh:
                            T[key]["value_shared"] = ratio(sh["median"], s["bare"]["median"])
                        tgt = f">= x0.9: {met(T[key]['met'])}"
                    md.append(f"| {wl} | {c} | {spread(s['bare'], '{:.1f}')} | {spread(s['zviz'], '{:.1f}')} | "
                              f"x{r1:.2f} | {spread(sh, '{:.1f}') if sh else ''} | "
                              f"{'x%.2f' % ratio(sh['median'], s['bare']['median']) if sh else ''} | "
                              f"{spread(st, '{:.1f}') if st else ''} | "
                              f"{'x%.2f' % rs if rs is not None else ''} | "
                              f"{row.get('loadavg_1min', math.nan):.2f} | {tgt} |")
            md.append("\nbare + setsid: the bare command in a new session, as zviz's stage does (setsid); with "
                      f"sched autogroup on (here: {m.get('sched_autogroup')}) each session is its own CPU-fairness "
                      "group, which favours it when other work shares the CPUs.\n")

        sm = R["supervisor_memory"]
        if sm:
            md.append("## Scaling: the supervisor (this process) with N sandboxes open at once, each holding a `sleep`\n")
            md.append("Memory: RSS of the benchmark process, which is the supervisor (one trio task per listener). "
                      "CPU: its user+sys time, per sandbox opened and started, per second of idling with N held, and "
                      "per `run([\"/bin/true\"])` made while N are held.\n")
            md.append("| N | RSS growth MB | per sandbox kB | marginal kB per extra sandbox | PSS growth MB | "
                      "sandbox tree (init + sleep) PSS kB per sandbox | fds per sandbox | CPU ms per open+start | "
                      "idle CPU ms/s (all N) | CPU ms per spawn (wall ms) | target |")
            md.append("|---|---|---|---|---|---|---|---|---|---|---|")
            last = sm["rows"][-1]
            per_mb = max(last["rss_kb_per_sandbox"], last["marginal_rss_kb_per_sandbox"]) / 1024
            T["supervisor_mb_per_sandbox"] = {"value": per_mb, "target": f"<= {TARGETS['supervisor_mb_per_sandbox']} MB",
                                              "met": per_mb <= TARGETS["supervisor_mb_per_sandbox"]}
            for row in sm["rows"]:
                tgt = f"<= 1 MB: {met(T['supervisor_mb_per_sandbox']['met'])}" if row is last else ""
                cpu = ""
                if "open_cpu_ms_per_sandbox" in row:
                    cpu = (f"{row['open_cpu_ms_per_sandbox']:.2f} | {row['idle_cpu_ms_per_s']:.2f} | "
                           f"{spread(row['spawn_cpu_ms'])} ({row['spawn_wall_ms']['median']:.2f})")
                else:
                    cpu = " | | "
                md.append(f"| {row['sandboxes']} | {row['rss_growth_kb'] / 1024:.2f} | {row['rss_kb_per_sandbox']:.1f} | "
                          f"{row['marginal_rss_kb_per_sandbox']:.1f} | {row['pss_growth_kb'] / 1024:.2f} | "
                          f"{row['sandbox_tree_pss_kb_per_sandbox']:.0f} | {row['fds_per_sandbox']:.1f} | {cpu} | {tgt} |")
            md.append("")
            md.append(f"First sandbox of the process (one-time costs, excluded above): +{sm['cold_first_sandbox_rss_kb'] / 1024:.2f} MB RSS. "
                      f"`open_sandbox` enter: {spread(sm['open_ms'], '{:.2f}')} ms; closing all {sm['rows'][-1]['sandboxes']}: "
                      f"{sm['close_all_ms']:.0f} ms.\n")
            ph = sm["python_heap"]
            md.append(f"Python heap per sandbox (tracemalloc, {ph['sandboxes']} sandboxes): "
                      f"{ph['bytes_per_sandbox'] / 1024:.1f} kB; largest sites: "
                      + "; ".join(f"`{t['where']}` (`{t['code']}`) {t['bytes_per_sandbox'] / 1024:.1f} kB"
                                  for t in ph["top"][:5]) + ".\n")

        mon = R["monitor"]
        if mon is not None:
            md.append("## eBPF monitor (`open_sandbox(..., monitor=True)`)\n")
            if not mon["available"]:
                md.append(f"monitor: unavailable ({mon['reason']})\n")
            else:
                md.append("Three phases in a row, each interleaved round by round: A without a monitor (bare, zviz), "
                          "B with a sandbox opened with `monitor=True` (bare, zviz, zviz + monitor), C without "
                          "(bare, zviz). The monitor's tracepoints fire for every system call on the host while it is "
                          "loaded (docs/monitoring.md), so B's bare and zviz pay too. \"bare\": the mean of A and C "
                          f"per round. Opening the sandbox with the monitor took {mon.get('open_with_monitor_s', math.nan):.1f} s "
                          "(bcc compiles the program).\n")
                md.append("| workload | unit | bare (A, C) | zviz (A, C) | zviz + monitor (B) | monitor / bare (pairs) | "
                          "monitor / zviz in B (pairs) | bare in B / bare (host-wide tax) |")
                md.append("|---|---|---|---|---|---|---|---|")
                for w in ("W0", "W1", "W2", "W3"):
                    if w not in mon:
                        continue
                    s = mon[w]["summary"]
                    md.append(f"| {w} | {mon[w]['unit']} | {spread(s['bare'], '{:.3f}')} | {spread(s['zviz'], '{:.3f}')} | "
                              f"{spread(s['zviz_monitor'], '{:.3f}')} | {spread(mon[w]['pair_ratios'], '{:.3f}')} | "
                              f"{spread(mon[w]['pair_ratios_vs_zviz'], '{:.3f}')} | {spread(mon[w]['host_tax'], '{:.3f}')} |")
                md.append("")

        if T:
            md.append("## Targets\n")
            md.append("| target | value | | note |")
            md.append("|---|---|---|---|")
            labels = {"w0_overhead_ms": ("W0 spawn overhead", "{:+.3f} ms"), "w2_ratio": ("W2 wall zviz / bare", "x{:.3f}"),
                      "w3_ratio": ("W3 us_per_iter zviz / bare", "x{:.3f}"),
                      "w4_extra_mb": ("W4 tree PSS zviz - bare", "{:+.2f} MB"),
                      "supervisor_mb_per_sandbox": ("supervisor memory per extra sandbox", "{:.3f} MB"),
                      "throughput_c8_ratio_W1": ("W1 throughput at concurrency 8, zviz / bare (per-task sandboxes)", "x{:.3f}"),
                      "throughput_c8_ratio_W2": ("W2 throughput at concurrency 8, zviz / bare (per-task sandboxes)", "x{:.3f}")}
            for k, (label, fmt) in labels.items():
                if k in T:
                    note = ""
                    if "ratio_of_medians" in T[k]:
                        note = f"median of the A/B pair ratios; ratio of the medians x{T[k]['ratio_of_medians']:.3f}"
                    if "vs_bare" in T[k]:
                        note = (f"the lower of: vs bare x{T[k]['vs_bare']:.3f}, vs bare + setsid "
                                f"x{T[k].get('vs_bare_setsid', math.nan):.3f} (medians of the per-round ratios)")
                    if "value_shared" in T[k]:
                        note += f"; one shared sandbox vs bare x{T[k]['value_shared']:.3f}"
                    md.append(f"| {label} {T[k]['target']} | {fmt.format(T[k]['value'])} | {met(T[k]['met'])} | {note} |")
            md.append("")
        if R["errors"]:
            md.append("## Errors\n")
            for e in R["errors"]:
                md.append(f"- {e['section']}: {e['error']}")
            md.append("")
        return "\n".join(md)

    # ---- main

    def meta(self) -> None:
        def git(*a: str) -> str:
            try:
                return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                      timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return "?"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        self.results["meta"].update({
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "zviz": zviz.__version__,
            "git": git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
            "command_python": PY, "quick": self.quick, "argv": sys.argv,
            "euid": os.geteuid(), "policy": "Policy.python()",
            "sched_autogroup": _read("/proc/sys/kernel/sched_autogroup_enabled"),
            # the zviz sources measured (the tree may be edited between runs)
            "zviz_sources_sha256": hashlib.sha256(b"".join(
                p.read_bytes() for p in sorted((REPO / "zviz").rglob("*")) if p.suffix in (".py", ".c"))).hexdigest()[:16],
        })

    async def main(self) -> int:
        t_start = time.perf_counter()
        self.meta()
        sections = [("workloads", self.load_workloads), ("W0-W3", self.w0_w3), ("W4", self.w4)]
        if not self.args.no_monitor:
            sections.append(("monitor", self.monitor))
        if self.args.peers:
            sections.append(("peers", self.peers))
        sections += [("throughput", self.throughput), ("scaling", self.supervisor_memory)]
        loads = self.results["meta"]["loadavg_1min"] = {}
        for name, fn in sections:
            loads[name] = [os.getloadavg()[0]]
            t_sec = time.perf_counter()
            try:
                res = fn()
                if hasattr(res, "__await__"):
                    await res
            except Exception as e:  # noqa: BLE001 - recorded, reported, exit status 1
                tb = traceback.format_exc()
                print(f"ERROR in {name}: {type(e).__name__}: {e}\n{tb}", file=sys.stderr, flush=True)
                self.results["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}", "traceback": tb})
                if name == "workloads":
                    break
            loads[name].append(os.getloadavg()[0])
            self.results["meta"].setdefault("section_s", {})[name] = round(time.perf_counter() - t_sec, 1)
            print(f"-- {name}: {self.results['meta']['section_s'][name]} s, load {loads[name][0]:.2f} -> "
                  f"{loads[name][1]:.2f}", flush=True)
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.compare()
        except Exception as e:  # noqa: BLE001 - a bug here must not lose the measurements
            self.results["errors"].append({"section": "comparison", "error": f"{type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()})
        md = self.report()  # fills results["targets"]
        if not self.args.no_charts:
            try:
                sys.path.insert(0, str(HERE))
                import charts  # benchmarks/charts.py

                self.results["charts"] = [str(p) for p in charts.write_charts(self.results, out)]
            except ImportError as e:
                # not an error of the measurement: the report says how to get them
                self.results["charts_error"] = (f"{e}; install matplotlib: .venv/bin/pip install matplotlib "
                                                "(or pip install -e '.[bench]')")
            except Exception as e:  # noqa: BLE001
                self.results["errors"].append({"section": "charts", "error": f"{type(e).__name__}: {e}",
                                               "traceback": traceback.format_exc()})
            md = self.report()  # now with the chart links
        (out / "results.md").write_text(md + "\n")
        (out / "results.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        print()
        print(self.terminal_summary())
        print(f"\n(elapsed {self.results['meta']['elapsed_s']} s; full report {out / 'results.md'}, raw samples "
              f"{out / 'results.json'}; charts: {', '.join(self.results['charts']) or self.results.get('charts_error', 'none')})")
        shutil.rmtree(self.bare_dir, ignore_errors=True)
        return 1 if self.results["errors"] else 0

    def terminal_summary(self) -> str:
        """The comparison, throughput at each concurrency, scaling at the
        largest N and the targets: the rest is in results.md."""
        R = self.results
        m = R["meta"]
        lines = [f"zviz benchmarks ({'quick' if self.quick else 'full'}) - {m.get('when')} - kernel {m.get('kernel')} "
                 f"- {m.get('cpus')} CPUs - load (1 min, start/end per section): "
                 + ", ".join(f"{k} {'/'.join(f'{x:.1f}' for x in v)}" for k, v in m.get("loadavg_1min", {}).items()),
                 ""]
        lines += self.comparison_md()
        for wl, levels in R["throughput"].items():
            lines.append(f"throughput {wl} (executions/s: bare / bare+setsid -> zviz per task, ratios): " + "; ".join(
                f"c={c}: {row['summary']['bare']['median']:.1f} / {row['summary']['bare_setsid']['median']:.1f} -> "
                f"{row['summary']['zviz']['median']:.1f} x{row['pair_ratios']['median']:.2f} / "
                f"x{row['pair_ratios_vs_setsid']['median']:.2f}" for c, row in levels.items()))
        sm = R["supervisor_memory"]
        if sm and sm.get("rows"):
            r = sm["rows"][-1]
            extra = ""
            if "open_cpu_ms_per_sandbox" in r:
                extra = (f"; CPU {r['open_cpu_ms_per_sandbox']:.2f} ms per open+start, idle "
                         f"{r['idle_cpu_ms_per_s']:.2f} ms/s for all {r['sandboxes']}, "
                         f"{r['spawn_cpu_ms']['median']:.2f} ms per spawn")
            lines.append(f"scaling at N={r['sandboxes']}: supervisor RSS {r['rss_kb_per_sandbox']:.1f} kB per sandbox "
                         f"(marginal {r['marginal_rss_kb_per_sandbox']:.1f} kB){extra}")
        lines.append("")
        T = R["targets"]
        if T:
            lines.append("targets: " + "; ".join(
                f"{k} {T[k]['value']:.3f} ({T[k]['target']}): {'met' if T[k]['met'] else 'MISSED'}" for k in T))
        for e in R["errors"]:
            lines.append(f"ERROR {e['section']}: {e['error']}")
        return "\n".join(lines)


# ---------------------------------------------------------------- child: supervisor memory


async def _open_holding(stack: contextlib.AsyncExitStack, policy: zviz.Policy) -> tuple[float, zviz.Sandbox]:
    """Open a sandbox holding a `sleep`; returns the open_sandbox enter time (ms) and the sandbox."""
    t0 = time.perf_counter()
    sb = await stack.enter_async_context(zviz.open_sandbox(policy))
    dt = (time.perf_counter() - t0) * 1e3
    await sb.start(["/bin/sleep", "3600"], stdin=False, stdout=False, stderr=False)
    return dt, sb


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def child_supervisor_memory(quick: bool) -> dict:
    """This (fresh) process with N sandboxes open at once, each holding a
    `sleep`: RSS (what the host pays) and CPU (this process's user+sys time:
    per sandbox opened and started, per second while the N sandboxes sit idle,
    and per `run(["/bin/true"])` made while N are held); then, in a second pass
    under tracemalloc, the Python heap per sandbox and where it is allocated."""
    import tracemalloc

    ns = [1, 10, 50] if quick else [1, 10, 25, 50, 100, 200]
    idle_s = 0.5 if quick else 1.0
    n_spawn = 10 if quick else 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    policy = zviz.Policy.python()

    # One sandbox opened, used and closed first: one-time costs (the kernel
    # probe, the compiled-filter cache, lazy imports) are not per-sandbox.
    gc.collect()
    cold_rss = rss_kb()
    async with contextlib.AsyncExitStack() as stack:
        _, sb = await _open_holding(stack, policy)
        await sb.run(["/bin/true"], timeout=RUN_TIMEOUT)
    gc.collect()
    await trio.sleep(0.05)
    base_rss, base_pss = rss_kb(), pss_kb()
    base_fds = len(os.listdir("/proc/self/fd"))
    rows, open_ms = [], []
    async with contextlib.AsyncExitStack() as stack:
        opened, prev_n, prev_rss, spawn_growth = 0, 0, base_rss, 0
        held: list[zviz.Sandbox] = []
        for n in ns:
            c0, t0 = _self_cpu_s(), time.perf_counter()
            while opened < n:
                dt, sb = await _open_holding(stack, policy)
                open_ms.append(dt)
                held.append(sb)
                opened += 1
            open_cpu_ms = (_self_cpu_s() - c0) * 1e3 / (n - prev_n)
            open_wall_ms = (time.perf_counter() - t0) * 1e3 / (n - prev_n)
            gc.collect()
            await trio.sleep(0.05)
            r, p = rss_kb(), pss_kb()
            kids = [k for k in descendants(os.getpid()) if not _shares_our_image(k)]
            # idle: N sandboxes, each with a live process and a supervisor
            # task waiting on its listener; what does this process burn?
            c0, t0 = _self_cpu_s(), time.perf_counter()
            await trio.sleep(idle_s)
            idle_cpu_ms_per_s = (_self_cpu_s() - c0) * 1e3 / (time.perf_counter() - t0)
            # spawns while N are held: supervisor-side CPU and wall per run
            spawn_cpu, spawn_wall = [], []
            for i in range(n_spawn):
                sb = held[i % len(held)]
                c0, t0 = _self_cpu_s(), time.perf_counter()
                res = await sb.run(["/bin/true"], timeout=RUN_TIMEOUT)
                spawn_wall.append((time.perf_counter() - t0) * 1e3)
                spawn_cpu.append((_self_cpu_s() - c0) * 1e3)
                if not res.ok:
                    raise BenchError(f"/bin/true failed with {n} sandboxes held: {res.status} {res.stderr[-300:]!r}")
            # whatever the spawns left in this process (heap churn) is not the
            # held sandboxes' cost: it is taken out of the next levels' figures
            gc.collect()
            await trio.sleep(0.05)
            r_after = rss_kb()
            rows.append({
                "sandboxes": n, "rss_kb": r, "rss_growth_kb": r - base_rss - spawn_growth,
                "pss_growth_kb": p - base_pss - spawn_growth,
                "rss_kb_per_sandbox": (r - base_rss - spawn_growth) / n,
                "marginal_rss_kb_per_sandbox": (r - prev_rss) / (n - prev_n),
                "rss_growth_during_spawns_kb": r_after - r,
                "sandbox_processes": len(kids),
                "sandbox_tree_pss_kb_per_sandbox": sum(pss_kb(k) for k in kids) / n,
                "fds_per_sandbox": (len(os.listdir("/proc/self/fd")) - base_fds) / n,
                "open_cpu_ms_per_sandbox": open_cpu_ms, "open_wall_ms_per_sandbox": open_wall_ms,
                "idle_cpu_ms_per_s": idle_cpu_ms_per_s, "idle_cpu_ms_per_s_per_sandbox": idle_cpu_ms_per_s / n,
                "spawn_cpu_ms": summary(spawn_cpu), "spawn_wall_ms": summary(spawn_wall),
            })
            prev_n, prev_rss = n, r_after
            spawn_growth += r_after - r
        t0 = time.perf_counter()
    close_all_ms = (time.perf_counter() - t0) * 1e3

    # Pass 2: the Python heap per sandbox (tracemalloc; its own bookkeeping
    # would distort RSS, hence a separate pass).
    n_tm = ns[-1] if quick else 50
    tracemalloc.start(16)
    async with contextlib.AsyncExitStack() as stack:
        await _open_holding(stack, policy)
    gc.collect()
    snap0 = tracemalloc.take_snapshot()
    cur0 = tracemalloc.get_traced_memory()[0]
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n_tm):
            await _open_holding(stack, policy)
        gc.collect()
        cur1 = tracemalloc.get_traced_memory()[0]
        snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    # Each allocation is charged to the innermost zviz frame that led to it
    # (else to the innermost frame), so library internals (trio's cancel
    # scopes, attrs) show up under the zviz line that asked for them.
    sites: dict[str, list[float]] = {}
    for st in snap1.compare_to(snap0, "traceback"):
        frames = list(st.traceback)  # oldest first
        fr = next((f for f in reversed(frames) if "/zviz/" in f.filename), frames[-1])
        name = os.path.relpath(fr.filename, REPO) if fr.filename.startswith(str(REPO)) else fr.filename
        acc = sites.setdefault(f"{name}:{fr.lineno}", [0, 0])
        acc[0] += st.size_diff
        acc[1] += st.count_diff
    import linecache

    top = []
    for k, v in sorted(sites.items(), key=lambda kv: -kv[1][0])[:12]:
        file, _, line = k.rpartition(":")
        code = linecache.getline(file if os.path.isabs(file) else str(REPO / file), int(line)).strip()
        top.append({"where": k, "code": code[:100], "bytes_per_sandbox": v[0] / n_tm, "blocks_per_sandbox": v[1] / n_tm})
    return {
        "unit": "kB", "cold_first_sandbox_rss_kb": base_rss - cold_rss, "base_rss_kb": base_rss,
        "rows": rows, "open_ms": summary(open_ms), "close_all_ms": close_all_ms,
        "python_heap": {"sandboxes": n_tm, "bytes_per_sandbox": (cur1 - cur0) / n_tm, "top": top},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no concurrency 32, at most 50 sandboxes (~2-3 min with --peers)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where results.md and results.json go")
    ap.add_argument("--peers", action="store_true",
                    help="add rows for the peer sandboxes that are installed (benchmarks/peers.py; "
                         "install them with sudo benchmarks/install_peers.sh)")
    ap.add_argument("--no-monitor", action="store_true",
                    help="skip the row with open_sandbox(..., monitor=True) (it is tried by default, and "
                         "reported as unavailable without root/bcc)")
    ap.add_argument("--monitor", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old command lines
    ap.add_argument("--no-charts", action="store_true", help="do not write the PNG charts")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child == "supervisor-memory":
        print(json.dumps(trio.run(child_supervisor_memory, args.quick)))
        return 0
    return trio.run(Bench(args).main)


if __name__ == "__main__":
    sys.exit(main())
