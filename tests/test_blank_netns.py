"""The blank network namespace (zviz/_netns.py, zviz/_sockets.py): the plan,
the filter and the supervisor's part, pure; what a sandbox sees is in
tests/escape/test_blank_netns.py."""

from __future__ import annotations

import itertools

import attrs
import pytest

from zviz import Namespaces, Network, Policy, PolicyError, _argrules, _bpf, _linux, _sockets, _syscalls

from . import bpfsim
from .test_bpf import X86_64
from .test_plan import host, plan


def _root(**feat):
    return attrs.evolve(host(euid=0, **feat), blank_netns=True)

AF_UNIX, AF_INET, AF_NETLINK = 1, 2, 16
G = 0xDEADBEEF << 32


def _spec(blank: bool, netns: bool = False) -> _bpf.FilterSpec:
    return _bpf.FilterSpec(allow=_syscalls.GROUPS["@python"], net_mode="none", notify=True, zygote=True,
                           pid_ns=True, netns=netns, blank_netns=blank)


def _verdict(spec: _bpf.FilterSpec, name: str, *args: int) -> str:
    ret, _ = bpfsim.run(_bpf.compile_filter(spec), X86_64[name], args)
    return {bpfsim.ALLOW: "allow", bpfsim.NOTIFY: "notify"}.get(ret, hex(ret))


# ---- the plan


def test_a_none_sandbox_of_a_host_with_the_blank_namespace_makes_none_at_clone():
    p = plan(h=_root())
    assert p.blank_netns and not p.clone_flags & _linux.CLONE_NEWNET
    assert p.clone_flags & _linux.CLONE_NEWUSER  # the rest as before
    stage = _plan_stage(p)
    assert stage.blank_netns
    assert any("blank namespace" in s for s in p.steps())


@pytest.mark.parametrize("policy", [
    Policy(net=Network(mode="loopback")),  # a loopback of its own: made at clone
    Policy(namespaces=Namespaces(lazy_net=False)),  # asked for at start (abstract sockets)
    Policy(namespaces=Namespaces(net=False)),  # none at all, as asked
])
def test_other_sandboxes_keep_their_namespace_at_clone(policy):
    policy = attrs.evolve(policy, fs=attrs.evolve(policy.fs, read_only=("/usr", "/bin", "/etc", "/lib", "/lib64")))
    p = plan(policy, h=_root())
    assert not p.blank_netns
    assert bool(p.clone_flags & _linux.CLONE_NEWNET) == policy.namespaces.net


@pytest.mark.parametrize("feat", [{"seccomp_notify": False}, {"seccomp_addfd": False}])
def test_without_a_supervisor_that_can_hand_fds_the_namespace_is_made_at_clone(feat):
    p = plan(h=_root(**feat))
    assert not p.blank_netns and p.clone_flags & _linux.CLONE_NEWNET


def test_lazy_net_is_a_policy_field_in_toml():
    pol = Policy.from_toml("[namespaces]\nlazy_net = false\n")
    assert pol.namespaces.lazy_net is False
    assert Policy.from_toml(pol.to_toml()).namespaces.lazy_net is False
    with pytest.raises(PolicyError, match="lazy_net"):
        Policy.from_toml("[namespaces]\nlazy_net = 'yes'\n")


def _plan_stage(p):
    from zviz import _plan

    return _plan.stage_spec(p, bpf=b"\0" * 8, seccomp_flags=0)


# ---- the filter: no socket in-kernel, the supervisor makes exactly what the kernel would have allowed


@pytest.mark.parametrize(("call", "own", "blank"), [
    (("socket", AF_UNIX, 1, 0), "allow", "notify"),
    (("socket", AF_UNIX, 2 | 0o2000000, 0), "allow", "notify"),
    (("socket", AF_NETLINK, 3, 0), "allow", "notify"),
    (("socket", AF_INET, 1, 0), "notify", "notify"),
    (("socketpair", AF_UNIX, 1, 0, 0x1000), "allow", "notify"),
    (("socketpair", G | AF_UNIX, 1, 0, 0x1000), "notify", "notify"),
])
def test_the_blank_filter_notifies_every_socket(call, own, blank):
    name, *args = call
    assert _verdict(_spec(False, netns=True), name, *args) == own
    assert _verdict(_spec(True), name, *args) == blank


def test_the_supervisor_makes_exactly_what_the_filter_allows_with_a_namespace_of_its_own():
    """Whatever the in-kernel rules (a namespace of its own) let through, the
    supervisor's check lets through, and nothing else: garbage high bits,
    other families, netlink protocols, type flags."""
    own = _spec(False, netns=True)
    families = (AF_UNIX, AF_INET, 10, AF_NETLINK, 17, G | AF_UNIX, G | AF_NETLINK, 0)
    kinds = (1, 2, 3, 5, 10, 1 | 0o4000, 3 | 0o2000000, 2 | 0o4000 | 0o2000000, 3 | 0x100, G | 3, -1 & (2**64 - 1))
    protos = (0, 1, 4, 9, G)
    sockets = _sockets.Sockets(frozenset({"socket", "socketpair"}))
    for name, fam, kind, proto in itertools.product(("socket", "socketpair"), families, kinds, protos):
        kernel = _verdict(own, name, fam, kind, proto, 0x1000) == "allow"
        assert sockets.wants(name, (fam, kind, proto, 0x1000, 0, 0)) == kernel, (name, fam, kind, proto)


def test_what_the_policy_does_not_allow_is_not_made():
    only_socket = _sockets.Sockets(frozenset({"socket"}))
    assert only_socket.wants("socket", (AF_UNIX, 1, 0, 0, 0, 0))
    assert not only_socket.wants("socketpair", (AF_UNIX, 1, 0, 0x1000, 0, 0))
    assert not _sockets.Sockets(frozenset()).wants("socket", (AF_UNIX, 1, 0, 0, 0, 0))


def test_a_blank_filter_needs_a_supervisor():
    with pytest.raises(ValueError, match="supervisor"):
        _bpf.compile_filter(attrs.evolve(_spec(True), notify=False))
    with pytest.raises(ValueError, match="none"):
        _bpf.compile_filter(attrs.evolve(_spec(True), net_mode="loopback"))


# ---- the socketpair's numbers go where the caller could write


MAPS = (b"00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/x\n"
        b"00651000-00652000 r--p 00051000 08:02 173521 /usr/bin/x\n"
        b"00652000-00655000 rw-p 00052000 08:02 173521 /usr/bin/x\n"
        b"00655000-00656000 rw-p 00000000 00:00 0 \n"
        b"7fff00000000-7fff00001000 rw-p 00000000 00:00 0                          [stack]\n")


@pytest.mark.parametrize(("addr", "ok"), [
    (0x652000, True), (0x654FF8, True),
    (0x654FFC, True),  # across two adjacent writable mappings
    (0x655FFC, False),  # runs past the last one
    (0x651FF8, False),  # read-only (/proc/PID/mem would write it anyway)
    (0x651FFC, False),  # half read-only
    (0x400000, False), (0, False), (0x7FFF00000FF8, True), (0x7FFF00000FFC, False), (2**64 - 4, False),
])
def test_writable(addr, ok):
    assert _sockets._writable(MAPS, addr, 8) is ok


def test_registers_are_read_as_the_kernels_int():
    assert _sockets._int(G | 1) == 1
    assert _sockets._int(0xFFFFFFFF) == -1
    assert _argrules.MADE_SOCKETS["socketpair"] == _argrules.UNIX_SOCKET
