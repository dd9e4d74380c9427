"""Benign controls: what ordinary agent code does keeps working under the
default policies (a sandbox that blocks everything would pass every attack)."""

import json

import trio

import zviz

from ..conftest import run_as

SNIPPET = r"""
import csv, io, json, os, sqlite3, subprocess, sys, tempfile, threading, hashlib, zlib, random, statistics
import concurrent.futures, decimal, datetime, re, textwrap, pathlib, shutil
out = {}
con = sqlite3.connect("db.sqlite"); con.execute("create table t(x)"); con.execute("insert into t values (1)")
out["sqlite"] = con.execute("select sum(x) from t").fetchone()[0]; con.commit(); con.close()
out["sub"] = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True).stdout
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    out["threads"] = sum(ex.map(lambda x: x * x, range(10)))
with tempfile.NamedTemporaryFile("w", delete=False) as f:
    f.write("tmp"); name = f.name
out["tmp"] = open(name).read()
out["tmpdir"] = tempfile.gettempdir()
pathlib.Path("sub/dir").mkdir(parents=True); shutil.copy("db.sqlite", "sub/dir/copy")
out["files"] = sorted(os.listdir("."))
out["stdin"] = sys.stdin.read()
out["hash"] = hashlib.sha256(b"x").hexdigest()[:8]
out["cpu"] = os.cpu_count() is not None
print(json.dumps(out))
"""


def _benign():
    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            r = await sb.run(["python3", "-c", SNIPPET], stdin=b"in")
            sh = await sb.run(["sh", "-c", "echo a | tr a b; ls / | sort | tr '\\n' ' '; cat < /dev/null; "
                                           "echo $((1+2)) > /dev/null"])
            mp = await sb.run(["python3", "-c", "import multiprocessing as m\n"
                               "if __name__ == '__main__':\n"
                               "    with m.get_context('fork').Pool(2) as p: print(sum(p.map(abs, [-1, -2])))"])
            return r.status, r.stdout, r.stderr, sh.stdout, sh.status, mp.stdout, mp.stderr
    return trio.run(main)


def test_benign_workload(identity):
    status, out, err, sh, sh_status, mp, mp_err = run_as(identity, _benign)
    assert status == 0, err
    d = json.loads(out)
    assert d["sqlite"] == 1 and d["sub"] == "child\n" and d["threads"] == 285
    assert d["tmp"] == "tmp" and d["tmpdir"] == "/tmp" and d["stdin"] == "in" and d["cpu"]
    assert d["files"] == ["db.sqlite", "sub"]
    assert sh_status == 0 and sh.startswith(b"b\n")
    assert b"usr" in sh and b"etc" in sh and b"root" not in sh.split()  # the root holds only the policy's paths
    assert mp == b"3\n", mp_err
