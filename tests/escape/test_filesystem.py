"""Filesystem escapes: each checks the host (the secret is not printed, the
marker is not created), not the attack's own claim."""

import os

import pytest


def test_read_secret_outside(attack, target):
    d, token = target
    host_pid = os.getpid()  # the supervisor: its /proc/<pid>/root would be the host's root
    for path in (f"{d}/secret.txt", f"/proc/self/root{d}/secret.txt", f"/proc/1/root{d}/secret.txt",
                 f"/proc/{host_pid}/root{d}/secret.txt", "/etc/shadow", "/root/.bashrc", "/proc/1/environ"):
        r = attack("read", path)
        assert token not in r["stdout"], path
        assert "OK" not in r["stdout"] or path == "/proc/1/environ", (path, r["stdout"])


def test_dotdot_from_workdir(attack, target):
    d, token = target
    rel = "../" * 12 + d.lstrip("/") + "/secret.txt"
    r = attack("read", rel)
    assert token not in r["stdout"] and "FAILED" in r["stdout"]


def test_write_outside(attack, target):
    d, _ = target
    for path in (f"{d}/pwned", "/etc/zviz-pwned", "/usr/zviz-pwned", "/tmp/../etc/zviz-pwned"):
        attack("write", path)
        assert not os.path.exists(f"{d}/pwned")
    assert not os.path.exists("/etc/zviz-pwned") and not os.path.exists("/usr/zviz-pwned")


def test_symlink_escapes(attack, target):
    d, token = target
    r = attack("symlink-read", f"{d}/secret.txt")
    assert token not in r["stdout"]
    attack("symlink-write", d)
    assert not os.path.exists(f"{d}/pwned")


def test_hardlink_and_rename_escapes(attack, target):
    d, token = target
    r = attack("hardlink", f"{d}/secret.txt")
    assert token not in r["stdout"] and "link: FAILED" in r["stdout"]
    attack("rename-out", f"{d}/moved")
    assert not os.path.exists(f"{d}/moved")


def test_open_by_handle_at(attack, target):
    d, token = target
    r = attack("handle", f"{d}/secret.txt")
    assert "open_by_handle_at: FAILED" in r["stdout"] and token not in r["stdout"]
    assert r["denials"].get("open_by_handle_at") == 1


def test_toctou_path_flipping(attack, target):
    """A thread flips open()'s path buffer between an allowed and a forbidden
    path: Landlock decides on the resolved file in the kernel, so no race."""
    d, token = target
    files = {"ok.txt": (b"fine", 0o644)}
    r = attack("toctou", "ok.txt", f"{d}/secret.txt", "20000", files=files)
    assert token not in r["stdout"]
    assert "leaked 0" in r["stdout"], r["stdout"]
    opened = int(r["stdout"].split("opened ")[1].split()[0])
    assert opened > 0  # the race ran: the allowed path was opened many times


def test_proc_self_mem_is_read_only(attack):
    r = attack("procmem")
    assert "open /proc/self/mem rw: FAILED" in r["stdout"]
    assert "open /proc/1/mem rw: FAILED" in r["stdout"]


def test_setuid_binary_gains_nothing(attack_bin):
    """A set-uid-root program planted by the host in the workdir runs without
    privileges (no_new_privs; root is not even mapped in the user namespace)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a set-uid-root binary")
    import trio

    import zviz

    async def main():
        async with zviz.open_sandbox(zviz.Policy.python()) as sb:
            await sb.write_file("suid", attack_bin, mode=0o755)
            path = os.path.join(sb.workdir, "suid")
            os.chown(path, 0, 0)
            os.chmod(path, 0o4755)
            assert os.stat(path).st_mode & 0o4000
            r = await sb.run(["./suid", "ids"])
            return r.stdout.decode()

    out = trio.run(main)
    assert "euid 1000" in out and "caps 0000000000000000" in out, out
    assert not os.path.exists("/etc/zviz-pwned")


def test_system_setuid_binaries(attack):
    # util-linux mount is set-uid root on the host: inside, it cannot mount.
    if not os.path.exists("/usr/bin/mount"):
        pytest.skip("no /usr/bin/mount")
    import trio

    import zviz

    from ..conftest import run_as

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            r = await sb.run(["mount", "-t", "tmpfs", "none", "/tmp"])
            return r.status, r.stderr
    status, err = run_as(attack.identity, trio.run, main)
    assert status != 0, err
