"""Where a sandbox's memory cgroup goes (zviz/_cgroup.py): the choice between
a delegated cgroup v2 directory and the v1 memory hierarchy, on made-up
hosts (the kernel part is in tests/escape/test_memory.py)."""

import os

import pytest

from zviz import _cgroup


@pytest.fixture(autouse=True)
def _fresh_probe():
    _cgroup.where.cache_clear()
    yield
    _cgroup.where.cache_clear()  # the real host's answer again for the tests that follow


def _fake(monkeypatch, tmp_path, own2="/user.slice/me", own1="/me", v2_ctrls="", v1_writable=True):
    v2 = tmp_path / "unified"
    v1 = tmp_path / "memory"
    (v2 / own2.lstrip("/")).mkdir(parents=True)
    (v2 / own2.lstrip("/") / "cgroup.subtree_control").write_text(v2_ctrls)
    (v1 / own1.lstrip("/")).mkdir(parents=True)
    (v1 / own1.lstrip("/") / "memory.limit_in_bytes").write_text("9223372036854771712")
    if not v1_writable:
        os.chmod(v1 / own1.lstrip("/"), 0o555)
    monkeypatch.setattr(_cgroup, "_own_cgroups", lambda: (own2, own1))
    monkeypatch.setattr(_cgroup, "_mounts", lambda: (str(v2), str(v1)))
    monkeypatch.delenv("ZVIZ_CGROUP", raising=False)
    _cgroup.where.cache_clear()
    return v2, v1


def test_v2_with_memory_delegated_is_preferred(monkeypatch, tmp_path):
    v2, _ = _fake(monkeypatch, tmp_path, v2_ctrls="cpu memory pids")
    assert _cgroup.where() == ("v2", str(v2 / "user.slice/me"), "ok")


def test_zviz_cgroup_names_the_delegated_directory(monkeypatch, tmp_path):
    _fake(monkeypatch, tmp_path)
    mine = tmp_path / "delegated"
    mine.mkdir()
    (mine / "cgroup.subtree_control").write_text("memory")
    monkeypatch.setenv("ZVIZ_CGROUP", str(mine))
    assert _cgroup.where()[:2] == ("v2", str(mine))


def test_hybrid_host_falls_back_to_v1(monkeypatch, tmp_path):
    _, v1 = _fake(monkeypatch, tmp_path, v2_ctrls="")
    kind, parent, _ = _cgroup.where()
    assert (kind, parent) == ("v1", str(v1 / "me"))


def test_no_cgroup_says_why(monkeypatch, tmp_path):
    if os.geteuid() == 0:
        # root may write a 0555 directory: simulate with an unwritable check instead
        monkeypatch.setattr(os, "access", lambda p, m: False)
    _fake(monkeypatch, tmp_path, v2_ctrls="", v1_writable=False)
    kind, parent, reason = _cgroup.where()
    assert kind is None and parent is None
    assert "does not delegate the memory controller" in reason and "needs root" in reason and ";" not in reason


def test_a_dead_hosts_cgroups_are_swept(tmp_path):
    dead = tmp_path / "zviz-999999999-abcdef"  # no such pid
    alive = tmp_path / f"zviz-{os.getppid()}-abcdef"
    other = tmp_path / "not-ours"
    for d in (dead, alive, other):
        d.mkdir()
    _cgroup._sweep(str(tmp_path))
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_parent_is_swept_at_most_once_a_minute(tmp_path, monkeypatch):
    """(Listing the parent on every sandbox cost ~0.05 ms each.)"""
    now = [1000.0]
    monkeypatch.setattr(_cgroup.time, "monotonic", lambda: now[0])
    _cgroup._sweep(str(tmp_path))
    late = tmp_path / "zviz-999999999-late"
    late.mkdir()
    now[0] += 30
    _cgroup._sweep(str(tmp_path))
    assert late.exists()  # not yet
    now[0] += 31
    _cgroup._sweep(str(tmp_path))
    assert not late.exists()


def test_a_cgroup_whose_files_cannot_all_be_opened_leaves_no_fd_and_no_directory(monkeypatch):
    """The cgroup's figure files are opened with it: an open that fails
    (EMFILE here, after the first one succeeded) gives no cgroup, its
    directory removed and every fd opened so far closed."""
    import errno

    kind, parent, reason = _cgroup.where()
    if kind is None:
        pytest.skip(f"no memory cgroup here: {reason}")
    real = _cgroup._open_figure
    calls = []

    def failing(cgroup: int, name: str):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(cgroup, name)

    monkeypatch.setattr(_cgroup, "_open_figure", failing)
    before = sorted(os.listdir("/proc/self/fd"))
    name = _cgroup.unique_name()
    cg, why = _cgroup.MemoryCgroup.create(name, 64 << 20)
    assert cg is None and "Too many open files" in why, why
    assert len(calls) == 2
    assert not os.path.exists(os.path.join(parent, name))
    assert sorted(os.listdir("/proc/self/fd")) == before
