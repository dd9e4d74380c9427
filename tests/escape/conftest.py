"""Fixtures of the attack suite: the compiled attack program, host-side
targets (a secret, a writable directory outside the sandbox, listeners), and a
runner that executes one attack in a fresh sandbox as a given identity."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest
import trio

import zviz

from ..conftest import IS_ROOT, run_as

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def attack_bin(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the attack program (apt-get install gcc)")
    out = tmp_path_factory.mktemp("attack") / "attack"
    subprocess.run([cc, "-O1", "-Wall", "-o", str(out), os.path.join(HERE, "attack.c"), "-lpthread"], check=True)
    os.chmod(out.parent, 0o755)
    os.chmod(out, 0o755)
    with open(out, "rb") as f:
        return f.read()


@pytest.fixture
def target(tmp_path_factory):
    """A host directory outside every policy: world-writable and a
    world-readable secret, so only the sandbox (not file permissions) stands
    between the attack and its goal."""
    base = "/opt" if IS_ROOT and os.path.isdir("/opt") else str(tmp_path_factory.mktemp("host"))
    d = os.path.join(base, "zviz-escape-" + secrets.token_hex(4))
    os.mkdir(d)
    os.chmod(d, 0o777)
    token = "SECRET-" + secrets.token_hex(8)
    with open(os.path.join(d, "secret.txt"), "w") as f:
        f.write(token)
    os.chmod(os.path.join(d, "secret.txt"), 0o644)
    yield d, token
    shutil.rmtree(d, ignore_errors=True)


def _scenario(binary: bytes, argv: list[str], policy: zviz.Policy, timeout: float, setup_files: dict):
    async def main():
        async with zviz.open_sandbox(policy) as sb:
            await sb.write_file("attack", binary, mode=0o755)
            for name, (data, mode) in setup_files.items():
                await sb.write_file(name, data, mode=mode)
            r = await sb.run(["./attack", *argv], timeout=timeout)
            events = [(e.syscall, e.detail) for e in sb.events_so_far()]
            return {"stdout": r.stdout.decode(errors="replace"), "stderr": r.stderr.decode(errors="replace"),
                    "status": r.status, "signal": r.signal, "denials": dict(r.denials), "events": events,
                    "timed_out": r.timed_out, "limit": r.limit, "workdir": sb.workdir}
    return trio.run(main)


@pytest.fixture
def attack(attack_bin, identity):
    """attack(*argv, policy=..., timeout=...) -> result dict, run as `identity`."""
    def run(*argv, policy=None, timeout=20.0, files=None):
        return run_as(identity, _scenario, attack_bin, list(argv), policy or zviz.Policy.python(), timeout,
                      files or {})
    run.identity = identity
    return run
