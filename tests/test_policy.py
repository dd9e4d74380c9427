"""Policy values: validation, presets, TOML. Pure: no kernel."""

import os

import attrs
import pytest
from hypothesis import given, settings, strategies as st

import zviz
from zviz import Endpoint, Filesystem, Limits, Namespaces, Network, Policy, PolicyError, Syscalls


def test_presets_are_frozen_and_complete():
    p = Policy.python()
    assert p.name == "python"
    assert "/usr" in p.fs.read_only
    assert p.net.mode == "none"
    assert dict(p.env)["PATH"].startswith("/usr/local/bin")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.name = "x"  # type: ignore[misc]
    assert "openat" in p.syscalls.names()
    assert "ptrace" not in p.syscalls.names()
    assert Policy.shell().name == "shell"


def test_preset_by_name():
    assert Policy.preset("python") == Policy.python()
    with pytest.raises(PolicyError, match="preset"):
        Policy.preset("nope")


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Syscalls(allow=("openat", "not_a_syscall")), "syscalls.allow"),
        (lambda: Syscalls(allow=("@nogroup",)), "syscalls.allow"),
        (lambda: Syscalls(allow="openat"), "syscalls.allow"),
        (lambda: Syscalls(allow=("ptrace",)), "syscalls.allow"),
        (lambda: Filesystem(read_only=("relative/path",)), "fs.read_only"),
        (lambda: Filesystem(read_write=("/a\0b",)), "fs.read_write"),
        (lambda: Filesystem(read_write=("/",)), "fs.read_write"),
        (lambda: Filesystem(tmp_size="big"), "fs.tmp_size"),
        (lambda: Network(mode="internet"), "net.mode"),
        (lambda: Network(mode="allow"), "net.allow"),
        (lambda: Network(mode="none", allow=["1.2.3.4:80"]), "net.mode"),
        (lambda: Network(mode="allow", allow=["1.2.3.4"]), "net.allow"),
        (lambda: Network(mode="allow", allow=["1.2.3.4:0"]), "net.allow"),
        (lambda: Network(mode="allow", allow=["1.2.3.4:70000"]), "net.allow"),
        (lambda: Limits(wall_s=-1), "limits.wall_s"),
        (lambda: Limits(wall_s=float("nan")), "limits.wall_s"),
        (lambda: Limits(memory="lots"), "limits.memory"),
        (lambda: Limits(memory="1k"), "limits.memory"),
        (lambda: Limits(processes=0), "limits.processes"),
        (lambda: Limits(open_files=True), "limits.open_files"),
        (lambda: Namespaces(pid="yes"), "namespaces.pid"),
        (lambda: Policy(env={"A=B": "x"}), "env"),
        (lambda: Policy(env={"A": 1}), "env.A"),
        (lambda: Policy(fs="everything"), "fs"),
    ],
)
def test_bad_values_name_the_field(make, field):
    with pytest.raises(PolicyError) as ei:
        make()
    assert ei.value.field == field
    assert field in str(ei.value)
    assert isinstance(ei.value, ValueError)  # blame: the caller's value


def test_dangerous_needs_explicit_opt_in():
    s = Syscalls(allow=("@python", "ptrace"), allow_dangerous=True)
    assert "ptrace" in s.names()


def test_sizes_and_false_means_no_limit():
    assert Limits(memory="512M").memory == 512 * 1024**2
    assert Limits(memory="1GiB").memory == 1024**3
    assert Limits(memory=None).memory is None
    assert Limits(memory=False).memory is None


def test_every_net_mode_has_its_own_namespace():
    assert Policy.python().namespaces.net is True  # none: the default follows the mode
    assert Policy.python(namespaces=Namespaces(net=False)).namespaces.net is False  # none: an explicit opt-out
    for mode, allow in (("loopback", ()), ("allow", ["127.0.0.1:80"])):
        p = Policy.python(net=Network(mode=mode, allow=allow), namespaces=Namespaces(net=False))
        assert p.namespaces.net is True, mode


def test_endpoint_parse_and_str():
    assert Endpoint.parse("127.0.0.1:8080") == Endpoint(host="127.0.0.1", port=8080)
    assert Endpoint.parse("[::1]:443") == Endpoint(host="::1", port=443)
    assert str(Endpoint(host="::1", port=443)) == "[::1]:443"


def test_paths_are_normalised_and_deduplicated():
    fs = Filesystem(read_only=["/usr/", "/usr", "//etc/../etc"])
    assert fs.read_only == ("/usr", "/etc")


def test_toml_roundtrip_every_part():
    p = Policy(
        name="t",
        syscalls=Syscalls(allow=("@basic", "socket")),
        fs=Filesystem(read_only=("/usr",), read_write=("/srv",), tmp_size=None),
        net=Network(mode="allow", allow=["10.0.0.1:443", "[::1]:80"]),
        limits=Limits(wall_s=5, cpu_s=None, memory="256M", output="1K"),
        env={"A": "1"},
        namespaces=Namespaces(ipc=False),
    )
    text = p.to_toml()
    assert Policy.from_toml(text) == p


def test_toml_errors():
    with pytest.raises(PolicyError, match="valid TOML"):
        Policy.from_toml("[limits\nwall_s = 1")
    with pytest.raises(PolicyError, match=r"limits\.wal_s"):
        Policy.from_toml("[limits]\nwal_s = 1\n")
    with pytest.raises(PolicyError, match="sections"):
        Policy.from_toml("[network]\nmode='none'\n")
    with pytest.raises(PolicyError, match=r"limits\.memory"):
        Policy.from_toml("[limits]\nmemory = 'huge'\n")
    p = Policy.from_toml("preset = 'python'\n[limits]\nwall_s = 3\n")
    assert p.limits.wall_s == 3 and "/usr" in p.fs.read_only


# Anything, as a TOML document or as a table: only PolicyError, never another exception.
toml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20))
toml_values = st.recursive(toml_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                           st.dictionaries(st.text(max_size=10), c, max_size=4)), max_leaves=12)
sections = st.sampled_from(["syscalls", "fs", "net", "limits", "env", "namespaces", "name", "preset", "x"])
fields = st.sampled_from(["allow", "allow_dangerous", "read_only", "read_write", "hide", "mode", "wall_s",
                          "cpu_s", "memory", "processes", "file_size", "open_files", "output", "user",
                          "pid", "net", "PATH", "zz"])


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(sections, st.one_of(toml_values, st.dictionaries(fields, toml_values, max_size=5)),
                       max_size=5))
def test_fuzz_policy_from_dict_only_policy_error(data):
    try:
        Policy.from_dict(data)
    except PolicyError:
        pass


@settings(max_examples=800, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_policy_from_toml_text_only_policy_error(text):
    try:
        Policy.from_toml(text)
    except PolicyError:
        pass


def test_public_names_reexported():
    assert zviz.Policy.__module__ == "zviz"
    assert zviz.PolicyError.__module__ == "zviz"


def test_syscall_groups_are_immutable():
    with pytest.raises(TypeError):
        zviz.SYSCALL_GROUPS["@python"] = ("ptrace",)  # type: ignore[index]
    assert all(isinstance(v, tuple) for v in zviz.SYSCALL_GROUPS.values())
    assert "openat" in zviz.SYSCALL_GROUPS["@basic"]


def test_policy_validity_does_not_depend_on_who_builds_it(monkeypatch):
    # A policy is a value: the same one is valid for root and for anyone else.
    # Whether this caller can run it is decided when a sandbox is opened.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    p = Policy(net=Network(mode="loopback"), namespaces=Namespaces(user=False))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Policy(net=Network(mode="loopback"), namespaces=Namespaces(user=False)) == p


def test_a_preset_without_overrides_is_made_once_and_stays_as_made():
    """`open_sandbox(Policy.python())` builds the preset at every call: without
    overrides the same (immutable) object comes back, and deriving from it
    changes nothing for the next caller."""
    a, b = Policy.python(), Policy.python()
    assert a is b and Policy.shell() is Policy.shell() and a is not Policy.shell()
    derived = a.with_paths(read_only=["/opt"])
    assert "/opt" in derived.fs.read_only and "/opt" not in Policy.python().fs.read_only
    other = Policy.python(name="mine")
    assert other is not a and other.name == "mine" and Policy.python().name == "python"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.name = "changed"  # type: ignore[misc]
    assert Policy.python() == Policy(name="python", syscalls=a.syscalls, fs=a.fs, env=a.env)
