"""Resource attacks: each is stopped by its limit while the host and other
sandboxes stay healthy. The dangerous ones run inside a guard (a cgroup v1
pids and memory limit around the whole test program, and a size-bounded tmpfs
as the workdir), so a sandbox that failed to stop them fails the test, not the
machine."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap

import pytest

from ..conftest import IS_ROOT

CG = "/sys/fs/cgroup"


def _guard_available():
    return IS_ROOT and os.path.isdir(f"{CG}/pids") and os.path.isdir(f"{CG}/memory")


needs_guard = pytest.mark.skipif(not _guard_available(), reason="needs root and cgroup v1 pids+memory for the guard")


@pytest.fixture
def guarded(attack_bin, tmp_path):
    """guarded(attack_argv, limits_kw) -> result dict; the whole program runs
    in a pids.max=400 / memory 1 GiB cgroup with a 256 MiB tmpfs workdir."""
    name = "zviz-test-" + secrets.token_hex(4)
    pids, mem = f"{CG}/pids/{name}", f"{CG}/memory/{name}"
    os.mkdir(pids)
    os.mkdir(mem)
    with open(f"{pids}/pids.max", "w") as f:
        f.write("400")
    with open(f"{mem}/memory.limit_in_bytes", "w") as f:
        f.write(str(1024**3))
    import pathlib
    import tempfile

    base = pathlib.Path(tempfile.mkdtemp(prefix="zviz-guard-"))
    os.chmod(base, 0o755)
    wd = base / "wd"
    wd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0777", "none", str(wd)], check=True)
    binary = base / "attack"
    binary.write_bytes(attack_bin)
    binary.chmod(0o755)

    def run(argv, limits, timeout=30):
        prog = textwrap.dedent(f"""
            import json, time, trio, zviz
            async def main():
                pol = zviz.Policy.python(limits=zviz.Limits(**{limits!r}))
                async with zviz.open_sandbox(pol, workdir={str(wd)!r}) as sb:
                    await sb.write_file("attack", open({str(binary)!r}, "rb").read(), mode=0o755)
                    r = await sb.run(["./attack", *{argv!r}], timeout={timeout})
                    # a neighbour sandbox must still work meanwhile-afterwards
                    async with zviz.open_sandbox(zviz.Policy.python()) as other:
                        ok = await other.run(["python3", "-c", "print('neighbour ok')"])
                    print(json.dumps({{"stdout": r.stdout[-2000:].decode(errors="replace"), "status": r.status,
                                       "signal": r.signal, "limit": r.limit, "timed_out": r.timed_out,
                                       "truncated": r.truncated, "len": len(r.stdout),
                                       "neighbour": ok.stdout.decode()}}))
            trio.run(main)
        """)

        def enter():
            for cg in (pids, mem):
                with open(f"{cg}/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))

        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout + 60,
                             preexec_fn=enter)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    yield run
    subprocess.run(["umount", "-l", str(wd)], check=False)
    shutil.rmtree(base, ignore_errors=True)
    for cg in (pids, mem):
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except OSError:
                import time

                time.sleep(0.1)


@needs_guard
def test_fork_bomb(guarded):
    r = guarded(["forkbomb"], {"processes": 64, "wall_s": 20})
    assert "forkbomb: stopped after" in r["stdout"], r
    n = int(r["stdout"].split("stopped after ")[1].split(":")[0])
    assert n < 64
    assert r["neighbour"] == "neighbour ok\n"


@needs_guard
def test_memory_bomb(guarded):
    r = guarded(["memory"], {"memory": "256M", "wall_s": 20})
    assert "memory: stopped at" in r["stdout"], r
    mib = int(r["stdout"].split("stopped at ")[1].split()[0])
    assert mib <= 256
    assert r["neighbour"] == "neighbour ok\n"


@needs_guard
def test_disk_fill_one_file(guarded):
    r = guarded(["disk", "."], {"file_size": "32M", "wall_s": 20})
    assert "disk: one file stopped at 32 MiB" in r["stdout"], r
    assert r["neighbour"] == "neighbour ok\n"


@needs_guard
def test_fd_exhaustion(guarded):
    r = guarded(["fds"], {"open_files": 64, "wall_s": 20})
    assert "fds: stopped after" in r["stdout"] and "Too many open files" in r["stdout"], r
    assert int(r["stdout"].split("stopped after ")[1].split(":")[0]) < 64


@needs_guard
def test_cpu_spin(guarded):
    r = guarded(["spin"], {"cpu_s": 1, "wall_s": 20})
    assert r["limit"] == "cpu_s" and not r["timed_out"], r
    r = guarded(["spin"], {"wall_s": 1})
    assert r["limit"] == "wall_s" and r["timed_out"] and r["status"] == 124


@needs_guard
def test_output_flood(guarded):
    r = guarded(["flood"], {"output": "1M", "wall_s": 20})
    assert r["truncated"] and r["limit"] == "output" and not r["timed_out"], r
    assert r["neighbour"] == "neighbour ok\n"


def test_private_tmp_is_bounded(attack):
    import zviz

    pol = zviz.Policy.python(fs=zviz.Filesystem(read_only=zviz.Policy.python().fs.read_only, tmp_size="8M"))
    r = attack("disk", "/tmp", policy=pol)
    assert "disk: one file stopped at 8 MiB" in r["stdout"] or "stopped at 7 MiB" in r["stdout"], r["stdout"]
