#!/usr/bin/env python3
"""What a workspace template costs, A/B in one process.

    .venv/bin/python benchmarks/templates.py [--files 5000] [--mb 200] [--n 40] [--json]

Makes a template of FILES files holding MB megabytes in all (written by the
sandbox itself, in 100 directories), then, alternating per iteration so load
drifts hit both alike:
  empty:    open_sandbox(policy) + run(["/bin/true"]) + close
  template: open_sandbox(policy, template=T) + run(["/bin/true"]) + close
and prints the medians and their ratio (template / empty), plus the time of
`snapshot` itself and of the copy a non-root caller pays instead of the
overlay (`_snapshot.populate`, timed here directly as root). As root the
template path is the overlay (zviz/_snapshot.py); run it as a non-root user to
time that caller's whole path (the copy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import trio

import zviz
from zviz import _snapshot

MAKE = """
import os, sys
files, size = int(sys.argv[1]), int(sys.argv[2])
each = size // files
block = os.urandom(min(each, 1 << 16)) or b""
for i in range(files):
    d = f"pkg{i % 100:02d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i}.bin", "wb") as f:
        left = each
        while left > 0:
            f.write(block[:left])
            left -= len(block[:left]) or left
"""


async def make_template(policy: zviz.Policy, dest: str, files: int, size: int) -> tuple[float, zviz.SnapshotInfo]:
    async with zviz.open_sandbox(policy) as sb:
        r = await sb.run(["python3", "-c", MAKE, str(files), str(size)], timeout=600)
        assert r.ok, r.stderr
        t0 = time.perf_counter()
        info = await sb.snapshot(dest)
        return time.perf_counter() - t0, info


async def cycle(policy: zviz.Policy, template: str | None) -> float:
    t0 = time.perf_counter()
    async with zviz.open_sandbox(policy, template=template) as sb:
        r = await sb.run(["/bin/true"])
    dt = time.perf_counter() - t0
    assert r.ok, r.stderr
    return dt


async def main(a: argparse.Namespace) -> dict:
    policy = zviz.Policy.python()
    base = tempfile.mkdtemp(prefix="zviz-bench-templates-")
    try:
        dest = os.path.join(base, "t")
        snap_s, info = await make_template(policy, dest, a.files, a.mb << 20)
        t = _snapshot.open_template(dest)
        copy_dir = os.path.join(base, "copy")
        os.mkdir(copy_dir)
        t0 = time.perf_counter()
        _snapshot.populate(t, copy_dir)
        copy_s = time.perf_counter() - t0
        shutil.rmtree(copy_dir)
        for _ in range(3):  # warm up both paths
            await cycle(policy, None)
            await cycle(policy, dest)
        empty, tmpl = [], []
        for _ in range(a.n):
            empty.append(await cycle(policy, None))
            tmpl.append(await cycle(policy, dest))
        me, mt = statistics.median(empty) * 1e3, statistics.median(tmpl) * 1e3
        return {
            "caller": "root (overlay)" if os.geteuid() == 0 else "non-root (copy)",
            "template": {"files": info.files, "bytes": info.bytes},
            "open_run_close_empty_ms": round(me, 3),
            "open_run_close_template_ms": round(mt, 3),
            "ratio_template_over_empty": round(mt / me, 3),
            "difference_ms": round(mt - me, 3),
            "empty_p10_p90_ms": [round(x * 1e3, 3) for x in statistics.quantiles(empty, n=10)[::8]],
            "template_p10_p90_ms": [round(x * 1e3, 3) for x in statistics.quantiles(tmpl, n=10)[::8]],
            "snapshot_s": round(snap_s, 3),
            "snapshot_MB_per_s": round(info.bytes / 1e6 / snap_s, 1),
            "copy_instead_of_overlay_s": round(copy_s, 3),
            "n": a.n,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = trio.run(main, args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
