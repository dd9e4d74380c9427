#!/usr/bin/env python3
"""What the command line costs as a whole process, against the interpreter's own
start-up and a bare /bin/true, measured in the same run (interleaved).

    .venv/bin/python benchmarks/cli.py [-n 20] [--zviz .venv/bin/zviz] [--python .venv/bin/python] [--no-pyc]

Rows: `/bin/true`, `python -c pass` (the venv's interpreter), `zviz --help`,
`zviz run -- /bin/true` (start-up cache warm: the filter and the probe come
from it), and the same with an empty start-up cache (its first run on a host).
Each row: median wall and CPU (user+sys of the process and its children) in
ms, and the wall over `python -c pass` (the goal: `zviz --help` and `zviz run`
within 30 ms of it). By default the bytecode caches are used as an installed
package has them (they are written first); `--no-pyc` makes every process
compile every module from source (an empty PYTHONPYCACHEPREFIX), like a tree
whose .pyc files cannot be written.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", ".venv", "bin")


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
        "zviz run -- /bin/true": ([a.zviz, "run", "--", "/bin/true"], env),
        "  (empty start-up cache)": ([a.zviz, "run", "--", "/bin/true"], {**env, "ZVIZ_CACHE_DIR": ""}),
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}

    def fresh(e: dict[str, str]) -> dict[str, str]:  # "": a new empty cache directory for each run
        return e if e["ZVIZ_CACHE_DIR"] else {**e, "ZVIZ_CACHE_DIR": tempfile.mkdtemp(dir=scratch)}

    try:
        for argv, e in rows.values():  # warm-up (and fill the warm cache)
            one(argv, fresh(e))
        for _ in range(a.n):
            for name, (argv, e) in rows.items():
                samples[name].append(one(argv, fresh(e)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(w for w, _ in samples["python -c pass"])
    print(f"{'bytecode caches: ' + ('none (compiled from source)' if a.no_pyc else 'present'):<32}"
          f"{'wall ms':>9} {'cpu ms':>8} {'- python':>9} {'x python':>9}   (median of {a.n}, load "
          f"{os.getloadavg()[0]:.1f})")
    for name, s in samples.items():
        wall = statistics.median(w for w, _ in s)
        cpu = statistics.median(c for _, c in s)
        print(f"{name:<32}{wall:9.1f} {cpu:8.1f} {wall - base:+9.1f} {wall / base:9.2f}")
    print("goal: zviz --help and zviz run within 30 ms of python -c pass")


if __name__ == "__main__":
    main()
