"""The per-policy memo of plans (zviz/_planmemo.py) from an attacker's side.
An entry holds a placeholder workdir and placeholder ids; each sandbox gets
its own filled in. Attempts: a policy whose own paths are (or lead to) the
placeholder workdir, a caller's workdir that the policy also lists or that
is a place the root is assembled on, ids that collide with the
placeholders, and sandboxes of one policy made at once from threads, with a
size cap, a pool or a template. Evidence: what the sandbox sees at
/workspace and at the listed paths (inode numbers the host compares with
its own), the uid_map each runs with and the owner of what it writes."""

from __future__ import annotations

import os
import threading

import attrs
import pytest

import zviz
from zviz import Bind, Filesystem, Policy, _ids, _plan, _planmemo, sync

from ..conftest import IS_ROOT, needs_userns
from ..test_plan import DIRS, host
from ..test_planmemo import _decode

pytestmark = [pytest.mark.filterwarnings("ignore::zviz.ZvizWarning")]

BASE = ("/usr", "/bin", "/etc", "/lib", "/lib64")
BASE_DIRS = {k: v for k, v in DIRS.items() if k != "/tmp/zviz-w"}


def _memo(policy: Policy, h, workdir: str) -> _planmemo.Prepared:
    return _planmemo.prepared(policy, h, workdir, zygote_allowed=True, trace=None, seccomp_flags=0, notify=True,
                              enter_netns=True)


def _fresh(policy: Policy, h, workdir: str) -> _planmemo.Prepared:
    return _planmemo._build(policy, h, workdir, True, None, 0, True, True)


def _same_as_fresh(policy: Policy, h, workdir: str) -> None:
    """Twice (the entry made, then reused): what the memo gives is a fresh plan's."""
    want = _fresh(policy, h, workdir)
    for _ in range(2):
        got = _memo(policy, h, workdir)
        assert got.plan == want.plan
        assert got.stage == want.stage and got.zygote_stage == want.zygote_stage
        assert _decode(got.packed) == _decode(want.packed)


PLACEHOLDER = _planmemo._WORKDIR


@pytest.mark.parametrize("how", ["bind source", "listed", "listed link", "listed, no Landlock"])
def test_a_policy_path_that_is_the_placeholder_workdir_is_not_replaced(how):
    """A policy (or a host link) naming the placeholder workdir's path: before,
    the entry's fill replaced that bind's source with the sandbox's own
    workdir as well (the policy's path showed the workdir). Now filling in
    must give what planning afresh gives, or the policy is planned per sandbox."""
    _planmemo.clear()
    h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, "/tmp/w": True, PLACEHOLDER: True},
                     sandbox_ids=(1879048200, 1879048200))
    if how == "bind source":
        policy = Policy(fs=Filesystem(read_only=BASE, binds=(Bind(source=PLACEHOLDER, target="/data"),)))
    elif how == "listed link":
        h = attrs.evolve(h, is_dir={**h.is_dir, "/srv/x": True}, links={"/srv/x": PLACEHOLDER})
        policy = Policy(fs=Filesystem(read_only=(*BASE, "/srv/x")))
    else:
        policy = Policy(fs=Filesystem(read_only=(*BASE, PLACEHOLDER)))
        if how.endswith("no Landlock"):
            h = attrs.evolve(h, features=attrs.evolve(h.features, landlock_abi=0))
    _same_as_fresh(policy, h, "/tmp/w")
    binds = _memo(policy, h, "/tmp/w").plan.new_root.binds
    assert binds.count(("/tmp/w", False)) == 1 and ("/tmp/w", True) not in binds
    assert any(src == PLACEHOLDER for src, _ro in binds)


@pytest.mark.parametrize("workdir", ["/srv/data", "/tmp"])
def test_a_caller_workdir_the_plan_also_reads_is_planned_as_afresh(workdir):
    """A caller's `workdir=` that the policy also lists (read-write), or that
    is where the root is assembled (/tmp): its host facts were left out of
    the entry as the sandbox's own, so the listed path "did not exist"
    (PolicyError) or the root went to /var/tmp instead."""
    _planmemo.clear()
    h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS}, sandbox_ids=(1879048200, 1879048200))
    policy = Policy(fs=Filesystem(read_only=BASE, read_write=("/srv/data",)))
    _same_as_fresh(policy, h, workdir)
    # and another sandbox of the policy, with a workdir of its own, shares that entry and gets its own
    _same_as_fresh(policy, attrs.evolve(h, is_dir={**h.is_dir, "/tmp/other": True}), "/tmp/other")


@pytest.mark.parametrize("ids", [(3999999937, 3999999931), (3999999931, 3999999937), (3999999937, 3999999937),
                                 (3999999941, 3999999947)])
def test_ids_equal_to_the_placeholders_are_filled_in_as_they_are(ids):
    """A sandbox's host ids equal to (swapped) placeholder or check ids (a
    ZVIZ_HOST_IDS range may hold them): the uid_map says its own uid, the
    gid_map its own gid. (Root's leases have uid == gid, so the swapped pair
    is not one zviz makes; the fill must not depend on that.)"""
    _planmemo.clear()
    h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, "/tmp/w": True}, sandbox_ids=ids)
    _same_as_fresh(Policy(fs=Filesystem(read_only=BASE)), h, "/tmp/w")
    plan = _memo(Policy(fs=Filesystem(read_only=BASE)), h, "/tmp/w").plan
    assert plan.uid_map == f"{_plan.SANDBOX_UID} {ids[0]} 1\n" and plan.gid_map == f"{_plan.SANDBOX_UID} {ids[1]} 1\n"
    assert (plan.host_uid, plan.host_gid) == ids


@pytest.mark.parametrize("policy", [
    Policy(fs=Filesystem(read_only=BASE, tmp_size=3999999931)),
    Policy(fs=Filesystem(read_only=BASE), env={"X": "3999999931 3999999937 /zviz-planmemo-placeholder/workdir"}),
    Policy(fs=Filesystem(read_only=BASE, tmp_size=3999999937), limits=zviz.Limits(memory=3999999931,
                                                                                     open_files=3999999937)),
    Policy(fs=Filesystem(read_only=BASE), env={"X": "3999999941 /zviz-planmemo-check/workdir"}),
])
def test_policy_values_that_spell_a_placeholder_plan_as_afresh(policy):
    """Sizes, limits and environment values whose digits are a placeholder id,
    or whose text is the placeholder workdir (or the check's): the sandbox's
    plan is still exactly a fresh one's."""
    _planmemo.clear()
    for ids in ((1879048200, 1879048200), (1879048201, 1879048201)):
        h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, "/tmp/w": True}, sandbox_ids=ids)
        _same_as_fresh(policy, h, "/tmp/w")


@needs_userns()
@pytest.mark.trio
async def test_a_bind_of_the_placeholder_path_shows_that_path_not_the_workdir(tmp_path, monkeypatch):
    """End to end, with the placeholder moved to a directory this test owns
    (the real one is at /): the policy binds that directory at /data. Before,
    /data showed the sandbox's own workdir (the host saw the same inode at
    /data and at the workdir); now it shows the directory itself."""
    placeholder = tmp_path / "placeholder"
    placeholder.mkdir()
    (placeholder / "marker").write_text("the placeholder's own\n")
    os.chmod(tmp_path, 0o755)
    monkeypatch.setattr(_planmemo, "_WORKDIR", str(placeholder))
    _planmemo.clear()
    policy = Policy.shell(fs=Filesystem(read_only=Policy.shell().fs.read_only,
                                        binds=(Bind(source=str(placeholder), target="/data"),)))
    for _ in range(2):  # (the second is planned from the memo, if at all)
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run(["sh", "-c", "stat -c %i /data; stat -c %i /workspace; cat /data/marker"])
            assert r.status == 0, r.stderr
            lines = r.stdout.decode().splitlines()
            assert int(lines[0]) == os.stat(placeholder).st_ino != os.stat(sb.workdir).st_ino
            assert int(lines[1]) == os.stat(sb.workdir).st_ino
            assert lines[2] == "the placeholder's own"


@needs_userns()
@pytest.mark.trio
async def test_a_given_workdir_the_policy_lists_read_write(tmp_path):
    """`workdir=d` with `d` also in fs.read_write: before, the memo planned it
    as if `d` did not exist (PolicyError); now the sandbox opens, `d` is at
    /workspace and at its own path, the same host inode."""
    d = tmp_path / "wd"
    d.mkdir()
    for p in (tmp_path, d):
        os.chmod(p, 0o1777)  # (a root caller's sandbox runs as a uid of its own)
    _planmemo.clear()
    policy = Policy.shell(fs=Filesystem(read_only=Policy.shell().fs.read_only, read_write=(str(d),)))
    for name in ("one", "two"):
        async with zviz.open_sandbox(policy, workdir=d) as sb:
            r = await sb.run(["sh", "-c", f"echo {name} > /workspace/{name}; stat -c %i /workspace {d}"])
            assert r.status == 0, r.stderr
            assert [int(x) for x in r.stdout.split()] == [os.stat(d).st_ino] * 2
            assert (d / name).read_text() == f"{name}\n"


def _own(sb: sync.Sandbox) -> tuple[int, int, int]:
    """(the uid_map's host uid, /workspace's inode, the owner of a file it wrote), as seen from the sandbox
    and the host."""
    r = sb.run(["sh", "-c", "cat /proc/self/uid_map; stat -c %i /workspace; echo x > /workspace/mine"])
    assert r.status == 0, r.stderr
    out = r.stdout.decode().split()
    return int(out[1]), int(out[3]), os.stat(os.path.join(sb.workdir, "mine")).st_uid


@needs_userns()
@pytest.mark.parametrize("kind", ["plain", "disk"])
def test_sandboxes_of_one_policy_made_from_threads_each_get_their_own(kind):
    """zviz.sync from 4 threads at once, one policy (fs.disk: the workdir is
    a tmpfs mounted for the sandbox's uid): each sandbox's /workspace is its
    own workdir's inode, and for a root caller its uid_map's host uid is its
    own, distinct from the others', and owns what it wrote."""
    _planmemo.clear()
    policy = Policy.shell(fs=Filesystem(read_only=Policy.shell().fs.read_only,
                                        disk="16M" if kind == "disk" and IS_ROOT else None))
    seen: list[tuple[int, int, int, int]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with sync.open_sandbox(policy) as sb:
                uid, ino, owner = _own(sb)
                seen.append((uid, ino, owner, os.stat(sb.workdir).st_ino))
                barrier.wait(timeout=60)  # (all open at once)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            barrier.abort()

    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert any(e is not None for e in _planmemo._memo.values())  # (they were planned from an entry)
    for uid, ino, owner, host_ino in seen:
        assert ino == host_ino
        if IS_ROOT:
            assert owner == uid
    if IS_ROOT:
        assert len({s[0] for s in seen}) == 4, seen


def _changed(value: object) -> object:
    """Another value of a host fact's kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + " (changed)"
    if isinstance(value, tuple):
        return (*value, "/changed")
    if isinstance(value, dict):
        return {**value, "/changed": next(iter(value.values()), "/x")}
    if attrs.has(type(value)):
        return attrs.evolve(value, landlock_abi=value.landlock_abi - 1)
    raise AssertionError(f"no changed value for {value!r}: teach this test the new host fact")


@pytest.mark.parametrize("field", [f.name for f in attrs.fields(_plan.Host)])
def test_every_host_fact_but_the_ids_is_in_the_key(field):
    """A host fact changed between two sandboxes of one policy (a path made a
    link or removed, a hard limit lowered, the process's ids, a new fact
    added to Host one day) makes a new entry, never a stale plan; the ids
    alone are each sandbox's own."""
    policy = Policy(fs=Filesystem(read_only=BASE, read_write=("/srv/data",)))
    h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, "/tmp/w": True}, links={"/srv/x": "/srv"},
                     hidden=("/run/zviz",))
    other = attrs.evolve(h, **{field: _changed(getattr(h, field))})
    key = _planmemo._key(policy, h, "/tmp/w", True, 0, True, True)
    assert (_planmemo._key(policy, other, "/tmp/w", True, 0, True, True) == key) == (field == "sandbox_ids")


@needs_userns()
@pytest.mark.trio
async def test_a_listed_path_made_a_link_between_sandboxes(tmp_path):
    """Sandbox one of a policy lists `data` (a directory); then `data` becomes
    a link to another directory; sandbox two of the same policy binds the
    link's target (the host's inode of it): a new plan, not the first's."""
    data, other = tmp_path / "data", tmp_path / "other"
    data.mkdir()
    other.mkdir()
    (data / "f").write_text("one\n")
    (other / "f").write_text("two\n")
    os.chmod(tmp_path, 0o755)
    _planmemo.clear()
    policy = Policy.shell(fs=Filesystem(read_only=(*Policy.shell().fs.read_only, str(data))))
    for want, dirname in (("one", data), ("two", other)):
        if want == "two":
            data.rename(tmp_path / "old")
            data.symlink_to(other)
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run(["sh", "-c", f"stat -c %i {data}; cat {data}/f"])
        assert r.status == 0, r.stderr
        ino, text = r.stdout.decode().split()
        assert (int(ino), text) == (os.stat(dirname).st_ino, want)


_LOWER = """
import resource, zviz
from zviz import sync
policy = zviz.Policy.shell()
for i in range(2):
    with sync.open_sandbox(policy) as sb:
        print(sb.run(["sh", "-c", "ulimit -Hn"]).stdout.decode().strip(), flush=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 777), 777))
"""


@needs_userns()
def test_a_hard_limit_lowered_between_sandboxes():
    """The process lowers its RLIMIT_NOFILE hard limit between two sandboxes
    of one policy (in a child process: a lowered hard limit cannot be raised
    back): the second runs under the lower one."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LOWER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = (int(x) for x in out.stdout.split())
    assert first > 777 and second == 777


async def _own_async(sb: zviz.Sandbox) -> tuple[int, int, int, int]:
    """(the uid_map's host uid, /workspace's inode, the owner of a file it wrote, its workdir's host inode)."""
    r = await sb.run(["sh", "-c", "cat /proc/self/uid_map; stat -c %i /workspace; echo x > /workspace/mine"])
    assert r.status == 0, r.stderr
    out = r.stdout.decode().split()
    return int(out[1]), int(out[3]), os.stat(os.path.join(sb.workdir, "mine")).st_uid, os.stat(sb.workdir).st_ino


@needs_userns()
@pytest.mark.trio
async def test_pooled_and_templated_sandboxes_of_one_policy_each_get_their_own(tmp_path):
    """Sandboxes of one policy from the pool (made ahead, in the background)
    and from a template (a root caller's is an overlay mounted for the
    sandbox's uid), all open at once: each /workspace is its own workdir,
    and for a root caller each runs as, and writes as, a uid of its own."""
    import contextlib

    async with zviz.open_sandbox(Policy.shell()) as sb:
        await sb.run(["sh", "-c", "echo t > from-template"])
        await sb.snapshot(str(tmp_path / "t"))
    os.chmod(tmp_path, 0o755)
    _planmemo.clear()
    zviz.set_pool_size(2)
    try:
        async with contextlib.AsyncExitStack() as stack:
            sbs = [await stack.enter_async_context(zviz.open_sandbox(Policy.shell())) for _ in range(3)]
            sbs += [await stack.enter_async_context(zviz.open_sandbox(Policy.shell(), template=str(tmp_path / "t")))
                    for _ in range(2)]
            seen = [await _own_async(sb) for sb in sbs]
            for sb in sbs[3:]:
                r = await sb.run(["cat", "/workspace/from-template"])
                assert r.stdout == b"t\n"
    finally:
        zviz.set_pool_size(None)
    assert any(e is not None for e in _planmemo._memo.values())
    for uid, ino, owner, host_ino in seen:
        assert ino == host_ino
        if IS_ROOT:
            assert owner == uid
    assert len({s[3] for s in seen}) == 5
    if IS_ROOT:
        assert len({s[0] for s in seen}) == 5, seen


_DROP = """
import ctypes, os, zviz
from zviz import sync, _planmemo

def one():
    with sync.open_sandbox(zviz.Policy.shell()) as sb:
        r = sb.run(["sh", "-c", "cat /proc/self/uid_map; echo x > /workspace/mine"])
        assert r.status == 0, r.stderr
        print(r.stdout.decode().split()[1], os.stat(os.path.join(sb.workdir, "mine")).st_uid, flush=True)

one()
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: may write its children's id maps
one()
print(_planmemo.misses, flush=True)
"""


@needs_userns()
@pytest.mark.skipif(not IS_ROOT, reason="drops root's privileges mid-way")
def test_a_process_that_drops_root_between_sandboxes_plans_anew():
    """A root process opens a sandbox (a host uid of its own), drops to
    65534 and opens another of the same policy: the second is planned for
    the unprivileged caller (its uid_map maps 65534, which owns what it
    writes), not filled from root's entry."""
    import shutil
    import subprocess
    import sys
    import tempfile

    tmp = tempfile.mkdtemp(prefix="zviz-drop-", dir="/tmp")  # (every parent passable by 65534)
    os.chmod(tmp, 0o1777)
    try:
        out = subprocess.run([sys.executable, "-c", _DROP], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    first, second, misses = out.stdout.splitlines()
    uid, owner = (int(x) for x in first.split())
    assert uid == owner and uid in _ids.id_range()
    assert second.split() == ["65534", "65534"] and misses == "2"
