"""What the eBPF monitor costs a syscall-heavy program (docs/monitoring.md).

    .venv/bin/python benchmarks/monitor_overhead.py              # 10 rounds, ~1 min, as root with bcc
    .venv/bin/python benchmarks/monitor_overhead.py --runs 20 --json /tmp/mon.json

W3 (`w3_syscall_heavy.py` from ../shared/bench/, else benchmarks/workloads/)
runs under /usr/bin/python3 and reports its own in-process `us_per_iter`
(open/read/close + stat of one small file), so interpreter start-up and spawn
cost are left out: the figure is the per-syscall cost the monitor adds.

Each round measures, in a rotating order:

  no monitor loaded:
    bare          trio.run_process(python3 w3) in a plain directory
    zviz          sb.run(python3 w3) in a sandbox opened without a monitor
  a monitor loaded for the round (zviz.ebpf.open_monitor(), ~2.5 s to compile):
    zviz+monitor  sb.run(python3 w3) in a sandbox opened with monitor=that monitor
    bare (loaded) and zviz (loaded): the two above again while the program is
                  attached. The tracepoints fire host-wide, so this is the tax
                  the monitor puts on every other process of the host.

It prints medians with [p10, p90], the ratios of the medians, the medians of
the per-round ratios, and /proc/loadavg before, during and after (the CPUs may
be shared with other work). Exits 1 only if something fails.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

import zviz
import zviz.ebpf

HERE = Path(__file__).resolve().parent
PY = "/usr/bin/python3"
NAME = "w3_syscall_heavy.py"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(v: list[float]) -> dict:
    return {"median": statistics.median(v), "p10": pct(v, 0.1), "p90": pct(v, 0.9), "n": len(v)}


def source() -> tuple[str, bytes]:
    for p in (HERE.parent.parent / "shared" / "bench" / NAME, HERE / "workloads" / NAME):
        if p.is_file():
            return str(p), p.read_bytes()
    sys.exit(f"{NAME} not found in ../shared/bench/ nor benchmarks/workloads/")


def us_per_iter(out: bytes) -> float:
    try:
        return float(json.loads(out)["us_per_iter"])
    except (ValueError, KeyError):
        raise SystemExit(f"W3 printed {out[-300:]!r}") from None


async def main(a: argparse.Namespace) -> dict:
    ok, why = zviz.ebpf.status()
    if not ok:
        sys.exit(f"eBPF monitor unavailable: {why}")
    where, code = source()
    policy = zviz.Policy.python()
    env_iters = {"W3_ITERS": str(a.iters)}
    bare_dir = tempfile.mkdtemp(prefix="zviz-monbench-")
    atexit.register(shutil.rmtree, bare_dir, True)
    Path(bare_dir, NAME).write_bytes(code)
    bare_env = dict(policy.env) | {"HOME": bare_dir, "TMPDIR": bare_dir, "PWD": bare_dir} | env_iters
    samples: dict[str, list[float]] = {k: [] for k in ("bare", "zviz", "zviz_monitor", "bare_loaded", "zviz_loaded")}
    loads = [("start", loadavg())]
    load_s: list[float] = []
    counted = {}

    async def bare() -> float:
        p = await trio.run_process([PY, os.path.join(bare_dir, NAME)], cwd=bare_dir, env=bare_env,
                                   capture_stdout=True, capture_stderr=True, check=False)
        if p.returncode != 0:
            sys.exit(f"bare W3 exited {p.returncode}: {p.stderr[-300:]!r}")
        return us_per_iter(p.stdout)

    async def inside(sb: zviz.Sandbox) -> float:
        r = await sb.run([PY, os.path.join(sb.workspace, NAME)], env=env_iters, timeout=120)
        if not r.ok:
            sys.exit(f"W3 in the sandbox failed: status {r.status} {r.stderr[-300:]!r}")
        return us_per_iter(r.stdout)

    async with zviz.open_sandbox(policy) as plain:
        await plain.write_file(NAME, code)
        for i in range(a.warmup + a.runs):
            keep = i >= a.warmup
            got: dict[str, float] = {}

            async def unloaded() -> None:
                for name, fn in (("bare", bare), ("zviz", lambda: inside(plain)))[:: 1 if i % 2 else -1]:
                    got[name] = await fn()

            async def loaded() -> None:
                t0 = time.monotonic()
                async with zviz.ebpf.open_monitor() as mon:
                    load_s.append(time.monotonic() - t0)
                    async with zviz.open_sandbox(policy, monitor=mon) as msb:
                        await msb.write_file(NAME, code)
                        order = [("zviz_monitor", lambda: inside(msb)), ("bare_loaded", bare),
                                 ("zviz_loaded", lambda: inside(plain))]
                        order = order[i % 3:] + order[: i % 3]
                        for name, fn in order:
                            got[name] = await fn()
                        st = msb.statistics().syscalls or {}
                        counted.clear()
                        counted.update(sorted(st.items(), key=lambda kv: -kv[1])[:6])
                        counted["(all)"] = sum(st.values())
                    loads.append((f"round {i} (monitor loaded)", loadavg()))

            for phase in ((unloaded, loaded) if i % 2 == 0 else (loaded, unloaded)):
                await phase()
            if keep:
                for k, v in got.items():
                    samples[k].append(v)
            print(f"round {i}{'' if keep else ' (warm-up)'}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
                  + f"  loadavg {loadavg()}", flush=True)
    loads.append(("end", loadavg()))

    s = {k: summary(v) for k, v in samples.items()}
    med = {k: v["median"] for k, v in s.items()}
    pairs = {
        "monitor/zviz": [m / z for m, z in zip(samples["zviz_monitor"], samples["zviz"])],
        "monitor/bare": [m / b for m, b in zip(samples["zviz_monitor"], samples["bare"])],
        "zviz/bare": [z / b for z, b in zip(samples["zviz"], samples["bare"])],
        "bare_loaded/bare": [x / b for x, b in zip(samples["bare_loaded"], samples["bare"])],
    }
    ratios = {
        "monitor/zviz": med["zviz_monitor"] / med["zviz"],
        "monitor/bare": med["zviz_monitor"] / med["bare"],
        "zviz/bare": med["zviz"] / med["bare"],
        "bare_loaded/bare": med["bare_loaded"] / med["bare"],
        "zviz_loaded/zviz": med["zviz_loaded"] / med["zviz"],
    }
    return {
        "workload": {"path": where, "iters": a.iters, "python": PY},
        "kernel": os.uname().release, "cpus": os.cpu_count(), "runs": a.runs, "warmup": a.warmup,
        "samples_us_per_iter": samples, "summary": s, "ratios_of_medians": ratios,
        "pair_ratio_medians": {k: statistics.median(v) for k, v in pairs.items()},
        "monitor_load_s": summary(load_s), "loadavg": loads,
        "last_monitored_run_counted": counted,
    }


def report(res: dict) -> str:
    s, r, p = res["summary"], res["ratios_of_medians"], res["pair_ratio_medians"]
    rows = [("bare", "bare"), ("zviz", "zviz"), ("zviz+monitor", "zviz_monitor"),
            ("bare, monitor loaded (not attached)", "bare_loaded"),
            ("zviz, monitor loaded (not attached)", "zviz_loaded")]
    out = [f"W3 x {res['workload']['iters']} iterations, {res['runs']} rounds (+{res['warmup']} warm-up), "
           f"kernel {res['kernel']}, {res['cpus']} CPUs", "",
           "| variant | us_per_iter median [p10, p90] |", "|---|---|"]
    for label, k in rows:
        out.append(f"| {label} | {s[k]['median']:.2f} [{s[k]['p10']:.2f}, {s[k]['p90']:.2f}] |")
    out += ["", "| ratio | of the medians | median of the per-round ratios |", "|---|---|---|"]
    for k in ("monitor/zviz", "monitor/bare", "zviz/bare", "bare_loaded/bare"):
        out.append(f"| {k} | x{r[k]:.3f} | x{p[k]:.3f} |")
    out += ["", f"monitor load (compile + attach): median {res['monitor_load_s']['median']:.2f} s",
            "loadavg: " + "; ".join(f"{w} {v}" for w, v in res["loadavg"] if not w.startswith("round")
                                    or w.startswith(f"round {res['warmup'] + res['runs'] // 2} ")),
            f"syscalls the monitor counted in the last monitored W3 run: {res['last_monitored_run_counted']}"]
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20000, help="W3_ITERS")
    ap.add_argument("--json", metavar="FILE", help="also write the raw samples here")
    args = ap.parse_args()
    result = trio.run(main, args)
    print()
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
