"""A host without (unprivileged) user namespaces: zviz degrades with a clear
warning, keeps Landlock and seccomp, and does not crash."""

import os
import warnings

import pytest
import trio

import zviz

from .conftest import IS_ROOT, _warm_up, run_without_userns

pytestmark = pytest.mark.skipif(not IS_ROOT,
                                reason="simulating the host needs root (a user namespace of the test's own)")


def _scenario(secret_path):
    async def main():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with zviz.open_sandbox(zviz.Policy.python()) as sb:
                r = await sb.run(["python3", "-c", "import os; print(os.getuid())"])
                leak = await sb.run(["python3", "-c", f"print(open({secret_path!r}).read())"])
                ptrace = await sb.run(["python3", "-c", "import ctypes; print(ctypes.CDLL(None).ptrace(16, 1, 0, 0))"])
                stats = sb.statistics()
        return (r.stdout, leak.stdout, leak.stderr, ptrace.stdout, dict(ptrace.denials), stats.degraded,
                [str(w.message) for w in caught if issubclass(w.category, zviz.ZvizWarning)],
                zviz.probe_host().userns_reason)
    return trio.run(main)


def test_degrades_with_a_warning_and_keeps_landlock_and_seccomp(tmp_path):
    _warm_up()
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    out, leak_out, leak_err, ptrace, denials, degraded, warns, reason = run_without_userns(_scenario, str(secret))
    assert out == b"1000\n"  # it ran, as the caller (no namespace to map it)
    assert "No space left on device" in reason or "ENOSPC" in reason
    assert warns and "user namespace unavailable" in warns[0]
    assert any("user namespace" in d for d in degraded)
    assert b"TOPSECRET" not in leak_out and b"PermissionError" in leak_err  # Landlock still guards paths
    assert ptrace == b"-1\n" and denials == {"ptrace": 1}  # seccomp and the supervisor still work
