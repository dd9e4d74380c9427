"""Processes and information: host processes stay alive and invisible, the
host environment stays private."""

import os
import subprocess
import sys
import textwrap

import pytest

from ..conftest import IS_ROOT


def test_signal_a_host_process(attack):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        r = attack("kill", str(victim.pid))
        assert "kill: FAILED" in r["stdout"]  # no such pid in the sandbox's pid namespace
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.skipif(not IS_ROOT, reason="needs root for the throwaway pid namespace guard")
def test_kill_minus_one_in_a_throwaway_namespace(attack_bin, tmp_path):
    """kill(-1, SIGKILL) from the sandbox. Run inside a throwaway pid
    namespace so that even a broken sandbox could only hit the test's own
    victim, which must survive."""
    binary = tmp_path / "attack"
    binary.write_bytes(attack_bin)
    prog = textwrap.dedent(f"""
        import subprocess, trio, zviz
        victim = subprocess.Popen(["sleep", "60"])
        async def main():
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                await sb.write_file("attack", open({str(binary)!r}, "rb").read(), mode=0o755)
                r = await sb.run(["./attack", "killall"])
                print(r.stdout.decode().strip())
        trio.run(main)
        print("victim alive:", victim.poll() is None)
        victim.kill()
    """)
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", prog],
                         capture_output=True, text=True, timeout=60)
    assert "victim alive: True" in out.stdout, out.stdout + out.stderr


def test_host_environment_is_not_visible(attack, monkeypatch):
    monkeypatch.setenv("ZVIZ_HOST_SECRET", "hunter2")
    r = attack("read", "/proc/self/environ")
    assert "hunter2" not in r["stdout"]
    r = attack("read", "/proc/1/environ")
    assert "hunter2" not in r["stdout"]


def test_host_process_list_is_not_visible(attack):
    import trio

    import zviz

    from ..conftest import run_as

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            r = await sb.run(["python3", "-c", "import os; "
                                              "print(sorted((int(p), open(f'/proc/{p}/comm').read().strip()) "
                              "for p in os.listdir('/proc') if p.isdigit()))"])
            return r.stdout

    # Only the sandbox's own: its zygote (pid 1), this run's zviz-init (the
    # program's subreaper), the program.
    out = run_as(attack.identity, trio.run, main)
    assert out == b"[(1, '_zviz_init'), (2, '_zviz_init'), (3, 'python3')]\n", out
    assert os.getpid() > 3
