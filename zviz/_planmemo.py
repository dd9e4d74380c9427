"""A sandbox's plan and stage, made once per policy and reused by each sandbox of it.

Planning a sandbox (`_plan.plan_sandbox`), deriving its stage and packing the
buffer its first spawn reads cost ~0.4 ms of CPU per sandbox, and nearly all
of it is the same for every sandbox of one policy on one host. Two facts are
each sandbox's own: its workdir (the host source of the bind at /workspace)
and, for a root caller, its host uid and gid (its user namespace's id maps,
and who owns what it writes).

So the memo holds what was planned with placeholders for those two: a
made-up workdir path and made-up ids that no sandbox has. Each sandbox gets
a copy with its own workdir and ids put in their places (the plan's and the
stage's fields, and the packed buffer's strings, which `StageSpec.
pack_with_holes` leaves at its end). No entry ever holds a real sandbox's
workdir or uid: a sandbox cannot be handed another's, whatever happens to
the memo.

An entry is used only if filling it in gives what planning afresh gives.
That is checked when the entry is made: it is filled with a second set of
placeholders and must equal a plan made afresh with those (plan, stage and
buffer), and none of them may still show the first set. So a policy whose
own paths lead to a placeholder (a listed path, a bind's source, a link's
target equal to the placeholder workdir) is planned per sandbox rather
than handed the sandbox's workdir there. A plan that uses the workdir or
the ids anywhere else (no new root: the workdir is a Landlock rule and the
working directory; root without a user namespace: the ids are the
credentials and HOME's owner) is never reused: such a policy is planned
per sandbox, as before. So is every traced sandbox (`zviz trace`).

The key is the policy and every host fact the plan reads (each `Host`
field but the ids: kernel features, the caller's ids and hard limits,
which paths exist and where their links lead, as stat'ed for this very
sandbox), so a changed host makes a new entry, never a stale plan. The
workdir's own facts are left out, unless the plan also reads them as a
listed path, a bind's source or a place to assemble the root on (a
caller's `workdir=` that the policy lists too: then the entry holds that
path, as the policy's). It reads no host fact itself: `_sandbox._prepare`
gathers them (the filter is `_bpf.program`'s, cached on disk too).
"""

from __future__ import annotations

import collections
import re
import threading
from typing import Any

import attrs

from . import _bpf, _linux, _plan
from ._errors import PolicyError, SandboxSetupError
from ._spec import Holey, StageSpec

# Placeholders no real sandbox has: a path that cannot be a workdir (zviz's
# workdirs are beneath its own bases) and ids beyond the ranges zviz leases.
_WORKDIR = "/zviz-planmemo-placeholder/workdir"
_UID, _GID = 3999999931, 3999999937
# a second set: an entry filled with these must no longer show the first anywhere
_CHECK_WORKDIR = "/zviz-planmemo-check/workdir"
_CHECK_UID, _CHECK_GID = 3999999941, 3999999947
_IDS = re.compile(f"{_UID}|{_GID}")  # (replaced in one pass: a uid equal to the gid's placeholder stays the uid)

# (the key's host facts: name, whether a Mapping)
_HOST_FACTS = tuple((f.name, str(f.type).startswith("Mapping")) for f in attrs.fields(_plan.Host)
                    if f.name != "sandbox_ids")
MAX_ENTRIES = 32  # policies kept per process (least recently used out first)


@attrs.frozen
class Prepared:
    """One sandbox's plan and stage, and the buffer of its first spawn."""

    plan: _plan.SandboxPlan
    stage: StageSpec
    zygote_stage: StageSpec | None  # with a zygote: its variant of the stage
    packed: bytes  # the zygote stage's buffer with a zygote, else the stage's
    use_zygote: bool
    proxy_inside: bool  # domains with the proxy inside its network namespace (Runner.egress_inside)


@attrs.frozen
class _Entry:
    plan: _plan.SandboxPlan  # with the placeholders
    stage: StageSpec
    first: Holey  # the first spawn's buffer, the placeholders' strings left as holes
    holes: tuple[str, ...]
    use_zygote: bool
    proxy_inside: bool


_memo: collections.OrderedDict[tuple[object, ...], _Entry | None] = collections.OrderedDict()
_lock = threading.Lock()  # (sandboxes are planned on more than one thread: zviz.sync's loops, the CLI server's)
hits = 0  # (tests and benchmarks look)
misses = 0


def prepared(policy: Any, host: _plan.Host, workdir: str, *, zygote_allowed: bool, trace: Any,
             seccomp_flags: int, notify: bool, enter_netns: bool = False) -> Prepared:
    """The plan and stage of a sandbox with this `workdir` and `host.sandbox_ids`
    (`enter_netns`: whether this process may enter a sandbox's network
    namespace, for the egress proxy of net.mode = "domains")."""
    global hits, misses  # noqa: PLW0603 - the memo's own counters
    if trace is not None:
        return _build(policy, host, workdir, zygote_allowed, trace, seccomp_flags, notify, enter_netns)
    key = _key(policy, host, workdir, zygote_allowed, seccomp_flags, notify, enter_netns)
    with _lock:
        found = key in _memo
        entry = _memo[key] if found else None
        if found:
            hits += 1
            _memo.move_to_end(key)
    if not found:  # (made outside the lock: two threads may both make it, and either's is right)
        entry = _entry(policy, host, workdir, zygote_allowed, seccomp_flags, notify, enter_netns)
        with _lock:
            misses += 1
            _memo[key] = entry
            while len(_memo) > MAX_ENTRIES:
                _memo.popitem(last=False)
    if entry is None:  # this policy's plan uses the workdir or the ids beyond what is substituted
        return _build(policy, host, workdir, zygote_allowed, None, seccomp_flags, notify, enter_netns)
    return _fill(entry, workdir, host.sandbox_ids)


def clear() -> None:
    with _lock:
        _memo.clear()


def _key(policy: Any, host: _plan.Host, workdir: str, zygote_allowed: bool, seccomp_flags: int,
         notify: bool, enter_netns: bool) -> tuple[object, ...]:
    inside: object = None
    if policy.net.mode == "domains":
        from . import _egressproto

        inside = (_egressproto.LISTEN_INSIDE, enter_netns)
    own = _own(policy, workdir)
    facts: list[object] = []
    for name, mapping in _HOST_FACTS:  # every fact of the host but the sandbox's own ids (filled in), a new one too
        value = getattr(host, name)
        if mapping:
            items = frozenset(value.items())
            if own is not None and own in value:  # (is_dir and links: but for the sandbox's own workdir)
                items = items - {(own, value[own])}
            value = items
        facts.append(value)
    return (policy, *facts, zygote_allowed, seccomp_flags, notify, inside)


def _own(policy: Any, workdir: str) -> str | None:
    """The workdir, whose host facts are this sandbox's own; None when the plan
    reads them for another reason too (then they are part of the key)."""
    return None if workdir in _plan.looked_up(policy) else workdir


def _stand_in(host: _plan.Host, own: str | None, workdir: str, ids: tuple[int, int]) -> _plan.Host:
    """The host as a sandbox with this `workdir` and `ids` sees it, but for the `own` workdir's facts."""
    is_dir = {k: v for k, v in host.is_dir.items() if k != own}
    is_dir.setdefault(workdir, True)
    links = {k: v for k, v in host.links.items() if k != own}
    return attrs.evolve(host, is_dir=is_dir, links=links, sandbox_ids=ids)


def _entry(policy: Any, host: _plan.Host, workdir: str, zygote_allowed: bool, seccomp_flags: int,
           notify: bool, enter_netns: bool) -> _Entry | None:
    """Plan with the placeholders; None where filling them in would not give a fresh plan."""
    own = _own(policy, workdir)
    stand_in = _stand_in(host, own, _WORKDIR, (_UID, _GID))
    made = _build(policy, stand_in, _WORKDIR, zygote_allowed, None, seccomp_flags, notify, enter_netns, pack=False)
    if made.plan.new_root is None:  # the host's own tree: the workdir is a Landlock rule and the cwd
        return None
    holes = tuple(s for s in (_WORKDIR, made.stage.uid_map, made.stage.gid_map)
                  if s is not None and (s == _WORKDIR or str(_UID) in s or str(_GID) in s))
    first = made.zygote_stage if made.zygote_stage is not None else made.stage
    entry = _Entry(plan=made.plan, stage=made.stage, first=first.pack_with_holes(holes), holes=holes,
                   use_zygote=made.use_zygote, proxy_inside=made.proxy_inside)
    check = _fill(entry, _CHECK_WORKDIR, (_CHECK_UID, _CHECK_GID))
    shown = repr(check.plan) + repr(check.stage) + repr(check.zygote_stage)
    for mark in (_WORKDIR, str(_UID), str(_GID)):
        if mark in shown or mark.encode() in check.packed:
            return None
    # ... and what it gives is what planning afresh gives: no string of the policy or the host was taken
    # for a placeholder (a listed path that is, or leads to, the placeholder workdir)
    try:
        fresh = _build(policy, _stand_in(host, own, _CHECK_WORKDIR, (_CHECK_UID, _CHECK_GID)), _CHECK_WORKDIR,
                       zygote_allowed, None, seccomp_flags, notify, enter_netns, pack=False)
    except (PolicyError, SandboxSetupError, ValueError):  # (the sandbox's own plan, made afresh, decides)
        return None
    if (check.plan, check.stage, check.zygote_stage) != (fresh.plan, fresh.stage, fresh.zygote_stage):
        return None
    first = fresh.zygote_stage if fresh.zygote_stage is not None else fresh.stage
    filled = tuple(_sub(h, _CHECK_WORKDIR, str(_CHECK_UID), str(_CHECK_GID)) for h in holes)
    if check.packed != first.pack_with_holes(filled).fill(filled):
        return None
    return entry


def _sub(s: str, workdir: str, uid: str, gid: str) -> str:
    """A hole's string with this sandbox's workdir and ids."""
    return workdir if s == _WORKDIR else _IDS.sub(lambda m: uid if m.group() == str(_UID) else gid, s)


def _fill(entry: _Entry, workdir: str, ids: tuple[int, int]) -> Prepared:
    """The entry with this sandbox's workdir and ids in the placeholders' places."""
    uid, gid = str(ids[0]), str(ids[1])

    def sub(s: str) -> str:
        return _sub(s, workdir, uid, gid)

    plan = entry.plan
    root = plan.new_root
    assert root is not None  # (an entry has a new root: checked when it was made)
    binds = tuple((workdir if src == _WORKDIR else src, ro) for src, ro in root.binds)
    uid_map = sub(plan.uid_map) if plan.uid_map is not None else None
    gid_map = sub(plan.gid_map) if plan.gid_map is not None else None
    plan = attrs.evolve(plan, new_root=attrs.evolve(root, binds=binds), uid_map=uid_map, gid_map=gid_map,
                        host_uid=ids[0] if plan.host_uid == _UID else plan.host_uid,
                        host_gid=ids[1] if plan.host_gid == _GID else plan.host_gid)
    stage = attrs.evolve(entry.stage, binds=binds, uid_map=uid_map, gid_map=gid_map)
    zygote_stage = _plan.zygote_stage_spec(stage) if entry.use_zygote else None
    packed = entry.first.fill(tuple(sub(h) for h in entry.holes))
    return Prepared(plan=plan, stage=stage, zygote_stage=zygote_stage, packed=packed, use_zygote=entry.use_zygote,
                    proxy_inside=entry.proxy_inside)


def _build(policy: Any, host: _plan.Host, workdir: str, zygote_allowed: bool, trace: Any, seccomp_flags: int,
           notify: bool, enter_netns: bool, *, pack: bool = True) -> Prepared:
    """Plan one sandbox (it does not depend on the command)."""
    plan = _plan.plan_sandbox(policy, host, workdir=workdir)
    pid_ns = bool(plan.clone_flags & _linux.CLONE_NEWPID)
    # A zygote needs the pid namespace (its death must take every run
    # with it) and that namespace's /proc (a run-init finds what its
    # program left behind in /proc/thread-self/children).
    use_zygote = zygote_allowed and pid_ns and plan.mount_proc and trace is None
    # net.mode = "domains": the proxy listens inside the sandbox's network namespace (made by the host
    # entering it: CAP_SYS_ADMIN) and its connects are in-kernel; else each is supervised (_egress).
    net_mode = policy.net.mode
    egress_inside = False
    if net_mode == "domains":
        from . import _egressproto  # (imported for domains only: ~6 ms of class building)

        egress_inside = (use_zygote and _egressproto.LISTEN_INSIDE
                         and bool(plan.clone_flags & _linux.CLONE_NEWNET) and enter_netns)
        net_mode = _egressproto.kernel_mode(net_mode, in_netns=egress_inside)
        if policy.net.way == "direct":
            if not egress_inside:  # (the sandbox checked the host first: a plan that cannot be kept is a bug)
                raise ValueError("net.way = 'direct' needs a zygote, a network namespace and a host that enters it")
            net_mode = "direct"
    spec = _bpf.FilterSpec(allow=policy.syscalls.names() - set(plan.deny_syscalls),
                           net_mode=net_mode,
                           notify=notify, zygote=use_zygote,
                           pid_ns=pid_ns,
                           netns=bool(plan.clone_flags & _linux.CLONE_NEWNET),
                           blank_netns=plan.blank_netns)
    if trace is not None:
        spec = trace.filter_spec(notify)
    bpf = _bpf.program(spec)  # compiled once per policy, and kept on disk for the next process
    stage = _plan.stage_spec(plan, bpf=bpf, seccomp_flags=seccomp_flags)
    if trace is not None:
        stage = attrs.evolve(stage, ll_net=0, ll_ports=())  # tracing observes connections rather than refusing them
    elif net_mode == "direct":  # no TCP connect or bind of its own: the pump makes its connects (_pump.c)
        stage = attrs.evolve(stage, ll_ports=())
    elif egress_inside:  # every destination loops back to its namespace's lo, refused and seen (_egresswatch);
        stage = attrs.evolve(stage, ll_net=stage.ll_net & ~_plan.NET_CONNECT_TCP, ll_ports=())  # no TCP bind still
    zygote_stage = _plan.zygote_stage_spec(stage) if use_zygote else None
    # Packing checks the tables: a sandbox whose stage cannot be packed fails here, before it is opened.
    packed = b""
    if pack:
        packed = zygote_stage.pack() if zygote_stage is not None else stage.pack()
    return Prepared(plan=plan, stage=stage, zygote_stage=zygote_stage, packed=packed, use_zygote=use_zygote,
                    proxy_inside=spec.net_mode in ("domains", "direct"))
