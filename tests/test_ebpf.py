"""The eBPF monitor: attribution per sandbox, fork tracking, denials, SIGSYS
kills, a shared monitor, and a clear error where it cannot run."""

import os
import subprocess
import sys

import pytest
import trio

import zviz
import zviz.ebpf

from .conftest import run_as

AVAILABLE, WHY = zviz.ebpf.status()
needs_ebpf = pytest.mark.skipif(not AVAILABLE, reason=f"eBPF monitor unavailable here: {WHY}")
PYP = zviz.Policy.python()


@needs_ebpf
@pytest.mark.trio
async def test_only_the_trace_monitor_has_the_sys_enter_probe():
    # an enabled raw_syscalls tracepoint costs every call on the host: a
    # plain monitor attaches sys_exit alone
    async with zviz.ebpf.open_monitor() as mon:
        assert set(mon._bpf.tracepoint_fds) >= {b"raw_syscalls:sys_exit"}
        assert b"raw_syscalls:sys_enter" not in mon._bpf.tracepoint_fds
        with pytest.raises(RuntimeError):
            mon.set_trace(True)
    async with zviz.ebpf.open_monitor(_trace=True) as mon:
        assert b"raw_syscalls:sys_enter" in mon._bpf.tracepoint_fds
        mon.set_trace(True)


@needs_ebpf
@pytest.mark.trio
async def test_counts_the_whole_tree_and_nothing_else():
    async with (zviz.ebpf.open_monitor() as mon, zviz.open_sandbox(PYP, monitor=mon) as a,
                zviz.open_sandbox(PYP, monitor=mon) as b):
            await a.run(["python3", "-c", "import os\nfor _ in range(500): os.getppid()\n"
                         "pid = os.fork()\nif pid == 0:\n    [os.getppid() for _ in range(300)]; os._exit(0)\n"
                         "os.waitpid(pid, 0)"])
            await b.run(["python3", "-c", "import os; [os.getppid() for _ in range(7)]"])
            for _ in range(50):  # the supervisor itself is never counted
                os.getppid()
            sa, sb_ = a.statistics().syscalls, b.statistics().syscalls
    assert sa["getppid"] == 800  # parent 500 + forked child 300
    assert sb_["getppid"] == 7
    assert "mount" not in sa and "pivot_root" not in sa  # the stage's own setup is not the program's
    # nor the zygote's (it waits on a signalfd and receives each request) or its run-init's (prctl)
    assert "signalfd4" not in sa and "recvmsg" not in sa and "prctl" not in sa, sa
    assert sa["execve"] >= 1 and sa["openat"] > 10


@needs_ebpf
@pytest.mark.trio
async def test_denials_and_sigsys_kills_become_events(tmp_path):
    src = tmp_path / "x32.c"
    src.write_text('int main(void){ long r; __asm__ volatile("syscall" : "=a"(r) : "a"(39L | 0x40000000L)'
                   ' : "rcx", "r11", "memory"); return 0; }\n')
    subprocess.run(["cc", "-o", str(tmp_path / "x32"), str(src)], check=True)
    async with zviz.open_sandbox(PYP, monitor=True) as sb:
        await sb.write_file("x32", (tmp_path / "x32").read_bytes(), mode=0o755)
        r = await sb.run(["./x32"])
        assert r.signal == 31
        r = await sb.run(["python3", "-c", "try: open('/etc/shadow')\nexcept OSError: pass"])
        events = sb.events_so_far()
        errors = sb.syscall_errors()
    kills = [e for e in events if e.source == "ebpf" and "killed" in e.detail]
    assert kills and kills[0].syscall == "x32:getpid"  # the x32 call is not misnamed as native getpid
    assert any(e.source == "ebpf" and e.syscall == "openat" and e.errno == 13 for e in events)
    assert errors[("openat", "EACCES")] >= 1


def test_without_root_it_says_what_is_missing():
    # as root: checked as uid 65534; as an unprivileged user: here
    identity = "nobody" if os.geteuid() == 0 else "self"
    if identity == "nobody":
        from .conftest import _warm_up

        _warm_up()

    def scenario():
        ok, why = zviz.ebpf.status()

        async def main():
            try:
                async with zviz.open_sandbox(PYP, monitor=True):
                    pass
            except zviz.FeatureUnavailable as e:
                return str(e)
            return "no error"
        return ok, why, trio.run(main)

    ok, why, err = run_as(identity, scenario)
    assert not ok and "root" in why
    assert "needs root" in err and "Fix:" in err


def test_import_does_not_load_bcc():
    out = subprocess.run([sys.executable, "-c", "import zviz.ebpf, sys; print('bcc' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_check_reports_the_monitor():
    out = subprocess.run([sys.executable, "-m", "zviz._cli", "check"], capture_output=True, text=True)
    assert "eBPF monitor (bcc)" in out.stdout
