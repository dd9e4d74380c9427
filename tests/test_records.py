"""The frozen records: values that compare, hash and stay immutable."""

import pytest

import zviz


def result(**kw):
    base = dict(argv=("true",), exit_code=0, signal=None, stdout=b"", stderr=b"", timed_out=False, truncated=False,
                limit=None, wall_s=0.01, cpu_s=0.0, peak_rss=0, denials={})
    base.update(kw)
    return zviz.RunResult(**base)


def stats(**kw):
    base = dict(processes_started=1, processes_running=0, denials={}, denials_total=0, notifications=0, connects=0,
                timeouts=0, bytes_stdin=0, bytes_stdout=0, bytes_stderr=0, cpu_s=0.0, peak_rss=0, spawn_s_total=0.0,
                degraded=(), syscalls=None)
    base.update(kw)
    return zviz.SandboxStatistics(**base)


def test_run_results_differing_only_in_denials_differ():
    a, b = result(), result(denials={"ptrace": 1})
    assert a != b
    assert len({a, b}) == 2  # hashable, and not one set element
    assert result(denials={"ptrace": 1, "mount": 2}) == result(denials={"mount": 2, "ptrace": 1})
    assert hash(result(denials={"ptrace": 1})) == hash(b)


def test_statistics_differing_only_in_denials_or_syscalls_differ():
    assert stats() != stats(denials={"bpf": 1}, denials_total=0)
    assert stats(syscalls={"read": 1}) != stats(syscalls={"read": 2})
    assert stats(syscalls={"read": 1}) != stats()
    assert len({stats(), stats(denials={"bpf": 1}), stats(syscalls={"read": 1})}) == 3
    assert stats(syscalls={"read": 1, "openat": 2}) == stats(syscalls={"openat": 2, "read": 1})


def test_record_mappings_are_read_only():
    r, s = result(denials={"ptrace": 1}), stats(syscalls={"read": 1})
    with pytest.raises(TypeError):
        r.denials["ptrace"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        s.syscalls["read"] = 2  # type: ignore[index]
