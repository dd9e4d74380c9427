"""The zygote (zviz/_zygote.py): one zviz-init per sandbox forks every command.
What a command could try against it: outlive its run, take its run-init
down first, freeze it, signal or read the zygote, reach the control socket,
feed the zygote garbage. Each test runs as the caller and as uid 65534."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import trio

import zviz

from ..conftest import record_loop_gaps, run_as

# A daemon: double fork, new session, stdio closed; after `delay` it writes
# `marker` into the workdir if it is still alive.
DAEMON = textwrap.dedent("""
    import os, sys, time
    def daemon(marker, delay):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for fd in (0, 1, 2):
                    os.close(fd)
                time.sleep(delay)
                open(marker, "w").write("alive")
                os._exit(0)
            os._exit(0)
        os.wait()
""")


def _count_procs() -> str:
    return "import os; print(len([p for p in os.listdir('/proc') if p.isdigit()]))"


def _j(r: zviz.RunResult) -> dict:
    """A picklable result (run_as returns across a fork), bytes kept."""
    d = r.to_json()
    d["stdout"], d["stderr"] = r.stdout, r.stderr
    return d


def _scenario(first: str, timeout: float):
    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            zpid = None
            r1 = await sb.run(["python3", "-c", DAEMON + first], timeout=timeout)
            zpid = sb._zygote.pid if sb._zygote else None
            await trio.sleep(1.5)  # past the daemon's delay
            marker = os.path.exists(os.path.join(sb.workdir, "marker"))
            r2 = await sb.run(["python3", "-c", _count_procs()])
            same_zygote = sb._zygote is not None and sb._zygote.pid == zpid
            return _j(r1), marker, _j(r2), same_zygote
    return trio.run(main)


def test_daemon_does_not_outlive_its_run(identity):
    r1, marker, r2, same = run_as(identity, _scenario, "daemon('marker', 1.0); print('left')", 20.0)
    assert r1['stdout'] == b"left\n" and r1['status'] == 0
    assert not marker, "a daemon of an ended run was still alive"
    assert r2['stdout'] == b"3\n"  # zygote, this run's zviz-init, the program: nothing left over
    assert same


def test_program_kills_its_zviz_init_first(identity):
    # SIGKILL to its own run-init: its orphans go to the zygote, which kills them.
    first = "daemon('marker', 1.0); os.kill(os.getppid(), 9); time.sleep(30)"
    r1, marker, r2, same = run_as(identity, _scenario, first, 20.0)
    assert not r1['timed_out'] and r1['signal'] == signal.SIGKILL and r1['wall_s'] < 5
    assert not marker
    assert r2['stdout'] == b"3\n"
    assert same


def test_program_freezes_its_zviz_init(identity):
    # SIGSTOP to its run-init, then exit: the run cannot end by itself; the
    # timeout kills the frozen run-init and the zygote the rest.
    # (the daemon's delay runs past the timeout: it is the run's until then)
    first = "daemon('marker', 3.0); os.kill(os.getppid(), 19)"
    r1, marker, r2, same = run_as(identity, _scenario, first, 2.0)
    assert r1['timed_out'] and r1['limit'] == "wall_s"
    assert not marker
    assert r2['stdout'] == b"3\n"
    assert same


def test_zygote_cannot_be_signalled_or_read(identity):
    probe = textwrap.dedent("""
        import os, signal
        out = []
        for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGSEGV):
            try:
                os.kill(1, sig); out.append("sent")
            except OSError as e:
                out.append(type(e).__name__)
        for path in ("/proc/1/mem", "/proc/1/environ", "/proc/1/maps", "/proc/2/environ"):
            try:
                open(path, "rb").read(16); out.append("READ " + path)
            except OSError as e:
                out.append(type(e).__name__)
        for path in ("/proc/1/fd", "/proc/2/fd"):
            try:
                out.append("LISTED %s %s" % (path, os.listdir(path)))
            except OSError as e:
                out.append(type(e).__name__)
        print(out)
    """)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            r = await sb.run(["python3", "-c", probe])
            zpid = sb._zygote.pid
            r2 = await sb.run(["python3", "-c", "print('still serving')"])
            return _j(r), _j(r2), zpid == sb._zygote.pid, zviz_alive(zpid)

    def zviz_alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    r, r2, same, alive = run_as(identity, trio.run, main)
    assert r["status"] == 0, r["stderr"]
    out = r["stdout"].decode()
    assert "READ" not in out and "LISTED" not in out, out
    # signals to pid 1 are accepted and dropped: the zygote has no handlers
    assert r2['stdout'] == b"still serving\n" and same and alive


def test_program_holds_no_zygote_fd(identity):
    probe = ("import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            return _j(await sb.run(["python3", "-c", probe]))

    r = run_as(identity, trio.run, main)
    assert r["stdout"] == b"[0, 1, 2, 3]\n"  # stdio and listdir's own


def test_garbage_on_the_control_socket_replaces_the_zygote(identity):
    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            assert (await sb.run(["true"])).ok
            old = sb._zygote
            old._ctrl.sendall(b"\xff" * 4096)  # a bad magic: the zygote hangs up
            r = await sb.run(["python3", "-c", "print('ok')"])
            return _j(r), old.pid, sb._zygote.pid

    r, old_pid, new_pid = run_as(identity, trio.run, main)
    assert r["stdout"] == b"ok\n"
    assert old_pid != new_pid
    try:  # the old zygote is dead and reaped (no zombie left to us)
        os.waitpid(old_pid, os.WNOHANG)
        raise AssertionError("old zygote still our child")
    except ChildProcessError:
        pass


def test_concurrent_runs_keep_their_own_denials(identity):
    denied = "import socket\ntry: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\nexcept OSError: pass\nprint('d')"
    quiet = "import time; time.sleep(0.3); print('q')"

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            results = {}

            async def one(i: int) -> None:
                results[i] = await sb.run(["python3", "-c", denied if i % 2 else quiet])

            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(one, i)
            return {i: _j(r) for i, r in results.items()}, sb.statistics().denials_total

    results, total = run_as(identity, trio.run, main)
    for i, r in results.items():
        assert r["status"] == 0, r["stderr"]
        if i % 2:
            assert r["stdout"] == b"d\n" and sum(r["denials"].values()) >= 1, r["denials"]
        else:
            assert r["stdout"] == b"q\n" and not r["denials"], r["denials"]
    assert total == sum(sum(r["denials"].values()) for r in results.values())


def test_limits_of_the_zygote_are_out_of_reach(identity):
    # Same uid as the zygote: without the filter's pid-0 rule, prlimit64(1)
    # would lower its limits (no fds, no forks) and break later commands.
    probe = textwrap.dedent("""
        import resource
        out = []
        for pid in (1, 2):
            try:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (0, 0)); out.append("LOWERED %d" % pid)
            except OSError as e:
                out.append(type(e).__name__)
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))  # its own: fine
        out.append(resource.prlimit(0, resource.RLIMIT_NOFILE))
        print(out)
    """)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            r = await sb.run(["python3", "-c", probe])
            r2 = await sb.run(["python3", "-c", "print('next')"])
            return _j(r), _j(r2)

    r, r2 = run_as(identity, trio.run, main)
    # refused (EPERM: another task, as the kernel would say), reported
    assert r["stdout"] == b"['PermissionError', 'PermissionError', (100, 100)]\n", r
    assert r["denials"].get("prlimit64") == 2
    assert r2["stdout"] == b"next\n"


def test_a_regrowing_chain_does_not_outlive_its_command(attack_bin, identity):
    # attack.c "conveyor": spinning inner nodes, a leaf that forks whenever a
    # slot frees. Killing direct children one generation at a time never
    # caught it (the command outlived its timeout, kept the CPUs busy and the
    # sandbox's process quota full): the run-init freezes the whole tree first.
    async def main():
        pol = zviz.Policy.python(limits=zviz.Limits(processes=48))
        async with zviz.open_sandbox(pol) as sb:
            await sb.write_file("attack", attack_bin, mode=0o755)
            r = await sb.run(["./attack", "conveyor"], timeout=3)
            alive = os.path.join(sb.workdir, "alive")
            await trio.sleep(0.2)
            before = os.stat(alive).st_mtime_ns if os.path.exists(alive) else None
            await trio.sleep(1.0)
            after = os.stat(alive).st_mtime_ns if os.path.exists(alive) else None
            r2 = await sb.run(["python3", "-c", "import os\nn = len([p for p in os.listdir('/proc') if p.isdigit()])\n"
                               "pid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0); print(n)"], timeout=20)
            return _j(r), before, after, _j(r2)

    r, before, after, r2 = run_as(identity, trio.run, main)
    assert r["wall_s"] < 10, r  # the command ended (3 s: the main process exits, its chain runs on)
    assert before == after, "the chain was still writing its marker after the command ended"
    assert r2["status"] == 0 and r2["stdout"] == b"3\n", r2  # nothing left over, and forks work again


def test_a_starved_zygote_does_not_block_the_event_loop(monkeypatch):
    # The zygote runs among the sandbox's processes, which can starve it. The
    # supervisor waits for its reply as a checkpoint, bounded, and replaces it.
    from zviz import _zygote

    monkeypatch.setattr(_zygote, "REPLY_TIMEOUT", 1.0)

    async def main():
        gaps: list[float] = []

        async with zviz.open_sandbox(zviz.Policy.python()) as sb, trio.open_nursery() as n:
            assert (await sb.run(["true"])).ok
            old = sb._zygote.pid
            os.kill(old, signal.SIGSTOP)  # from the host: the worst starvation there is
            n.start_soon(record_loop_gaps, gaps, 0.02)
            t0 = time.monotonic()
            r = await sb.run(["python3", "-c", "print('served')"])
            took = time.monotonic() - t0
            n.cancel_scope.cancel()
            return r.stdout, took, max(gaps), old, sb._zygote.pid

    out, took, worst_gap, old, new = trio.run(main)
    assert out == b"served\n"
    assert 1.0 <= took < 5.0
    assert worst_gap < 0.5, f"the event loop stalled for {worst_gap:.2f} s"
    assert new != old


def test_priority_and_affinity_of_the_zygote_are_out_of_reach(identity):
    probe = textwrap.dedent("""
        import os
        out = []
        for f in (lambda: os.setpriority(os.PRIO_PROCESS, 1, 19), lambda: os.setpriority(os.PRIO_USER, 0, 19),
                  lambda: os.setpriority(os.PRIO_PGRP, 0, 19),
                  lambda: os.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0)),
                  lambda: os.sched_setaffinity(1, {0}),
                  lambda: os.sched_setaffinity(0, {0}), lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)):
            try:
                f(); out.append("ok")
            except OSError as e:
                out.append("refused")
        print(out)
    """)
    check = ("import os; print(os.getpriority(os.PRIO_PROCESS, 0), len(os.sched_getaffinity(0)), os.cpu_count(), "
             "os.sched_getscheduler(0))")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            r = await sb.run(["python3", "-c", probe])
            r2 = await sb.run(["python3", "-c", check])
            return _j(r), _j(r2)

    r, r2 = run_as(identity, trio.run, main)
    # renicing pid 1, the uid or the group: refused; pinning pid 1 is allowed by
    # the kernel (same uid) but not handed on; its own nice and affinity: fine
    assert r["stdout"] == b"['refused', 'refused', 'refused', 'refused', 'ok', 'ok', 'ok']\n", r
    nice, cpus, count, policy = r2["stdout"].split()
    assert nice == b"0" and cpus == count and policy == b"0", r2  # SCHED_OTHER


def test_deep_denials_are_the_commands(identity):
    deep = textwrap.dedent("""
        import os, socket
        def go(n):
            if n == 0:
                try:
                    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                except OSError:
                    pass
                os._exit(0)
            pid = os.fork()
            if pid == 0:
                go(n - 1)
            os.waitpid(pid, 0)
            os._exit(0)
        go(70)
    """)

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            return _j(await sb.run(["python3", "-c", deep], timeout=60))

    r = run_as(identity, trio.run, main)
    assert r["denials"] == {"socket": 1}, r


def test_another_commands_pids_do_not_hide_a_command_from_cleanup(attack_bin, identity):
    # Found by a second review: the pass read at most 8192 processes, the
    # lowest pids first, so command B holding 8300 (zombies) hid command A's
    # daemon: A's run-init never saw it, and it lived until the sandbox closed.
    async def main():
        pol = zviz.Policy.python(limits=zviz.Limits(processes=9000))
        async with zviz.open_sandbox(pol) as sb, trio.open_nursery() as n:
            await sb.write_file("attack", attack_bin, mode=0o755)
            ready = os.path.join(sb.workdir, "zready")
            n.start_soon(lambda: sb.run(["./attack", "zombies", "8300", "6"], timeout=60))
            with trio.fail_after(30):
                while not os.path.exists(ready):
                    await trio.sleep(0.05)
            t0 = time.monotonic()
            r = await sb.run(["./attack", "daemon"], timeout=10)
            took = time.monotonic() - t0
            alive = os.path.join(sb.workdir, "alive")
            await trio.sleep(0.3)
            before = os.stat(alive).st_mtime_ns if os.path.exists(alive) else None
            await trio.sleep(0.6)
            after = os.stat(alive).st_mtime_ns if os.path.exists(alive) else None
            return _j(r), took, before, after

    r, took, before, after = run_as(identity, trio.run, main)
    assert r["status"] == 0 and not r["timed_out"] and took < 5, (r, took)
    assert before == after, "command A's daemon outlived it"


def test_nothing_of_a_killed_command_is_left_when_run_returns(identity):
    # After a timeout the run-init is SIGKILLed and the zygote kills what it
    # left; run() returns only after the zygote says so (a barrier). Checked
    # from the host the moment run() returns: the sandbox's pid namespace
    # holds the zygote alone.
    daemon = textwrap.dedent("""
        import os, time, signal
        if os.fork() == 0:
            os.setsid()
            for fd in (0, 1, 2):
                os.close(fd)
            time.sleep(100)
        time.sleep(0.3)
        os.kill(os.getppid(), signal.SIGSTOP)  # its run-init cannot clean up
    """)

    async def main():
        out = []
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            for _ in range(5):
                r = await sb.run(["python3", "-c", daemon], timeout=1)
                ns = os.readlink(f"/proc/{sb._zygote.pid}/ns/pid")
                left = []
                for p in os.listdir("/proc"):
                    if p.isdigit():
                        try:
                            if os.readlink(f"/proc/{p}/ns/pid") == ns:
                                left.append(int(p))
                        except OSError:
                            pass
                out.append((r.timed_out, sorted(left) == [sb._zygote.pid]))
        return out

    out = run_as(identity, trio.run, main)
    assert out == [(True, True)] * 5, out


def test_a_resumer_cannot_stretch_the_cleanup(attack_bin, identity):
    # Found by a third review: command A keeps SIGCONTing everything while
    # command B times out; B's orphans never all stopped, the zygote spent 200
    # slow freeze rounds on them, and B's run(timeout=2) returned after ~12 s
    # (the reply timeout, then the zygote was replaced and A died with it).
    # Now every pass kills what is already stopped, and freezing ends 100 ms
    # into a cleanup.
    async def main():
        pol = zviz.Policy.python(limits=zviz.Limits(processes=256))
        async with zviz.open_sandbox(pol) as sb, trio.open_nursery() as n:
            await sb.write_file("attack", attack_bin, mode=0o755)
            a_result = []

            async def resumer() -> None:
                a_result.append(await sb.run(["./attack", "sigcont", "40"], timeout=8))

            n.start_soon(resumer)
            await trio.sleep(1.0)
            zpid = sb._zygote.pid
            t0 = time.monotonic()
            r = await sb.run(["./attack", "sleepers", "60"], timeout=2)
            took = time.monotonic() - t0
            same = sb._zygote is not None and sb._zygote.pid == zpid
            a_alive = not a_result
            n.cancel_scope.cancel()
        return _j(r), took, same, a_alive

    r, took, same, a_alive = run_as(identity, trio.run, main)
    assert r["timed_out"] and took < 6.0, (r, took)  # 2 s, plus a loaded machine; ~12 s before
    assert same and a_alive  # no zygote replaced, the other command untouched
