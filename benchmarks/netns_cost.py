#!/usr/bin/env python3
"""What a network namespace costs a `none`-mode sandbox, three ways, A/B/C in one process.

    .venv/bin/python benchmarks/netns_cost.py [--w0 N] [--w3 N] [--fresh N] [--blocks N] [--sockets N] [--bare N]

blank: the default as root (`Namespaces(lazy_net=True)`): the sandbox starts in
zviz's blank namespace and gets its own at its first socket, made by zviz
(docs/security-model.md, "The blank network namespace"); clone:
`lazy_net=False`, its own namespace made at clone; none: `Namespaces(net=False)`
(no namespace of its own: degraded, the floor). W0: one /bin/true in an open
sandbox (median ms); W3: the syscall-heavy loop (median us/iter); fresh: open +
/bin/true + close, sequential, in interleaved blocks, wall per sandbox and
system-wide CPU per sandbox from /proc/stat over each block and a 1 s settle
(it includes the kernel workers that free namespaces, and everything else the
machine does), beside `trio.run_process(["/bin/true"])` (bare) measured the
same way; sockets: what one socket() and one socketpair() cost in a sandbox
(us, after its first); bare_*: N children that unshare(CLONE_NEWUSER[|CLONE_NEWNET])
and exit, their CPU and the kworker threads' CPU per namespace (root).
"""
import argparse
import ctypes
import json
import os
import resource
import statistics
import time

import attrs
import trio

import zviz

HERE = os.path.dirname(os.path.abspath(__file__))
W3 = next(p for p in (os.path.join(HERE, "..", "..", "shared", "bench", "w3_syscall_heavy.py"),
                      os.path.join(HERE, "workloads", "w3_syscall_heavy.py")) if os.path.exists(p))
HZ = os.sysconf("SC_CLK_TCK")
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def pol(kind: str) -> zviz.Policy:
    p = zviz.Policy.python()
    return attrs.evolve(p, namespaces=attrs.evolve(p.namespaces, net=kind != "none", lazy_net=kind == "blank"))


KINDS = ("blank", "clone", "none")
SOCKETS = """
import json, socket, sys, time
n = int(sys.argv[1])
socket.socketpair()
t = time.perf_counter()
for _ in range(n):
    socket.socket(socket.AF_UNIX).close()
one = (time.perf_counter() - t) / n * 1e6
t = time.perf_counter()
for _ in range(n):
    a, b = socket.socketpair()
    a.close()
    b.close()
print(json.dumps([one, (time.perf_counter() - t) / n * 1e6]))
"""


def cpu_ms() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) * 1000 / HZ  # all but idle and iowait


def kworker_ms() -> float:
    tot = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        if st[st.index("(") + 1:].startswith("kworker"):
            fields = st[st.rindex(")") + 2:].split()
            tot += int(fields[11]) + int(fields[12])
    return tot * 1000 / HZ


def bare(flags: int, n: int) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    k0, r0 = kworker_ms(), resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if libc.unshare(flags) == 0 else 1)
        os.waitpid(pid, 0)
    time.sleep(2.0)  # the cleanup work is asynchronous
    r1, k1 = resource.getrusage(resource.RUSAGE_CHILDREN), kworker_ms()
    child = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1000
    return {"child_cpu_ms": round(child / n, 3), "kworker_cpu_ms": round((k1 - k0) / n, 3)}


async def main(a: argparse.Namespace) -> None:
    res: dict = {"load_start": os.getloadavg()[0]}
    with open(W3, "rb") as f:  # noqa: ASYNC230 - before any timing
        w3_source = f.read()
    async with zviz.open_sandbox(pol("blank")) as sa, zviz.open_sandbox(pol("clone")) as sb:
        pair = (("blank", sa), ("clone", sb))
        for _, s in pair:
            for _ in range(20):
                await s.run(["/bin/true"])
            await s.write_file("w3.py", w3_source)
        w0: dict[str, list[float]] = {"blank": [], "clone": []}
        for i in range(a.w0):
            for k, s in pair if i % 2 else pair[::-1]:
                t = time.perf_counter()
                await s.run(["/bin/true"])
                w0[k].append((time.perf_counter() - t) * 1e3)
        if a.w0:
            res["W0_ms"] = {k: round(statistics.median(v), 3) for k, v in w0.items()}
        w3: dict[str, list[float]] = {"blank": [], "clone": []}
        for i in range(a.w3):
            for k, s in pair if i % 2 else pair[::-1]:
                r = await s.run(["/usr/bin/python3", "w3.py"])
                w3[k].append(json.loads(r.stdout)["us_per_iter"])
        if a.w3:
            res["W3_us_per_iter"] = {k: round(statistics.median(v), 2) for k, v in w3.items()}
        socks: dict[str, list[list[float]]] = {"blank": [], "clone": []}
        for i in range(3 if a.sockets else 0):
            for k, s in pair if i % 2 else pair[::-1]:
                r = await s.run(["/usr/bin/python3", "-c", SOCKETS, str(a.sockets)])
                socks[k].append(json.loads(r.stdout))
        if a.sockets:
            res["sockets_us"] = {k: {"socket": round(statistics.median(x[0] for x in v), 1),
                                     "socketpair": round(statistics.median(x[1] for x in v), 1)}
                                 for k, v in socks.items()}
    rows = ("bare", *KINDS)
    for k in KINDS:  # (each policy's first sandboxes plan it and compile its filter)
        for _ in range(5):
            async with zviz.open_sandbox(pol(k)) as s:
                await s.run(["/bin/true"])
    fresh: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for blk in range(a.blocks):
        for k in rows if blk % 2 == 0 else rows[::-1]:
            c0 = cpu_ms()
            for _ in range(a.fresh):
                t = time.perf_counter()
                if k == "bare":
                    await trio.run_process(["/bin/true"])
                else:
                    async with zviz.open_sandbox(pol(k)) as s:
                        await s.run(["/bin/true"])
                fresh[k].append((time.perf_counter() - t) * 1e3)
            await trio.sleep(1.0)
            cpu[k].append((cpu_ms() - c0) / a.fresh)
    res["fresh_wall_ms"] = {k: round(statistics.median(v), 2) for k, v in fresh.items()}
    res["fresh_system_cpu_ms"] = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
    res["fresh_over_bare"] = {k: {"wall": round(res["fresh_wall_ms"][k] - res["fresh_wall_ms"]["bare"], 2),
                                  "cpu": round(res["fresh_system_cpu_ms"][k] - res["fresh_system_cpu_ms"]["bare"], 2)}
                              for k in KINDS}
    if a.bare and os.geteuid() == 0:
        res["bare_user_ns"] = bare(CLONE_NEWUSER, a.bare)
        res["bare_user_net_ns"] = bare(CLONE_NEWUSER | CLONE_NEWNET, a.bare)
    res["load_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--w0", type=int, default=400)
    ap.add_argument("--w3", type=int, default=10)
    ap.add_argument("--fresh", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--sockets", type=int, default=2000, help="socket()s and socketpair()s per sandbox, 0: none")
    ap.add_argument("--bare", type=int, default=300)
    args = ap.parse_args()
    trio.run(main, args)
