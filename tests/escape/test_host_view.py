"""The sandbox's view of the host (issue 16, items 11 and 13).

Item 11: a listed path is checked on its real path and bound following no
symlink, so a link to `/` (planted, or swapped in after the check) never
gives the sandbox the host's root. Item 13: host facts a container runtime
masks are empty inside, and the sandbox's root is not its to change.

Host-side evidence: the marker the sandbox tries to write into the host's
/var/tmp does not appear; the host's own cmdline, machine-id and boot id are
not in the sandbox's output; the host's / is unchanged."""

from __future__ import annotations

import os
import secrets
import shutil
import threading

import pytest
import trio

import zviz

from ..conftest import IS_ROOT

VAR_TMP = "/var/tmp"


@pytest.fixture
def host_dir(tmp_path_factory):
    base = "/opt" if IS_ROOT and os.path.isdir("/opt") else str(tmp_path_factory.mktemp("host"))
    d = os.path.join(base, "zviz-view-" + secrets.token_hex(4))
    os.mkdir(d)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _write_via(policy: zviz.Policy, target: str) -> tuple[str, str | None]:
    """Open a sandbox with `policy` and try to write `target`; returns
    (what happened, the error's class name if open/run was refused)."""
    async def main() -> tuple[str, str | None]:
        try:
            async with zviz.open_sandbox(policy) as sb:
                r = await sb.run(["sh", "-c", f"echo pwned > {target} && echo WROTE"])
                return r.stdout.decode() + r.stderr.decode(), None
        except (zviz.PolicyError, zviz.SandboxSetupError) as e:
            return str(e), type(e).__name__
    return trio.run(main)


def test_symlink_to_root_is_not_bound_read_write(host_dir):
    """`--rw DIR/link` with link -> /: before, the sandbox wrote into the host's
    /var/tmp (as nobody). Now the real path is checked: refused."""
    link = os.path.join(host_dir, "link")
    os.symlink("/", link)
    marker = f"zviz-pwned-{secrets.token_hex(4)}"
    out, refused = _write_via(zviz.Policy.shell().with_paths(read_write=[link]), f"{link}{VAR_TMP}/{marker}")
    try:
        assert not os.path.exists(f"{VAR_TMP}/{marker}"), out  # host side: nothing written
        assert refused == "PolicyError" and "-> /" in out, out
    finally:
        with contextlib_suppress():
            os.unlink(f"{VAR_TMP}/{marker}")


def test_symlink_to_a_system_dir_or_below_proc_is_refused(host_dir):
    for target in ("/etc", "/usr", "/proc/sys", "/dev"):
        link = os.path.join(host_dir, "l" + secrets.token_hex(2))
        os.symlink(target, link)
        out, refused = _write_via(zviz.Policy.shell().with_paths(read_write=[link]), f"{link}/x")
        assert refused == "PolicyError", (target, out)
    # and a read-only link to '/' (the whole host without saying so)
    link = os.path.join(host_dir, "ro-root")
    os.symlink("/", link)
    out, refused = _write_via(zviz.Policy.shell().with_paths(read_only=[link]), "/dev/null")
    assert refused == "PolicyError", out


@pytest.mark.parametrize("zygote", [False, True], ids=["spawn-per-command", "zygote"])
def test_link_swapped_in_after_the_check_is_not_followed(host_dir, zygote):
    """The listed path is a real directory when open_sandbox checks it and a
    link to / when the stage binds it. Before, the stage re-resolved the path
    string and bound the host's root. Without a zygote the stage binds it at
    the command, after the swap: it must refuse (ELOOP). With one, the
    zygote's spawn begins in open_sandbox (round 15) and binds it a moment
    later, before or after the swap: it refuses, or it bound the real
    directory (renamed away: no var/tmp in it). Never the host's root."""
    from zviz._sandbox import _open_sandbox

    sub = os.path.join(host_dir, f"sub-{int(zygote)}")
    os.mkdir(sub)
    os.chmod(sub, 0o777)
    marker = f"zviz-pwned-{secrets.token_hex(4)}"

    async def main() -> tuple[str, str | None]:
        try:
            async with _open_sandbox(zviz.Policy.shell().with_paths(read_write=[sub]), zygote=zygote) as sb:
                os.rename(sub, sub + ".real")
                os.symlink("/", sub)
                r = await sb.run(["sh", "-c", f"echo pwned > {sub}{VAR_TMP}/{marker} && echo WROTE"])
                return r.stdout.decode() + r.stderr.decode(), None
        except zviz.SandboxSetupError as e:
            return str(e), type(e).__name__

    try:
        out, refused = trio.run(main)
        assert not os.path.exists(f"{VAR_TMP}/{marker}"), out
        refused_here = (refused == "SandboxSetupError" and "ELOOP" in out) or "loop" in out.lower()
        if zygote:
            assert refused_here or ("WROTE" not in out and "nonexistent" in out.lower()), out
        else:
            assert refused_here, out
    finally:
        with contextlib_suppress():
            os.unlink(f"{VAR_TMP}/{marker}")


def _exchange(a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def test_link_flipping_race(host_dir):
    """A host thread swaps the listed path between a directory and a link to /
    (atomically, renameat2 RENAME_EXCHANGE) while sandboxes open and write
    through it: every run writes into the real directory or is refused; the
    host's /var/tmp never gets the marker."""
    sub = os.path.join(host_dir, "flip")
    other = os.path.join(host_dir, "other")
    os.makedirs(os.path.join(sub, "var", "tmp"))
    for d in (sub, os.path.join(sub, "var"), os.path.join(sub, "var", "tmp")):
        os.chmod(d, 0o777)
    os.symlink("/", other)
    stop = threading.Event()
    marker = f"zviz-pwned-{secrets.token_hex(4)}"

    def flipper() -> None:
        import random
        import time

        while not stop.is_set():
            _exchange(sub, other)
            time.sleep(random.uniform(0, 0.003))

    t = threading.Thread(target=flipper, daemon=True)
    outcomes: dict[str, int] = {}

    async def main() -> None:
        for _ in range(60):
            try:
                async with zviz.open_sandbox(zviz.Policy.shell().with_paths(read_write=[sub])) as sb:
                    r = await sb.run(["sh", "-c", f"echo pwned > {sub}{VAR_TMP}/{marker} && echo WROTE"])
                    key = "wrote-inside" if b"WROTE" in r.stdout else "ran"
            except (zviz.PolicyError, zviz.SandboxSetupError) as e:
                key = type(e).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

    t.start()
    try:
        trio.run(main)
    finally:
        stop.set()
        t.join()
        leaked = os.path.exists(f"{VAR_TMP}/{marker}")
        with contextlib_suppress():
            os.unlink(f"{VAR_TMP}/{marker}")
    assert not leaked, outcomes
    assert sum(outcomes.values()) == 60
    print("OUTCOMES", outcomes)


def test_link_inside_a_read_only_dir_reaches_nothing_of_the_host(host_dir):
    """A link inside a listed read-only directory that points at a writable
    host place: inside, it resolves in the sandbox's own root, where that
    place does not exist (regression: this held before too)."""
    os.symlink(VAR_TMP, os.path.join(host_dir, "to-var-tmp"))
    os.symlink("/", os.path.join(host_dir, "to-root"))
    marker = f"zviz-pwned-{secrets.token_hex(4)}"
    pol = zviz.Policy.shell().with_paths(read_only=[host_dir])
    for via in ("to-var-tmp", f"to-root{VAR_TMP}"):
        out, refused = _write_via(pol, f"{host_dir}/{via}/{marker}")
        assert refused is None and "WROTE" not in out, out
        assert not os.path.exists(f"{VAR_TMP}/{marker}")


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


# ------------------------------------------------------------------ item 13: host facts, the root


def _host_facts() -> dict[str, str]:
    facts = {}
    for path in ("/proc/cmdline", "/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                v = f.read().strip()
        except OSError:
            continue
        if len(v) >= 8:
            facts[path] = v
    return facts


READ_INSIDE = ("/proc/cmdline", "/etc/machine-id", "/proc/sys/kernel/random/boot_id", "/proc/kallsyms",
               "/proc/interrupts", "/proc/pressure/cpu", "/proc/pressure/memory", "/proc/keys", "/proc/timer_list",
               "/proc/sched_debug", "/proc/modules", "/proc/kcore")

PROBE = r"""
import os, sys
for p in sys.argv[1:]:
    try:
        with open(p, 'rb') as f:
            data = f.read(4096)
        print(p, 'LEN', len(data), data[:200].decode(errors='replace').replace('\n', ' '))
    except OSError as e:
        print(p, 'ERR', e.errno)
"""


def test_host_facts_read_empty_inside(attack):
    facts = _host_facts()
    pol = zviz.Policy.python()
    import tempfile  # noqa: F401  (the runner writes the probe through the sandbox)

    r = attack("read", "/proc/cmdline", policy=pol)  # the attack program's own read, as a first look
    assert not any(v in r["stdout"] for v in facts.values()), r["stdout"]

    async def main() -> str:
        async with zviz.open_sandbox(pol) as sb:
            res = await sb.run(["python3", "-c", PROBE, *READ_INSIDE])
            return res.stdout.decode() + res.stderr.decode()

    from ..conftest import run_as

    out = run_as(attack.identity, trio.run, main)
    for path, value in facts.items():
        assert value not in out, (path, out)  # host side: the host's own value is not in the output
    for line in out.splitlines():
        path, kind, *rest = line.split(" ", 3)
        if kind == "LEN":
            assert rest[0] == "0", line  # masked: reads empty
    assert out.count(" LEN ") + out.count(" ERR ") == len(READ_INSIDE), out


def test_root_is_not_the_sandboxes_to_change(attack):
    host_root_mode = os.stat("/").st_mode

    async def main() -> str:
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            cmds = ("chmod 777 /", "mkdir /x", "touch /y", "rmdir /usr", "mv /usr /usr2", "ln -s / /z",
                    "chmod 777 /proc", "chmod 777 /usr")
            script = "; ".join(f"if {c} 2>/dev/null; then echo 'OK {c}'; else echo 'FAILED {c}'; fi" for c in cmds)
            r = await sb.run(["sh", "-c", script + "; stat -c '%a %U' / ; echo hi > /proc/sys/kernel/hostname"])
            return r.stdout.decode() + r.stderr.decode()

    from ..conftest import run_as

    out = run_as(attack.identity, trio.run, main)
    assert "OK " not in out, out
    assert out.count("FAILED ") == 8, out
    assert "755" in out, out  # the root's mode is still 0755 (chmod did nothing)
    assert "Read-only file system" in out  # /proc/sys is read-only
    assert os.stat("/").st_mode == host_root_mode and not os.path.exists("/x")
