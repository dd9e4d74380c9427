"""The start-up cache on disk (zviz/_diskcache.py) and what uses it: the compiled
seccomp filter (_bpf.program, checked by _bpf.check_program) and the
user-namespace probe. A cached filter is loaded into sandboxes, so every way an
entry or its directory can be wrong must make it a miss, never a filter."""

import os
import struct
import subprocess
import sys
import threading

import pytest

from zviz import _bpf, _diskcache, _probe, _syscalls

SPEC = _bpf.FilterSpec(allow=_syscalls.GROUPS["@python"], net_mode="none", notify=True, zygote=True, pid_ns=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ZVIZ_CACHE_DIR", str(d))
    _bpf.program.cache_clear()  # (the in-process memo would answer before the disk)
    yield d
    _bpf.program.cache_clear()


def _only_entry(d):
    (name,) = [n for n in os.listdir(d) if not n.startswith(".")]
    return d / name


# ---- the store


def test_roundtrip_and_private_directory(cache):
    assert _diskcache.load("k-1") is None  # no directory yet: a miss
    _diskcache.store("k-1", b"payload")
    assert _diskcache.load("k-1") == b"payload"
    st = os.stat(cache)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert os.stat(cache / "k-1").st_mode & 0o777 == 0o600
    assert sorted(os.listdir(cache)) == ["k-1"]  # no temporary file left


def test_key_changes_with_every_part():
    k = _diskcache.key("bpf", 1, "a")
    assert k == _diskcache.key("bpf", 1, "a")
    assert len({k, _diskcache.key("bpf", 2, "a"), _diskcache.key("bpf", 1, "b"), _diskcache.key("x", 1, "a")}) == 4


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "appended", "other-key"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(cache, damage):
    _diskcache.store("k-1", b"payload" * 100)
    path = cache / "k-1"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    elif damage == "empty":
        data = b""
    elif damage == "appended":
        data += b"\0"
    else:  # a whole, valid entry, but of another key, put in this one's place
        _diskcache.store("k-2", b"other")
        data = (cache / "k-2").read_bytes()
    path.write_bytes(data)
    assert _diskcache.load("k-1") is None
    _diskcache.store("k-1", b"again")
    assert _diskcache.load("k-1") == b"again"


def test_a_stale_stamp_is_a_miss(cache, tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"v1")
    _diskcache.store("k-1", b"x", stamp=_diskcache.file_stamp(str(lib)))

    def fresh(stamp):
        return _diskcache.file_stamp(stamp[0]) == stamp

    assert _diskcache.load("k-1", fresh) == b"x"
    lib.write_bytes(b"v2!")  # the library was replaced (another size and mtime)
    assert _diskcache.load("k-1", fresh) is None
    assert _diskcache.load("k-1", lambda stamp: stamp[0] + 1) is None  # a stamp of a shape it did not expect


def test_entries_that_are_not_private_regular_files_are_ignored(cache, tmp_path):
    _diskcache.store("k-1", b"payload")
    entry = cache / "k-1"
    good = entry.read_bytes()
    # a symlink to a whole valid entry elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(good)
    entry.unlink()
    entry.symlink_to(elsewhere)
    assert _diskcache.load("k-1") is None
    entry.unlink()
    # a hard link (someone else's name for the same file)
    os.link(elsewhere, entry)
    assert _diskcache.load("k-1") is None
    entry.unlink()
    os.unlink(elsewhere)
    # writable by others
    entry.write_bytes(good)
    os.chmod(entry, 0o666)
    assert _diskcache.load("k-1") is None
    os.chmod(entry, 0o600)
    assert _diskcache.load("k-1") == b"payload"
    # a directory, a fifo (never opened for a blocking read)
    entry.unlink()
    os.mkfifo(entry)
    assert _diskcache.load("k-1") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_foreign_owned_entry_or_directory_is_ignored(cache):
    _diskcache.store("k-1", b"payload")
    os.chown(cache / "k-1", 1000, 1000)
    assert _diskcache.load("k-1") is None
    os.chown(cache / "k-1", 0, 0)
    assert _diskcache.load("k-1") == b"payload"
    os.chown(cache, 1000, 1000)  # the whole directory is someone else's: no reads, no writes
    assert _diskcache.load("k-1") is None
    _diskcache.store("k-2", b"x")
    assert not (cache / "k-2").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_no_directory_is_made_in_another_users_home(tmp_path, monkeypatch):
    """root with another user's HOME (sudo -E) leaves nothing of root's in it."""
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 1000, 1000)
    monkeypatch.delenv("ZVIZ_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert _diskcache.location() == str(home / ".cache" / "zviz")
    _diskcache.store("k-1", b"x")
    assert os.listdir(home) == [] and _diskcache.load("k-1") is None
    os.chown(home, 0, 0)  # our own home: ~/.cache and ~/.cache/zviz are made, private
    _diskcache.store("k-1", b"x")
    assert _diskcache.load("k-1") == b"x"
    assert os.stat(home / ".cache").st_mode & 0o777 == 0o700


def test_a_relative_location_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZVIZ_CACHE_DIR", "relative")
    assert _diskcache.location() == ""
    _diskcache.store("k-1", b"x")
    assert _diskcache.load("k-1") is None and os.listdir(tmp_path) == []


def test_a_shared_or_symlinked_directory_is_not_used(cache, tmp_path):
    _diskcache.store("k-1", b"payload")
    os.chmod(cache, 0o755)  # others may list it
    assert _diskcache.load("k-1") is None
    _diskcache.store("k-2", b"x")
    assert not (cache / "k-2").exists()
    os.chmod(cache, 0o700)
    assert _diskcache.load("k-1") == b"payload"
    # the cache path is a symlink (to a private directory of ours, even): not followed
    real = tmp_path / "real"
    os.rename(cache, real)
    cache.symlink_to(real)
    assert _diskcache.load("k-1") is None
    _diskcache.store("k-3", b"x")
    assert not (real / "k-3").exists()


def test_concurrent_writers_leave_one_whole_entry(cache):
    payloads = [bytes([i]) * (1000 + i) for i in range(8)]
    seen: list[bytes | None] = []
    stop = threading.Event()

    def write(p):
        for _ in range(50):
            _diskcache.store("k-1", p)

    def read():
        while not stop.is_set():
            seen.append(_diskcache.load("k-1"))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert _diskcache.load("k-1") in payloads
    assert {s for s in seen if s is not None} <= set(payloads)  # never a mix, never a piece
    assert os.listdir(cache) == ["k-1"]


def test_clear(cache):
    _diskcache.store("k-1", b"a")
    _diskcache.store("k-2", b"b")
    (cache / ".tmp-left-by-a-crash").write_bytes(b"half")
    assert _diskcache.clear(dry_run=True) == 2
    assert len(os.listdir(cache)) == 3
    assert _diskcache.clear() == 2
    assert os.listdir(cache) == []


# ---- the compiled filter


def test_program_is_compiled_once_then_read_back(cache):
    compiled = _bpf.compile_filter(SPEC)
    assert _bpf.program(SPEC) == compiled
    entry = _only_entry(cache)
    _bpf.program.cache_clear()
    os.utime(entry, (1, 1))  # (a hit leaves the entry alone: it is not rewritten)
    assert _bpf.program(SPEC) == compiled
    assert os.stat(entry).st_mtime == 1


def test_another_spec_is_another_entry(cache):
    _bpf.program(SPEC)
    other = _bpf.FilterSpec(allow=SPEC.allow, net_mode="loopback", notify=True, zygote=True, pid_ns=True)
    assert _bpf.program(other) == _bpf.compile_filter(other) != _bpf.program(SPEC)
    assert len(os.listdir(cache)) == 2


def test_a_wellformed_entry_with_a_wrong_program_is_recompiled(cache):
    """An entry whose digest is right but whose program is not one compile_filter
    makes (here: allow everything) is never returned."""
    good = _bpf.program(SPEC)
    name = _only_entry(cache).name
    allow_all = struct.pack("=HBBI", 0x20, 0, 0, 4) + struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)
    _diskcache.store(name, allow_all, stamp=_bpf._library_stamp())
    _bpf.program.cache_clear()
    assert _bpf.program(SPEC) == good
    _bpf.program.cache_clear()
    assert _diskcache.load(name, _bpf._library_is_unchanged) == good  # and it was rewritten


def test_a_changed_libseccomp_is_a_miss(cache):
    _bpf.program(SPEC)
    name = _only_entry(cache).name
    stamp = _bpf._library_stamp()
    assert stamp is not None and _diskcache.load(name, _bpf._library_is_unchanged) is not None
    _diskcache.store(name, _bpf.compile_filter(SPEC), stamp=[stamp[0], *stamp[1:-1], stamp[-1] + 1])
    assert _diskcache.load(name, _bpf._library_is_unchanged) is None
    _diskcache.store(name, _bpf.compile_filter(SPEC), stamp=None)
    assert _diskcache.load(name, _bpf._library_is_unchanged) is None


def test_the_key_is_the_same_in_every_process(tmp_path):
    """A frozenset's order follows string hashing, which differs per process."""
    prog = ("from zviz import _bpf, _diskcache, _syscalls\n"
            "s = _bpf.FilterSpec(allow=_syscalls.GROUPS['@python'], net_mode='none', notify=True)\n"
            "print(_diskcache.key('bpf', _bpf.spec_key(s)))")
    keys = {subprocess.run([sys.executable, "-c", prog], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3)}
    assert len(keys) == 1


def test_a_new_process_hits_without_libseccomp(cache):
    prog = ("import sys\nfrom zviz import _bpf, _syscalls\n"
            "s = _bpf.FilterSpec(allow=_syscalls.GROUPS['@python'], net_mode='none', notify=True, zygote=True,"
            " pid_ns=True)\n"
            "p = _bpf.program(s)\nprint(_bpf.check_program(p), 'pyseccomp' in sys.modules)")

    def run():
        return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout.split()

    assert run() == ["True", "True"]  # a miss: compiled
    assert run() == ["True", "False"]  # a hit: libseccomp not even loaded
    assert _diskcache.load(_only_entry(cache).name) == _bpf.compile_filter(SPEC)


def _ins(code, jt=0, jf=0, k=0):
    return struct.pack("=HBBI", code, jt, jf, k)


def test_check_program_accepts_what_libseccomp_makes():
    for mode in ("none", "loopback", "allow", "any"):
        for notify in (True, False):
            spec = _bpf.FilterSpec(allow=_syscalls.GROUPS["@python"], net_mode=mode, notify=notify, netns=True)
            assert _bpf.check_program(_bpf.compile_filter(spec)), (mode, notify)


def test_check_program_rejects_other_shapes():
    good = _bpf.compile_filter(SPEC)
    head = _ins(0x20, k=4) + _ins(0x15, 0, 1, _bpf.AUDIT_ARCH_X86_64)
    kill = _ins(0x06, k=_bpf.SECCOMP_RET_KILL_PROCESS)
    allow = _ins(0x06, k=0x7FFF0000)
    assert _bpf.check_program(head + allow + kill)  # the smallest right shape
    bad = [
        b"",
        good[:-1], good[:-8] + good[-7:],  # not whole instructions
        good[:80],  # cut: jumps lead out of it, and it ends on no return
        _ins(0x20, k=4) + allow,  # no architecture check
        _ins(0x20, k=0) + _ins(0x15, 0, 1, _bpf.AUDIT_ARCH_X86_64) + allow + kill,  # loads nr, not arch
        _ins(0x20, k=4) + _ins(0x15, 0, 1, 0x40000003) + allow + kill,  # i386's arch
        head + allow + allow,  # another arch is allowed, not killed
        _ins(0x20, k=4) + _ins(0x15, 0, 9, _bpf.AUDIT_ARCH_X86_64) + allow + kill,  # jumps out of the program
        head + _ins(0x05, k=7) + kill,  # ja out of the program
        head + _ins(0x01, k=0) + kill,  # an instruction libseccomp does not emit (ldx)
        head + _ins(0x20, k=64) + kill,  # loads past seccomp_data
        head + allow * (_bpf.BPF_MAXINSNS - 2) + kill,  # longer than the kernel takes
    ]
    for i, prog in enumerate(bad):
        assert not _bpf.check_program(prog), i
    # (a cut that still ends on a return and keeps every jump inside passes the
    # shape check: that is what the entry's digest is for, see the tests above)


# ---- the user-namespace probe


def test_probe_keeps_a_success_only(cache, monkeypatch):
    calls = []

    def spawn(result):
        def f():
            calls.append(result)
            return result
        return f

    monkeypatch.setattr(_probe, "_spawn_in_userns", spawn((False, "refused")))
    assert _probe._probe_userns() == (False, "refused")
    assert _probe._probe_userns() == (False, "refused")
    assert len(calls) == 2  # a failure is probed again every time
    monkeypatch.setattr(_probe, "_spawn_in_userns", spawn((True, "ok")))
    assert _probe._probe_userns() == (True, "ok")
    assert _probe._probe_userns() == (True, "ok")
    assert len(calls) == 3  # ... a success only once
    facts = _probe._userns_facts()
    monkeypatch.setattr(_probe, "_userns_facts", lambda: (*facts[:3], facts[3] + 1, *facts[4:]))  # another uid
    assert _probe._probe_userns() == (True, "ok")
    assert len(calls) == 4


def test_userns_facts_follow_the_sysctl():
    facts = _probe._userns_facts()
    with open("/proc/sys/user/max_user_namespaces") as f:
        assert f.read() in facts[-2]


def test_a_changed_rule_source_or_binding_is_a_miss(cache):
    """The filter's key holds the identity of every file its bytes come from
    (zviz's rules and tables, pyseccomp): editing one (here: a new mtime) misses."""
    from importlib.util import find_spec

    from zviz import _abi, _argrules, _linux, _syscall_table

    sources = [m.__file__ for m in (_bpf, _argrules, _syscalls, _syscall_table, _linux, _abi)]
    sources.append(find_spec("pyseccomp").origin)
    _bpf.program(SPEC)
    for i, path in enumerate(sources, start=2):
        st = os.stat(path)
        try:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            _bpf.program.cache_clear()
            assert _bpf.program(SPEC) == _bpf.compile_filter(SPEC)
            assert len(os.listdir(cache)) == i, path
        finally:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
