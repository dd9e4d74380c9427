#!/usr/bin/env python3
"""The supervisor attacks of tests/escape/test_net_supervisor.py as measurements.

    .venv/bin/python benchmarks/supervisor_poc.py SCENARIO

SCENARIO: hang (allow mode: 1,500 children each start a blocking connect to a
listed endpoint that never answers, killed after 2 ms), storm (one thread
forks over 60,000 mappings again and again while another floods mount()),
storm0 (the same storm without denials: the CPU-contention control), chain
(a 1,000-deep process chain making 300 denied calls), idle (sleep 3).
Meanwhile a neighbour sandbox runs /bin/true in a loop and a ticker measures
how late the event loop wakes. Prints the loop's lag, the neighbour's
latency, the host process's extra fds and its RSS. Run it with the zviz to
measure first on sys.path (PYTHONPATH=an/other/checkout to compare).
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import attrs
import trio

import zviz

HERE = os.path.dirname(os.path.abspath(__file__))
scenario = sys.argv[1]
with tempfile.TemporaryDirectory() as _d:
    subprocess.run([shutil.which("cc") or "gcc", "-O1", "-o", os.path.join(_d, "na"),
                    os.path.join(HERE, "..", "tests", "escape", "net_attack.c"), "-lpthread"], check=True)
    with open(os.path.join(_d, "na"), "rb") as _f:
        NA = _f.read()


def fds():
    return len(os.listdir("/proc/self/fd"))


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])


async def main():
    lat, worst_lag, fd_peak = [], [0.0], [0]
    lags = []
    stop = trio.Event()
    base_fds = fds()

    async def neighbour():
        async with zviz.open_sandbox(zviz.Policy.python()) as nb:
            await nb.run(["/bin/true"])
            while not stop.is_set():
                t = time.monotonic()
                await nb.run(["/bin/true"])
                lat.append(time.monotonic() - t)
                await trio.sleep(0.005)

    async def lagger():
        while True:
            t = trio.current_time()
            await trio.sleep(0.001)
            lags.append(trio.current_time() - t - 0.001)
            worst_lag[0] = max(worst_lag[0], lags[-1])
            fd_peak[0] = max(fd_peak[0], fds() - base_fds)

    pol = zviz.Policy.python()
    extra = []
    if scenario == "storm0":
        pol = attrs.evolve(pol, limits=attrs.evolve(pol.limits, memory=None))
        argv = ["./na", "storm", "5", "60000", "0"]
    elif scenario == "storm":
        pol = attrs.evolve(pol, limits=attrs.evolve(pol.limits, memory=None))
        argv = ["./na", "storm", "5", "60000"]
    elif scenario == "chain":
        pol = attrs.evolve(pol, limits=attrs.evolve(pol.limits, processes=4096))
        argv = ["./na", "chain", "1000", "300"]
    elif scenario == "hang":
        hole = socket.socket(); hole.bind(("127.0.0.1", 0)); hole.listen(0)
        port = hole.getsockname()[1]
        for _ in range(3):
            s = socket.socket(); s.setblocking(False); s.connect_ex(("127.0.0.1", port)); extra.append(s)
        extra.append(hole)
        pol = attrs.evolve(pol, net=zviz.Network(mode="allow", allow=[f"127.0.0.1:{port}"]),
                           limits=attrs.evolve(pol.limits, processes=4096))
        argv = ["./na", "hang", "127.0.0.1", str(port), "1500"]
    elif scenario == "idle":
        argv = ["/bin/sleep", "3"]
    async with trio.open_nursery() as n:
        n.start_soon(neighbour)
        while not lat:
            await trio.sleep(0.01)
        lat.clear()
        rss0 = rss_kb()
        n.start_soon(lagger)
        t0 = time.monotonic()
        err = None
        try:
            async with zviz.open_sandbox(pol) as sb:
                await sb.write_file("na", NA, mode=0o755)
                r = await sb.run(argv, timeout=120)
                out = r.stdout.decode().strip().splitlines()[-1:] + [str(dict(r.denials))[:80]]
        except Exception as e:  # noqa
            err = repr(e)[:200]
            out = []
        wall = time.monotonic() - t0
        rss1 = rss_kb()
        stop.set()
        n.cancel_scope.cancel()
    for s in extra:
        s.close()
    lat.sort()
    lags.sort()
    print(f"  loop lag p99={lags[int(len(lags)*0.99)]*1000:.1f}ms over20ms={sum(l > 0.02 for l in lags)} "
          f"over50ms={sum(l > 0.05 for l in lags)} samples={len(lags)}")
    print(f"{scenario}: wall={wall:.2f}s loop_lag_max={worst_lag[0]*1000:.1f}ms neighbour_runs={len(lat)} "
          f"neighbour_p50={statistics.median(lat)*1000 if lat else 0:.1f}ms "
          f"neighbour_max={max(lat or [0])*1000:.1f}ms host_fds_peak=+{fd_peak[0]} rss={rss0//1024}->{rss1//1024}MiB "
          f"err={err} out={out}")

trio.run(main)
