#!/usr/bin/env python3
"""What the command line costs as a whole process, against the interpreter's own
start-up and a bare /bin/true, measured in the same run (interleaved).

    .venv/bin/python benchmarks/cli.py [-n 20] [--zviz .venv/bin/zviz] [--python .venv/bin/python] [--no-pyc]

Rows: `/bin/true`, `python -c pass` (the venv's interpreter), `zviz --help`,
`zviz run -- /bin/true` through the CLI server (the default: zviz/_cliserver.py;
the server is started by the warm-up), the same with the server's pool off
(`ZVIZ_POOL_SIZE=0`), in its own process (`ZVIZ_SERVER=0`, start-up cache
warm: the filter and the probe come from it), and in its own process with an
empty start-up cache (its first run on a host). Each row: median wall and CPU
(user+sys of the process and its children) in ms, the server's CPU for that
run (user+sys of the server and the sandboxes it reaped: what the client
costs elsewhere), and the wall over `python -c pass` (the goal: `zviz --help`
and `zviz run` within 30 ms of it). By default the bytecode caches are used as an installed
package has them (they are written first); `--no-pyc` makes every process
compile every module from source (an empty PYTHONPYCACHEPREFIX), like a tree
whose .pyc files cannot be written.
"""

import argparse
import contextlib
import os
import signal
import shutil
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", ".venv", "bin")


def server_cpu_ms(pid: int) -> float:
    """CPU of a process and its reaped children so far (utime, stime, cutime, cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")


def server_pid(python: str, env: dict[str, str]) -> int:
    """The pid of the CLI server of `env`'s context (started by the warm-up runs)."""
    name = subprocess.run([python, "-c", "import zviz._cliclient as c; print(c.name_of(c.key()))"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    lock = os.path.join(env["ZVIZ_CACHE_DIR"], "srv", name + ".lock")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), open(lock) as f:
            text = f.read()
            if text.isdigit():
                return int(text)
        time.sleep(0.05)
    raise SystemExit(f"no CLI server for {name} (see {lock[:-5]}.log)")


def one(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, cpu ms) of one run."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = (time.perf_counter() - t) * 1000
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{argv} exited with {p.returncode}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20, help="runs of each row (interleaved)")
    ap.add_argument("--zviz", default=os.path.join(VENV, "zviz"))
    ap.add_argument("--python", default=os.path.join(VENV, "python"))
    ap.add_argument("--no-pyc", action="store_true", help="no bytecode caches: every module compiled from source")
    a = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="zviz-bench-cli-")
    warm = os.path.join(scratch, "cache")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["ZVIZ_CACHE_DIR"] = warm
    if a.no_pyc:
        env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=os.path.join(scratch, "no-pyc"))
    else:  # write the bytecode caches, as installing the package does
        subprocess.run([a.python, "-m", "compileall", "-q", os.path.dirname(os.path.dirname(a.python))],
                       stdout=subprocess.DEVNULL, env=env, check=False)
    rows: dict[str, tuple[list[str], dict[str, str]]] = {
        "/bin/true": (["/bin/true"], env),
        "python -c pass": ([a.python, "-c", "pass"], env),
        "zviz --help": ([a.zviz, "--help"], env),
        "zviz run -- /bin/true": ([a.zviz, "run", "--", "/bin/true"], {**env, "ZVIZ_SERVER": "1"}),
        "  (server without a pool)": ([a.zviz, "run", "--", "/bin/true"],
                                      {**env, "ZVIZ_SERVER": "1", "ZVIZ_POOL_SIZE": "0"}),
        "  (in its process)": ([a.zviz, "run", "--", "/bin/true"], {**env, "ZVIZ_SERVER": "0"}),
        "  (in its process, empty cache)": ([a.zviz, "run", "--", "/bin/true"],
                                            {**env, "ZVIZ_SERVER": "0", "ZVIZ_CACHE_DIR": ""}),
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    served: dict[str, list[float]] = {}
    servers: dict[str, int] = {}

    def fresh(e: dict[str, str]) -> dict[str, str]:  # "": a new empty cache directory for each run
        return e if e["ZVIZ_CACHE_DIR"] else {**e, "ZVIZ_CACHE_DIR": tempfile.mkdtemp(dir=scratch)}

    try:
        for _ in range(3):  # warm-up: fill the warm cache, start the servers, fill their pools
            for argv, e in rows.values():
                one(argv, fresh(e))
        for name, (_argv, e) in rows.items():
            if e.get("ZVIZ_SERVER") == "1":
                servers[name] = server_pid(a.python, e)
                served[name] = []
        for _ in range(a.n):
            for name, (argv, e) in rows.items():
                pid = servers.get(name)
                before = server_cpu_ms(pid) if pid else 0.0
                samples[name].append(one(argv, fresh(e)))
                if pid:
                    time.sleep(0.01)  # (the server's pool refills once its loop is idle: counted here)
                    served[name].append(server_cpu_ms(pid) - before)
    finally:
        for pid in servers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(w for w, _ in samples["python -c pass"])
    base_cpu = statistics.median(c for _, c in samples["python -c pass"])
    print(f"{'bytecode caches: ' + ('none (compiled from source)' if a.no_pyc else 'present'):<34}"
          f"{'wall ms':>9} {'cpu ms':>8} {'server':>8} {'- python':>9} {'cpu-py':>8}   (median of {a.n}, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, s in samples.items():
        wall = statistics.median(w for w, _ in s)
        cpu = statistics.median(c for _, c in s)
        srv = statistics.mean(served[name]) if name in served else 0.0
        print(f"{name:<34}{wall:9.1f} {cpu:8.1f} {srv:8.1f} {wall - base:+9.1f} {cpu + srv - base_cpu:+8.1f}")
    print("server: the server's CPU per run (mean; clock ticks), cpu-py: cpu + server - python's cpu")
    print("goal: zviz --help and zviz run within 30 ms of python -c pass")


if __name__ == "__main__":
    main()
