"""The per-policy memo of plans and stages (zviz/_planmemo.py): what a
sandbox gets from it is exactly what planning it afresh gives, no entry
holds any sandbox's own workdir or ids, and a plan it cannot fill in
completely is never reused."""

from __future__ import annotations

import os
import struct

import attrs
import pytest
import trio
from hypothesis import given, settings, strategies as st

import zviz
from zviz import Bind, Filesystem, Network, Policy, _plan, _planmemo, _spec
from zviz._spec import SPEC_BIND, SPEC_HEADER, SPEC_MASK, SPEC_OP, SPEC_PATH, SPEC_PORT, SPEC_RLIMIT, StageSpec

from .conftest import needs_userns
from .test_plan import DIRS, host

WORKDIRS = ("/tmp/zviz-w", "/var/tmp/zviz-other-workdir-with-a-longer-name", "/tmp/z")
IDS = ((1000, 1000), (100007, 100013), (4000012345, 4000012346))
BASE_DIRS = {k: v for k, v in DIRS.items() if k != "/tmp/zviz-w"}  # (each sandbox stats its own workdir only)
DISTINCT_IDS = ((222331, 222337), (100007, 100013), (4000012345, 4000012346))  # (found in no plan otherwise)


def _decode(buf: bytes) -> tuple[object, ...]:
    """A packed StageSpec read back as values: every string resolved (so two
    layouts of the same strings decode alike)."""
    h = SPEC_HEADER.unpack_from(buf, 0)

    def s(off: int) -> str | None:
        return None if off == 0 else buf[off:buf.index(b"\0", off)].decode()

    (magic, flags, clone, uid, gid, pdeath, ll_abi, sflags, _pad, ll_fs, ll_net, ll_scoped, staging, hostname,
     uid_map, gid_map, nb, no, nm, nr, nlp, nlpo, bpf_off, bpf_len) = h
    at = SPEC_HEADER.size
    binds, ops, masks, rl, llp, llpo = [], [], [], [], [], []
    for _ in range(nb):
        src, ro = SPEC_BIND.unpack_from(buf, at)
        binds.append((s(src), ro))
        at += SPEC_BIND.size
    for _ in range(no):
        kind, path, arg, bind = SPEC_OP.unpack_from(buf, at)
        ops.append((kind, s(path), s(arg), bind))
        at += SPEC_OP.size
    for _ in range(nm):
        kind, path = SPEC_MASK.unpack_from(buf, at)
        masks.append((kind, s(path)))
        at += SPEC_MASK.size
    for _ in range(nr):
        rl.append(SPEC_RLIMIT.unpack_from(buf, at))
        at += SPEC_RLIMIT.size
    for _ in range(nlp):
        path, _p, access = SPEC_PATH.unpack_from(buf, at)
        llp.append((s(path), access))
        at += SPEC_PATH.size
    for _ in range(nlpo):
        llpo.append(SPEC_PORT.unpack_from(buf, at))
        at += SPEC_PORT.size
    return (magic, flags, clone, uid, gid, pdeath, ll_abi, sflags, ll_fs, ll_net, ll_scoped, s(staging), s(hostname),
            s(uid_map), s(gid_map), binds, ops, masks, rl, llp, llpo, buf[bpf_off:bpf_off + bpf_len])


def _stage() -> StageSpec:
    return StageSpec(clone_flags=0x10000000, uid_map="0 1000 1\n", gid_map="0 1000 1\n", staging="/tmp",
                     hostname="zviz", binds=(("/usr", True), ("/w", False), ("/etc", True)),
                     mount_ops=((1, "usr", "", -1), (4, "usr", "", 0), (2, "dev/fd", "/proc/self/fd", -1)),
                     masks=((1, "/proc/kcore"), (2, "/w/x")), rlimits=((7, 64, 64), (9, 1 << 20, 1 << 20)),
                     ll_paths=(("/usr", 3), ("/w", 7)), ll_ports=((3128, 1),), bpf=b"\x06\0\0\0\0\0\xff\x7f",
                     landlock_abi=7)


@pytest.mark.parametrize("holes", [(), ("/w",), ("0 1000 1\n",), ("/w", "/proc/self/fd", "/proc/kcore"),
                                   ("/usr", "zviz", "/tmp")])
def test_every_field_that_points_at_a_hole_is_filled(holes):
    """Holes in binds, mount ops (path and argument), masks, Landlock paths
    and the header: filled with other strings, the buffer reads back as the
    spec with those strings in their places; with their own, as pack()."""
    spec = _stage()
    holey = spec.pack_with_holes(holes)
    assert _decode(holey.fill(holes)) == _decode(spec.pack())
    others = tuple(f"/other-{i}-{'x' * i}" for i in range(len(holes)))
    swap = dict(zip(holes, others, strict=True))

    def sub(x: str | None) -> str | None:
        return swap.get(x, x) if x is not None else None

    expected = attrs.evolve(spec, binds=tuple((sub(a), b) for a, b in spec.binds),
                            mount_ops=tuple((k, sub(p), sub(a), i) for k, p, a, i in spec.mount_ops),
                            masks=tuple((k, sub(p)) for k, p in spec.masks),
                            ll_paths=tuple((sub(p), a) for p, a in spec.ll_paths), staging=sub(spec.staging),
                            hostname=sub(spec.hostname), uid_map=sub(spec.uid_map), gid_map=sub(spec.gid_map))
    assert _decode(holey.fill(others)) == _decode(expected.pack())
    assert spec.pack() == spec.pack_with_holes(()).fill(())  # (the buffer without holes is unchanged)
    with pytest.raises(ValueError, match="holes"):
        holey.fill((*others, "one too many"))
    if holes:
        with pytest.raises(ValueError, match="NUL"):
            holey.fill(("bad\0string", *others[1:]))


def _policies() -> list[Policy]:
    base = ("/usr", "/bin", "/etc", "/lib", "/lib64")
    return [
        Policy(fs=Filesystem(read_only=base)),
        Policy(fs=Filesystem(read_only=base, read_write=("/srv/data",))),
        Policy(fs=Filesystem(read_only=base, binds=(Bind(source="/srv", target="/data", read_only=True),))),
        Policy(fs=Filesystem(read_only=base), net=Network(mode="loopback")),
        Policy(fs=Filesystem(read_only=base), net=Network.domains(["pkgs.test"], hosts={"pkgs.test": "127.0.0.1"})),
    ]


def _hosts() -> list[_plan.Host]:
    return [host(), host(euid=0), host(euid=0, userns=False), host(landlock_abi=0), host(memory_cgroup=False)]


def _memo(policy: Policy, h: _plan.Host, workdir: str, zygote: bool) -> _planmemo.Prepared:
    return _planmemo.prepared(policy, h, workdir, zygote_allowed=zygote, trace=None, seccomp_flags=0, notify=True,
                              enter_netns=True)


def _real(policy: Policy, h: _plan.Host, workdir: str, zygote: bool) -> _planmemo.Prepared:
    return _planmemo._build(policy, h, workdir, zygote, None, 0, True, True)


@pytest.mark.parametrize("zygote", [True, False])
def test_what_the_memo_gives_is_what_planning_afresh_gives(zygote):
    """For each policy and host, and several workdirs and ids in turn (the
    same entry reused): the plan, the stage, its zygote variant and the
    first spawn's buffer equal a fresh plan's for that very workdir and ids."""
    _planmemo.clear()
    for policy in _policies():
        for h0 in _hosts():
            for workdir in WORKDIRS:
                for ids in IDS:
                    h = attrs.evolve(h0, is_dir={**BASE_DIRS, workdir: True}, sandbox_ids=ids)
                    try:
                        want = _real(policy, h, workdir, zygote)
                    except zviz.PolicyError:
                        with pytest.raises(zviz.PolicyError):
                            _memo(policy, h, workdir, zygote)
                        continue
                    got = _memo(policy, h, workdir, zygote)
                    assert got.plan == want.plan
                    assert got.stage == want.stage
                    assert got.zygote_stage == want.zygote_stage
                    assert (got.use_zygote, got.proxy_inside) == (want.use_zygote, want.proxy_inside)
                    assert _decode(got.packed) == _decode(want.packed)
    assert _planmemo.hits > 0


def test_no_entry_holds_a_sandboxs_own_workdir_or_ids():
    _planmemo.clear()
    seen = []
    for policy in _policies():
        for workdir, ids in zip(WORKDIRS, DISTINCT_IDS, strict=True):
            h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, workdir: True}, sandbox_ids=ids)
            _memo(policy, h, workdir, True)
            seen.append((workdir, ids))
    entries = [e for e in _planmemo._memo.values() if e is not None]
    assert entries, "the root host's plans with a new root are memoized"
    for e in entries:
        text = repr(e.plan) + repr(e.stage)
        for workdir, (uid, gid) in seen:
            assert workdir not in text and workdir.encode() not in e.first.prefix
            assert str(uid) not in text and str(gid) not in text
            assert str(uid).encode() not in e.first.prefix


def test_a_plan_that_uses_the_workdir_elsewhere_is_planned_per_sandbox():
    """No new root (the workdir is a Landlock rule and the working directory)
    and root without a user namespace (the ids are the credentials): never
    reused, and still each sandbox's own."""
    _planmemo.clear()
    cases = [(Policy(fs=Filesystem(read_only=("/",))), host()),  # the host's tree, read-only: no new root
             (Policy(fs=Filesystem(read_only=("/usr", "/bin"))), host(euid=0, userns=False))]
    for policy, h0 in cases:
        for workdir, ids in zip(WORKDIRS, IDS, strict=True):
            h = attrs.evolve(h0, is_dir={**BASE_DIRS, workdir: True}, sandbox_ids=ids)
            got = _memo(policy, h, workdir, True)
            want = _real(policy, h, workdir, True)
            assert got.plan == want.plan and got.packed == want.packed
    assert list(_planmemo._memo.values()) == [None, None]


def test_a_changed_host_fact_makes_a_new_entry():
    _planmemo.clear()
    policy = _policies()[1]
    h = attrs.evolve(host(), is_dir={**BASE_DIRS, "/tmp/zviz-w": True})
    a = _memo(policy, h, "/tmp/zviz-w", True)
    # /srv/data is now a link to /srv (its real path): the plan binds the real path
    h2 = attrs.evolve(h, links={"/srv/data": "/srv"})
    b = _memo(policy, h2, "/tmp/zviz-w", True)
    assert a.plan != b.plan and len(_planmemo._memo) == 2
    assert b.plan == _real(policy, h2, "/tmp/zviz-w", True).plan


async def _inside(sb: zviz.Sandbox, script: str) -> str:
    r = await sb.run(["sh", "-c", script])
    assert r.status == 0, r.stderr
    return r.stdout.decode()


@needs_userns()
@pytest.mark.trio
async def test_sandboxes_of_one_policy_each_get_their_own_workdir_and_ids():
    """Two sandboxes of one policy, open together, planned once: each sees its
    own workdir at /workspace (a file one writes is not in the other's), and,
    for a root caller, runs as its own host uid (its uid_map, the owner of
    what it writes)."""
    policy = Policy.shell()
    async with zviz.open_sandbox(policy) as a, zviz.open_sandbox(policy) as b:
        hits = _planmemo.hits
        async with zviz.open_sandbox(policy) as c:
            assert _planmemo.hits == hits + 1  # (planned from the memo)
            for sb, name in ((a, "a"), (b, "b"), (c, "c")):
                await _inside(sb, f"echo {name} > /workspace/mine")
            for sb, name in ((a, "a"), (b, "b"), (c, "c")):
                assert await trio.Path(sb.workdir, "mine").read_text() == f"{name}\n"
                assert await _inside(sb, "cat /workspace/mine; ls /workspace") == f"{name}\nmine\n"
            if os.geteuid() == 0:
                maps = [await _inside(sb, "cat /proc/self/uid_map") for sb in (a, b, c)]
                host_uids = [int(m.split()[1]) for m in maps]
                assert len(set(host_uids)) == 3, maps
                for sb, uid in zip((a, b, c), host_uids, strict=True):
                    assert os.stat(os.path.join(sb.workdir, "mine")).st_uid == uid


def test_the_header_positions_the_relocations_write_are_its_string_fields():
    buf = StageSpec(staging="/s", hostname="h", uid_map="u", gid_map="g").pack()
    at = _spec._AT_STAGING
    got = [buf[o:buf.index(b"\0", o)] for o in struct.unpack_from("=4I", buf, at)]
    assert got == [b"/s", b"h", b"u", b"g"]


def test_a_plan_that_would_show_the_workdir_where_it_is_not_filled_in_is_not_reused(monkeypatch):
    """Should planning one day put the workdir (or the ids) somewhere the
    memo does not fill in, here the environment, the memo notices when it
    makes the entry and plans that policy per sandbox instead."""
    real = _plan.plan_sandbox

    def leaky(policy, host, *, workdir, extra_env=None):
        p = real(policy, host, workdir=workdir, extra_env=extra_env)
        return attrs.evolve(p, env=(*p.env, ("ZVIZ_WORKDIR", workdir), ("UID", str(host.sandbox_ids[0]))))

    monkeypatch.setattr(_plan, "plan_sandbox", leaky)
    _planmemo.clear()
    policy = _policies()[0]
    for workdir, ids in zip(WORKDIRS, DISTINCT_IDS, strict=True):
        h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, workdir: True}, sandbox_ids=ids)
        got = _memo(policy, h, workdir, True)
        assert ("ZVIZ_WORKDIR", workdir) in got.plan.env and ("UID", str(ids[0])) in got.plan.env
    assert list(_planmemo._memo.values()) == [None]


def test_threads_planning_at_once_while_entries_are_evicted_get_their_own_plans():
    """zviz.sync's loops and the CLI server plan on threads of their own: more
    policies than the memo keeps, looked up and evicted from 4 threads at
    once, and each answer still that sandbox's own."""
    import threading

    _planmemo.clear()
    policy = _policies()[0]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(150):
                n = (i * 7 + seed) % (_planmemo.MAX_ENTRIES + 9)  # distinct hard limits: distinct keys
                workdir = f"/tmp/zviz-t{seed}-{i}"
                h = attrs.evolve(host(euid=0), is_dir={**BASE_DIRS, workdir: True}, sandbox_ids=(300000 + i, 300000),
                                 rlimit_hard={**host().rlimit_hard, "nofile": 1024 + n})
                got = _memo(policy, h, workdir, True)
                assert got.plan.new_root is not None and (workdir, False) in got.plan.new_root.binds
                assert got.plan.host_uid == 300000 + i and f" {300000 + i} " in (got.plan.uid_map or "")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(_planmemo._memo) <= _planmemo.MAX_ENTRIES


_WORDS = ("/a", "/b", "/a/b", "zviz", "0 1000 1\n", "", "/proc/self/fd", "/w")
_WORD = st.sampled_from(_WORDS)
_SPECS = st.builds(
    StageSpec, uid_map=st.none() | _WORD, gid_map=st.none() | _WORD, staging=st.none() | _WORD,
    hostname=st.none() | _WORD, binds=st.lists(st.tuples(_WORD, st.booleans()), max_size=5).map(tuple),
    mount_ops=st.lists(st.tuples(st.integers(1, 6), _WORD, _WORD, st.integers(-1, 4)), max_size=6).map(tuple),
    masks=st.lists(st.tuples(st.integers(1, 4), _WORD), max_size=4).map(tuple),
    rlimits=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 2**63), st.integers(0, 2**63)),
                     max_size=3).map(tuple),
    ll_paths=st.lists(st.tuples(_WORD, st.integers(0, 2**40)), max_size=5).map(tuple),
    ll_ports=st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 3)), max_size=2).map(tuple),
    bpf=st.binary(max_size=24).map(lambda b: b[:len(b) // 8 * 8]))


@settings(max_examples=300, deadline=None)
@given(_SPECS, st.lists(_WORD, unique=True, max_size=4).map(tuple),
       st.lists(st.sampled_from((*_WORDS, "/other", "/a much longer replacement/" + "x" * 50)), min_size=4,
                max_size=4))
def test_holes_in_any_table_fill_as_packing_the_filled_spec(spec, holes, values):
    """Any spec, any strings chosen as holes (shared by several tables, equal
    to a header field, absent), any strings put in (equal to others, longer,
    empty): the filled buffer reads back as packing the spec with every field
    that held a hole holding its value; filled with the holes themselves, as
    pack()."""
    swap = dict(zip(holes, values, strict=False))

    def sub(x):
        return swap.get(x, x) if x is not None else None

    holey = spec.pack_with_holes(holes)
    assert _decode(holey.fill(holes)) == _decode(spec.pack())
    expected = attrs.evolve(spec, binds=tuple((sub(a), b) for a, b in spec.binds),
                            mount_ops=tuple((k, sub(p), sub(a), i) for k, p, a, i in spec.mount_ops),
                            masks=tuple((k, sub(p)) for k, p in spec.masks),
                            ll_paths=tuple((sub(p), a) for p, a in spec.ll_paths), staging=sub(spec.staging),
                            hostname=sub(spec.hostname), uid_map=sub(spec.uid_map), gid_map=sub(spec.gid_map))
    filled = holey.fill(tuple(values[:len(holes)]))
    assert _decode(filled) == _decode(expected.pack())
    # (the holes' strings are added after the rest, which keeps its size)
    assert len(filled) == len(holey.prefix) + sum(len(v.encode()) + 1 for v in values[:len(holes)])
