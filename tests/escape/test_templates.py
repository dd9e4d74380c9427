"""Attacks on the template copier and the template overlay (zviz/_snapshot.py):
the sandbox builds a hostile workspace (links out, fifos, set-id files, a
huge sparse file, a deep tree, odd names), the host snapshots it, and the
host checks what the template holds; then a sandbox started from a template
tries to change it. Evidence is what the host finds on its disk."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import tempfile

import pytest
import trio

import zviz

from ..conftest import IS_ROOT, run_as, template_parent

pytestmark = pytest.mark.filterwarnings("ignore::zviz.ZvizWarning")




def _digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(dirs + files):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h.update(f.read())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
    return h.hexdigest()


def _hostile(parent: str, secret_path: str) -> dict:
    dest = os.path.join(parent, "t")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            script = (
                "ln -s / rootlink; ln -s /etc etclink; ln -s ../../../../../.. up; "
                f"ln -s {secret_path} secretlink; mkfifo fifo; "
                "printf x > suid; mkdir sgid; mkdir open && chmod 1777 open; printf w > ww && chmod 666 ww; "
                "printf 'nl' > \"$(printf 'new\\nline')\"; "
                "truncate -s 1G sparse && printf tail >> sparse; "
                "python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind(\"sock\")' 2>/dev/null; ")
            r = await sb.run(script, shell=True)
            assert r.exit_code == 0, r.stderr
            # the sandbox's own chmod cannot set set-id bits (its filter): set them from the host, as a
            # template's lower layer or a host tool could leave them
            os.chmod(os.path.join(sb.workdir, "suid"), 0o4755)
            os.chmod(os.path.join(sb.workdir, "sgid"), 0o2775)
            # and a huge sparse file (its RLIMIT_FSIZE keeps the sandbox's own below that)
            with open(os.path.join(sb.workdir, "sparse"), "r+b") as f:
                f.truncate(100 << 30)
                f.seek(0, 2)
                f.write(b"tail")
            r = await sb.run("stat -c %a suid sgid", shell=True)
            with trio.fail_after(20):  # a fifo's open must never block the copy
                info = await sb.snapshot(dest)
            return r.stdout, info

    suid_modes, info = trio.run(main)
    files = os.path.join(dest, "files")
    found = {}
    for dirpath, dirs, names in os.walk(files):
        for n in dirs + names:
            p = os.path.join(dirpath, n)
            found[os.path.relpath(p, files)] = os.lstat(p)
    contents = b""
    for rel, st in found.items():
        if stat.S_ISREG(st.st_mode) and st.st_blocks:
            with open(os.path.join(files, rel), "rb") as f:
                contents += f.read(1 << 20)
    return {"suid_modes": suid_modes, "skipped": info.skipped, "bytes": info.bytes,
            "found": {k: (v.st_mode, v.st_size, v.st_blocks) for k, v in found.items()},
            "links": {k: os.readlink(os.path.join(files, k)) for k, v in found.items() if stat.S_ISLNK(v.st_mode)},
            "contents": contents, "newline": _read(os.path.join(files, "new\nline"))}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_hostile_workspace_is_copied_safely(identity):
    secret = secrets.token_hex(16).encode()
    sdir = tempfile.mkdtemp(prefix="secret-", dir=tempfile.gettempdir())
    os.chmod(sdir, 0o755)
    secret_path = os.path.join(sdir, "secret")
    with open(secret_path, "wb") as f:
        f.write(secret)
    os.chmod(secret_path, 0o644)
    out = run_as(identity, _hostile, template_parent(identity), secret_path)
    found = out["found"]
    assert out["suid_modes"] == b"4755\n2775\n"  # the sandbox did set them in its workdir
    # symlinks are kept as links, never followed: nothing of their targets was copied
    assert out["links"] == {"rootlink": "/", "etclink": "/etc", "up": "../../../../../..", "secretlink": secret_path}
    assert secret not in out["contents"]
    assert not any(k.startswith(("rootlink/", "etclink/", "up/")) for k in found)
    # no set-id bits survive
    assert stat.S_IMODE(found["suid"][0]) == 0o755 and stat.S_IMODE(found["sgid"][0]) == 0o755
    # nothing in the template is writable by group or others (the sandbox's chmod 1777 / 666: before, kept as
    # 0777 / 0666, so anyone who could reach a template its owner opened to reading could change it)
    assert stat.S_IMODE(found["open"][0]) == 0o755 and stat.S_IMODE(found["ww"][0]) == 0o644
    assert not [k for k, v in found.items() if not stat.S_ISLNK(v[0]) and v[0] & 0o022]
    # fifos and sockets are skipped (named in the result), never opened
    assert "fifo" not in found and "sock" not in found
    skipped = dict(out["skipped"])
    assert "fifo" in skipped["fifo"] and "socket" in skipped["sock"]
    # the sparse file keeps its size and its holes; only its data counts
    _mode, size, blocks = found["sparse"]
    assert size == (100 << 30) + 4 and blocks * 512 < (1 << 20)
    assert out["bytes"] < 1 << 20
    assert out["newline"] == b"nl"


def _deep(parent: str) -> tuple[str, list[str]]:
    dest = os.path.join(parent, "deep")

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            r = await sb.run(["python3", "-c", "import os\nfor i in range(300):\n os.mkdir('d')\n os.chdir('d')"])
            assert r.exit_code == 0, r.stderr
            with pytest.raises(zviz.TemplateError, match="deep") as e:
                await sb.snapshot(dest)
            return str(e.value)

    return trio.run(main), os.listdir(parent)


def test_deep_tree_is_refused_and_nothing_left(identity):
    parent = template_parent(identity)
    msg, left = run_as(identity, _deep, parent)
    assert "flatten" in msg
    assert left == []  # no partial template


@pytest.mark.skipif(not IS_ROOT, reason="a root caller's copy reads as root: the case that matters")
def test_host_file_hard_linked_into_workspace_is_not_copied(tmp_path):
    """A file the sandbox could not read (root's 0600, e.g. linked in by a
    confused host tool): root's snapshot must not copy it for the sandbox."""
    secret = secrets.token_hex(16).encode()
    dest = tmp_path / "t"

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            src = os.path.join(os.path.dirname(sb.workdir), "host-secret")
            with open(src, "wb") as f:
                f.write(secret)
            os.chmod(src, 0o600)
            try:
                os.link(src, os.path.join(sb.workdir, "linked"))
                r = await sb.run(["cat", "linked"])
                assert r.exit_code != 0  # the sandbox itself cannot read it
                return await sb.snapshot(dest)
            finally:
                os.unlink(src)

    info = trio.run(main)
    assert not (dest / "files" / "linked").exists()
    assert dict(info.skipped)["linked"].startswith("not readable by the sandbox")


def _write_through(parent: str, template: str) -> tuple[int, bytes]:
    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell(), template=template) as sb:
            r = await sb.run("chmod -R 777 . ; for f in $(find . -type f); do echo pwned > $f; done; "
                             "rm -rf ./*; mkdir -p a && echo x > a/new; "
                             "grep -h overlay /proc/self/mountinfo | head -1 | tr ',' '\\n' | grep -c lowerdir; "
                             "cat /proc/self/mountinfo | grep -c ' - overlay '", shell=True)
            return r.exit_code, r.stdout

    return trio.run(main)


def test_sandbox_cannot_change_its_template(identity):
    parent = template_parent(identity)

    def make(p: str) -> str:
        dest = os.path.join(p, "t")

        async def main():
            async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
                await sb.run("mkdir -p lib/sub && echo orig > lib/sub/mod.py && echo top > top && chmod 444 top",
                             shell=True)
                await sb.snapshot(dest)

        trio.run(main)
        return dest

    dest = run_as(identity, make, parent)
    before = _digest(dest)
    run_as(identity, _write_through, parent, dest)
    assert _digest(dest) == before
    with open(os.path.join(dest, "files", "lib", "sub", "mod.py"), "rb") as f:
        assert f.read() == b"orig\n"


def test_a_huge_directory_is_not_read_whole_before_the_bound():
    """`max_files` bounds a snapshot; the copier listed a whole directory
    before counting, so one directory of the sandbox's holding millions of
    names cost the host all of them in memory first. Now it reads no more
    names than the bound lets through (here 80,000 names of 200 bytes,
    `max_files=1000`: the host's traced peak stays small)."""
    import tracemalloc

    async def main():
        async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
            r = await sb.run(["python3", "-c", "import os\nos.mkdir('d')\nfor i in range(80000):\n"
                                               "    os.close(os.open('d/%0200d' % i, os.O_CREAT | os.O_WRONLY))"],
                             timeout=120)
            assert r.exit_code == 0, r.stderr
            dest = os.path.join(template_parent("self"), "t")
            tracemalloc.start()
            try:
                with pytest.raises(zviz.TemplateError, match="more than 1000 entries"):
                    await sb.snapshot(dest, max_files=1000)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    peak = trio.run(main)
    assert peak < 8 << 20, f"the host held {peak >> 20} MiB to refuse a snapshot of 1000 entries"
