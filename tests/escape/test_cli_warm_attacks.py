"""`zviz run -- PYTHON -c CODE` through the CLI server (zviz/_cli.py `_warm_code`,
zviz/_warm.py `started`): the snippet is a fork of an interpreter the server
started ON THE HOST. The attacker controls CODE and the flags, and the code of
earlier sandboxes of the same server. Each test looks at what the host saw:
marker files at host paths no sandbox sees, the server's process tree."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.test_cliserver import ZVIZ, Server

from ..conftest import IS_ROOT

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the CLI's warm-path attacks run the server as root (CI does)")

PY = "/usr/bin/python3"


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def _run(server: Server, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*ZVIZ, "run", *args], env=server.env, input=input, capture_output=True, timeout=60)


def _plant(server: Server, shared: str, marker: str) -> str:
    """An earlier sandbox, given `shared` read-write, writes `shared`/bin/python3:
    a script that leaves `marker` (a host path no sandbox sees) where it runs."""
    fake = f"{shared}/bin/python3"
    script = f"#!/bin/sh\\nid -u > {marker}\\nexit 3\\n"
    r = _run(server, "--rw", shared, "--", "sh", "-c",
             f"mkdir -p {shared}/bin && printf '{script}' > {fake} && chmod 755 {fake}")
    assert r.returncode == 0, r
    assert os.stat(fake).st_uid != 0  # (written by the sandbox's own host uid)
    return fake


@pytest.mark.parametrize("how", ["path", "PATH", "locked"])
def test_a_python3_an_earlier_sandbox_wrote_never_runs_on_the_host(server, tmp_path, how):
    """Sandbox 1 writes a `python3` into a directory it was given read-write;
    the next run lists that directory read-only (so no path of ITS policy is
    writable) and names the file as its interpreter: by path, through
    `--env PATH`, or after the host made the directory 0755 again (the file
    and bin/ still the sandbox uid's). The warm path must not start it on the
    host. Before: the marker said uid 0 (the script ran as root, CapEff full,
    no seccomp), then the snippet ran cold."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = tmp_path / "ran-on-the-host"
    fake = _plant(server, str(shared), str(marker))
    if how == "locked":
        shared.chmod(0o755)
    if how == "PATH":
        r = _run(server, "--ro", str(shared), "--env", f"PATH={shared}/bin:/usr/bin:/bin", "--", "python3", "-c", "pass")
    else:
        r = _run(server, "--ro", str(shared), "--", fake, "-c", "pass")
    assert not marker.exists(), f"the sandbox-written python3 ran on the host as uid {marker.read_text().strip()}"
    assert r.returncode == 3, r  # (it ran, cold, in the sandbox: the marker's directory is absent there)


def test_a_root_owned_interpreter_still_starts_warm(server):
    # the check above refuses what a sandbox may have written, not the system's own interpreter
    r = _run(server, "--", PY, "-c", "import sys; print(sys.flags.isolated)")
    assert (r.returncode, r.stdout) == (0, b"1\n"), r
