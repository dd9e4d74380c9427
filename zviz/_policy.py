"""Policy: what sandboxed code may do. Frozen attrs values, presets, TOML.

A `Policy` is made of small frozen parts. Converters normalise (lists to tuples,
"512M" to bytes); validators check, and every bad value raises `PolicyError`
naming the field, the value and what is accepted. Nothing here touches the
kernel; the presets look at which system paths exist, nothing more.

Why this module is long: every part of a policy (six of them, each with its
checks, the network's four modes among them), the presets and the TOML form
are one vocabulary read together; the converters already live in `_fields`.
"""

from __future__ import annotations

import ipaddress
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from . import _syscalls
from ._errors import PolicyError, _PolicyTypeError
from ._fields import (
    _conv_fs_disk,
    _conv_fs_tmp_size,
    _conv_limits_cpu_s,
    _conv_limits_file_size,
    _conv_limits_memory,
    _conv_limits_open_files,
    _conv_limits_output,
    _conv_limits_processes,
    _conv_limits_wall_s,
    _conv_net_allow_domains,
    _conv_net_deny_domains,
    _conv_net_hosts,
    _conv_net_max_bytes,
    _conv_net_max_connections,
    _conv_net_ports,
    _paths,
    _tuple_of_str,
    parse_size as parse_size,  # re-exported: the CLI parses --memory/--disk with it
)

# --------------------------------------------------------------------------- parts


@attrs.frozen(kw_only=True)
class Syscalls:
    """Allowed syscalls (allowlist; everything else is denied).

    `allow` holds names ("openat") and groups ("@python", see `SYSCALL_GROUPS`).
    Dangerous syscalls (ptrace, mount, bpf...) are refused in `allow` unless
    `allow_dangerous` is set: listing one is almost always a mistake.
    """

    allow: tuple[str, ...] = ("@python",)
    allow_dangerous: bool = False

    def __attrs_post_init__(self) -> None:
        allow = _tuple_of_str("syscalls.allow", self.allow)
        object.__setattr__(self, "allow", tuple(dict.fromkeys(allow)))
        for entry in self.allow:
            try:
                _syscalls.expand((entry,))
            except KeyError:
                groups = ", ".join(sorted(_syscalls.GROUPS))
                raise PolicyError(
                    "syscalls.allow", entry, f"an x86_64 syscall name or a group ({groups})"
                ) from None
        if not isinstance(self.allow_dangerous, bool):
            raise PolicyError("syscalls.allow_dangerous", self.allow_dangerous, "true or false")
        dangerous = sorted(self.names() & _syscalls.DANGEROUS)
        if dangerous and not self.allow_dangerous:
            raise PolicyError(
                "syscalls.allow",
                dangerous,
                "no escape-relevant syscalls; set syscalls.allow_dangerous = true if you mean it",
            )

    def names(self) -> frozenset[str]:
        return _syscalls.expand(self.allow)


# Inside paths zviz itself owns: a bind may not land on, in or above them.
RESERVED_INSIDE = ("/workspace", "/home/sandbox", "/tmp", "/proc", "/dev")


@attrs.frozen(kw_only=True)
class Bind:
    """A host path shown at another path inside the sandbox:
    `Bind(source="/srv/datasets/x", target="/data")` (read-only unless
    `read_only=False`). The CLI's `--bind HOST:INSIDE[:ro|:rw]`."""

    source: str
    target: str
    read_only: bool = True

    def __attrs_post_init__(self) -> None:
        for field, value in (("source", self.source), ("target", self.target)):
            if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
                raise PolicyError(f"fs.binds.{field}", value, "an absolute path")
            object.__setattr__(self, field, _paths(f"fs.binds.{field}", [value])[0])
        if not isinstance(self.read_only, bool):
            raise PolicyError("fs.binds.read_only", self.read_only, "true or false")
        if self.target == "/" or any(self.target == r or self.target.startswith(r + "/") or r.startswith(
                self.target + "/") for r in RESERVED_INSIDE):
            raise PolicyError("fs.binds.target", self.target,
                              "a path that is not /, nor on, in or above " + ", ".join(RESERVED_INSIDE))

    @classmethod
    def parse(cls, text: str) -> Bind:
        """`HOST:INSIDE`, `HOST:INSIDE:ro` or `HOST:INSIDE:rw` (read-only by default)."""
        parts = text.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(source=parts[0], target=parts[1], read_only=parts[2] == "ro")
        if len(parts) == 2:
            return cls(source=parts[0], target=parts[1])
        raise PolicyError("fs.binds", text, "HOST:INSIDE, HOST:INSIDE:ro or HOST:INSIDE:rw")


def _binds(value: object) -> tuple[Bind, ...]:
    if isinstance(value, (str, bytes, Bind)) or not isinstance(value, Iterable):
        raise _PolicyTypeError("fs.binds", value, "a list of zviz.Bind (or of {source, target, read_only} tables)")
    out = []
    for item in value:
        b = item
        if isinstance(item, Mapping):
            unknown = set(item) - {"source", "target", "read_only"}
            if unknown:
                raise PolicyError("fs.binds", dict(item), "keys source, target and read_only only")
            b = Bind(**item)
        elif isinstance(item, str):
            b = Bind.parse(item)
        if not isinstance(b, Bind):
            raise PolicyError("fs.binds", b, "a zviz.Bind")
        out.append(b)
    targets = [b.target for b in out]
    for t in targets:
        if targets.count(t) > 1 or any(o != t and (o.startswith(t + "/")) for o in targets):
            raise PolicyError("fs.binds", t, "targets that are distinct and not nested in each other")
    return tuple(out)


@attrs.frozen(kw_only=True)
class Filesystem:
    """Paths the code may reach. The sandbox's workdir is always read-write.

    The sandbox's filesystem is a new, empty root holding only these paths
    (bind mounts at the same places), the workdir, /proc, a few devices and a
    private /tmp: nothing else of the host exists in there, its unix sockets
    included. Landlock enforces the same rights again, in the kernel.

    `read_only`: read and execute beneath these paths. `read_write`: also create,
    change and remove. `binds`: host paths shown at other paths inside
    (`Bind(source, target, read_only=True)`). `tmp_size`: size of the private /tmp (a tmpfs; None:
    no /tmp at all). `disk`: the most the workdir may hold (bytes, and one
    inode per 4 KiB of it): the workdir becomes a tmpfs of that size, mounted
    on the host for the sandbox's life (root callers; None: no limit but
    `limits.file_size` per file).
    """

    read_only: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    tmp_size: int | None = attrs.field(default=64 * 1024**2, converter=_conv_fs_tmp_size)
    disk: int | None = attrs.field(default=None, converter=_conv_fs_disk)
    binds: tuple[Bind, ...] = attrs.field(default=(), converter=_binds)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "read_only", _paths("fs.read_only", self.read_only))
        object.__setattr__(self, "read_write", _paths("fs.read_write", self.read_write))
        listed = set(self.read_only) | set(self.read_write)
        for b in self.binds:
            if any(p == b.target or p.startswith(b.target + "/") or b.target.startswith(p + "/") for p in listed):
                raise PolicyError("fs.binds.target", b.target, "a path that is not, holds or lies below a path of "
                                  "fs.read_only / fs.read_write")
        if "/" in self.read_write:
            raise PolicyError("fs.read_write", "/", "directories below '/', not the whole filesystem")
        if len(self.read_only) + len(self.read_write) + len(self.binds) > 48:
            raise PolicyError("fs", len(self.read_only) + len(self.read_write) + len(self.binds), "at most 48 paths")


@attrs.frozen(kw_only=True)
class Endpoint:
    """One `host:port` the sandbox may connect to (TCP)."""

    host: str
    port: int

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise PolicyError("net.allow", self.host, "a host name or IP address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise PolicyError("net.allow", self.port, "a port from 1 to 65535")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if not isinstance(text, str):
            raise PolicyError("net.allow", text, "'HOST:PORT' strings")
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise PolicyError("net.allow", text, "'HOST:PORT', e.g. '127.0.0.1:8080' or '[::1]:443'")
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


NET_MODES = ("none", "loopback", "allow", "domains")
NET_WAYS = ("proxy", "direct")


def _endpoints(value: object) -> tuple[Endpoint, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PolicyError("net.allow", value, "a list of 'HOST:PORT' strings")
    return tuple(v if isinstance(v, Endpoint) else Endpoint.parse(v) for v in value)


@attrs.frozen(kw_only=True)
class Network:
    """`none` (default): no sockets but unix ones. `loopback`: a private network
    namespace whose loopback is up (the code can talk to itself, not to the
    host). `allow`: TCP connections to the listed `host:port`s only, each one
    performed by the supervisor on the sandbox's behalf. `domains`: names
    only, through zviz's egress proxy (`Network.domains(...)`, docs/network.md)."""

    mode: str = "none"
    allow: tuple[Endpoint, ...] = attrs.field(default=(), converter=_endpoints)
    # mode "domains" (docs/network.md): names through zviz's egress proxy
    allow_domains: tuple[str, ...] = attrs.field(default=(), converter=_conv_net_allow_domains)
    deny_domains: tuple[str, ...] = attrs.field(default=(), converter=_conv_net_deny_domains)
    ports: tuple[int, ...] = attrs.field(default=(80, 443), converter=_conv_net_ports)
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(default=(), converter=_conv_net_hosts)
    max_connections: int = attrs.field(default=64, converter=_conv_net_max_connections)
    max_bytes: int | None = attrs.field(default=None, converter=_conv_net_max_bytes)
    # mode "domains": "proxy" (the programs' proxy variables point at zviz's proxy, which relays) or
    # "direct" (the sandbox's DNS answers for allowed names, its connects get the host's own sockets:
    # no relay, no proxy variables; root, docs/network.md)
    way: str = "proxy"

    def __attrs_post_init__(self) -> None:
        if self.mode not in NET_MODES:
            raise PolicyError("net.mode", self.mode, "one of " + ", ".join(NET_MODES))
        if self.mode == "domains" and not self.allow_domains:
            raise PolicyError("net.allow_domains", (), "at least one name when net.mode = 'domains'")
        if self.mode != "domains" and (self.allow_domains or self.deny_domains or self.hosts):
            raise PolicyError("net.mode", self.mode, "'domains' with net.allow_domains, deny_domains or hosts")
        if self.mode == "allow" and not self.allow:
            raise PolicyError("net.allow", (), "at least one 'HOST:PORT' when net.mode = 'allow'")
        if self.mode != "allow" and self.allow:
            raise PolicyError("net.mode", self.mode, "'allow' when net.allow lists endpoints")
        if len(self.allow) > 64:
            raise PolicyError("net.allow", len(self.allow), "at most 64 endpoints")
        if self.way not in NET_WAYS:
            raise PolicyError("net.way", self.way, "one of " + ", ".join(NET_WAYS))
        if self.way != "proxy" and self.mode != "domains":
            raise PolicyError("net.way", self.way, "'proxy' (the default) unless net.mode = 'domains'")
        if self.way == "direct" and self.max_bytes is not None:
            raise PolicyError("net.way", self.way, "'proxy' with net.max_bytes: only the proxy, which relays "
                              "every byte, can count them against a budget")

    @classmethod
    def domains(cls, names: Iterable[str], *, ports: Iterable[int] = (80, 443), deny: Iterable[str] = (),
                 hosts: Mapping[str, str | Iterable[str]] | None = None, max_connections: int = 64,
                 max_bytes: int | None = None, way: str = "proxy") -> Network:
        """Egress by domain name (docs/network.md):
        `Network.domains(["pypi.org", "*.pythonhosted.org"])`. Wildcards match
        subdomains only; `deny` wins over the names; `hosts` pins names to
        addresses (pinned addresses may be private: the pin is your word).
        `way`: "proxy" (zviz's proxy, through the programs' proxy variables)
        or "direct" (the sandbox resolves allowed names and connects
        straight out on the host's sockets, each connection's first bytes
        checked: as fast as no sandbox; root)."""
        return cls(mode="domains", allow_domains=names, deny_domains=deny,
                   ports=ports, hosts=hosts or {}, max_connections=max_connections, max_bytes=max_bytes, way=way)


@attrs.frozen(kw_only=True)
class Limits:
    """Resource limits. None means no limit of that kind.

    wall_s: wall-clock seconds per command (the supervisor kills it, exit 124 in
    the CLI). cpu_s: CPU seconds (RLIMIT_CPU, SIGXCPU then SIGKILL). memory:
    bytes; each process's address space (RLIMIT_AS) and, where zviz can make a
    memory cgroup, everything the whole sandbox holds (processes, memfd and
    shared memory, tmpfs files, pipe and socket buffers, page cache; the
    kernel's OOM killer acts inside the sandbox). memfd_without_cgroup: where
    no memory cgroup can be made, memfd_create is refused unless this is
    true (such memory would be bounded by nothing). processes: tasks of the sandbox's user
    (RLIMIT_NPROC, counted in the sandbox's own user namespace). file_size:
    largest file written (RLIMIT_FSIZE). open_files: RLIMIT_NOFILE. output:
    bytes of stdout and of stderr kept per command (the rest is counted and
    dropped, and the result says `truncated`).
    """

    wall_s: float | None = attrs.field(default=30.0, converter=_conv_limits_wall_s)
    cpu_s: float | None = attrs.field(default=None, converter=_conv_limits_cpu_s)
    memory: int | None = attrs.field(default=2 * 1024**3, converter=_conv_limits_memory)
    processes: int | None = attrs.field(default=128, converter=_conv_limits_processes)
    file_size: int | None = attrs.field(default=256 * 1024**2, converter=_conv_limits_file_size)
    open_files: int | None = attrs.field(default=1024, converter=_conv_limits_open_files)
    output: int | None = attrs.field(default=16 * 1024**2, converter=_conv_limits_output)
    memfd_without_cgroup: bool = False

    def __attrs_post_init__(self) -> None:
        if self.memory is not None and self.memory < 16 * 1024**2:
            raise PolicyError("limits.memory", self.memory, "at least 16M (a dynamic loader needs that much)")
        if self.open_files is not None and self.open_files < 16:
            raise PolicyError("limits.open_files", self.open_files, "at least 16")
        if not isinstance(self.memfd_without_cgroup, bool):
            raise PolicyError("limits.memfd_without_cgroup", self.memfd_without_cgroup, "true or false")


def _env(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PolicyError("env", value, "a mapping of NAME to value")
    else:
        items = list(value)
    out = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise PolicyError("env", item, "NAME = value pairs")
        k, v = item
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise PolicyError("env", k, "a variable name without '=' or NUL")
        if not isinstance(v, str) or "\0" in v:
            raise PolicyError(f"env.{k}", v, "a string without NUL")
        out[k] = v
    return tuple(sorted(out.items()))


DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@attrs.frozen(kw_only=True)
class Namespaces:
    """Which Linux namespaces each command gets. Every network mode gets its
    own network namespace (`net`, on by default): in `none` it keeps the
    sandbox out of the host's abstract unix socket names (Landlock's scope
    stops connecting to them, not binding them) and away from the host's
    interfaces (AF_UNIX socket ioctls such as SIOCGIFCONF); in `loopback` it
    is the private loopback; in `allow` the sandbox's own sockets live in an
    empty namespace and only the supervisor's connections reach the host's
    network. With the zygote it is made once per sandbox. `net = False` is
    accepted for `none` only (the host's abstract names are then in reach);
    `loopback` and `allow` always set it.

    `lazy_net` (`none` mode, where zviz runs as root): the namespace is made
    at the sandbox's first socket, by zviz, which makes its sockets in it;
    until then the sandbox is in zviz's blank one (empty, and nothing in it
    can change). A sandbox that makes no socket then costs ~1.5 ms of CPU less
    (docs/performance.md). Abstract unix sockets can then be bound but not
    connected to (Landlock scopes a socket by its maker, and that is zviz):
    `lazy_net = False` for a program that needs them."""

    user: bool = True
    pid: bool = True
    mount: bool = True
    ipc: bool = True
    uts: bool = True
    net: bool = True
    lazy_net: bool = True

    def __attrs_post_init__(self) -> None:
        for f in attrs.fields(Namespaces):
            v = getattr(self, f.name)
            if not isinstance(v, bool):
                raise PolicyError(f"namespaces.{f.name}", v, "true or false")


# --------------------------------------------------------------------------- Policy

_PYTHON_RO = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc")


def _existing(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(p for p in paths if os.path.exists(p))


# (class, preset, its existing system paths) -> the Policy made (Policy._preset_of)
_presets: dict[tuple[Any, ...], Policy] = {}


@attrs.frozen(kw_only=True)
class Policy:
    """What sandboxed code may do. Build one with a preset (`Policy.python()`,
    `Policy.shell()`), by hand, or from TOML (`Policy.from_toml`); derive
    variants with `attrs.evolve` or `Policy.with_paths`."""

    syscalls: Syscalls = attrs.field(factory=Syscalls)
    fs: Filesystem = attrs.field(factory=Filesystem)
    net: Network = attrs.field(factory=Network)
    limits: Limits = attrs.field(factory=Limits)
    env: tuple[tuple[str, str], ...] = attrs.field(default=(("PATH", DEFAULT_PATH),), converter=_env)
    namespaces: Namespaces = attrs.field(factory=Namespaces)
    name: str = "custom"

    def __attrs_post_init__(self) -> None:
        for fname, typ in (("syscalls", Syscalls), ("fs", Filesystem), ("net", Network),
                           ("limits", Limits), ("namespaces", Namespaces)):
            if not isinstance(getattr(self, fname), typ):
                raise PolicyError(fname, getattr(self, fname), f"a zviz.{typ.__name__}")
        if self.net.mode in ("loopback", "allow", "domains") and not self.namespaces.net:
            # loopback means a private loopback; allow means the sandbox's own
            # sockets see nothing (an autobound listener, sticky socket options
            # stay inside) and the supervisor connects from the host's network.
            object.__setattr__(self, "namespaces", attrs.evolve(self.namespaces, net=True))
        if not isinstance(self.name, str):
            raise PolicyError("name", self.name, "a string")

    # ---- presets

    @classmethod
    def python(cls, **overrides: Any) -> Policy:
        """Enough for CPython and its standard library, nothing more: the system
        read-only, the workdir read-write, no network, a clean environment."""
        return cls._preset_of("python", overrides, {"PYTHONDONTWRITEBYTECODE": "1"})

    @classmethod
    def shell(cls, **overrides: Any) -> Policy:
        """Ordinary programs: a shell and its subprocesses, coreutils, Python,
        compiled binaries; the system read-only, the workdir read-write."""
        return cls._preset_of("shell", overrides, {})

    @classmethod
    def _preset_of(cls, name: str, overrides: dict[str, Any], env: dict[str, str]) -> Policy:
        """A preset. Without overrides, the one made last time for the same
        existing system paths: a policy is immutable, and making one costs
        ~60 us (its checks), paid by every `open_sandbox(Policy.python())`."""
        read_only = _existing(_PYTHON_RO)
        key = (cls, name, read_only)
        if not overrides and key in _presets:
            return _presets[key]
        made = cls(**{"name": name, "syscalls": Syscalls(allow=(f"@{name}",)),
                      "fs": Filesystem(read_only=read_only),
                      "env": {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **env}, **overrides})
        if not overrides:
            _presets[key] = made
        return made

    @classmethod
    def preset(cls, name: str) -> Policy:
        presets = {"python": cls.python, "shell": cls.shell}
        if not isinstance(name, str) or name not in presets:
            raise PolicyError("preset", name, "one of " + ", ".join(presets))
        return presets[name]()

    # ---- variants

    def with_paths(self, read_only: Iterable[str] = (), read_write: Iterable[str] = ()) -> Policy:
        """This policy with more read-only and read-write paths (lists of absolute paths)."""
        for name, value in (("read_only", read_only), ("read_write", read_write)):
            if isinstance(value, (str, bytes, os.PathLike)):
                raise TypeError(f"with_paths({name}=...) takes a list of paths, not one {type(value).__name__}: "
                                f"with_paths({name}=[{value!r}])")
        fs = attrs.evolve(
            self.fs,
            read_only=self.fs.read_only + tuple(read_only),
            read_write=self.fs.read_write + tuple(read_write),
        )
        return attrs.evolve(self, fs=fs)

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    # ---- TOML

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """Parse a policy from TOML text (see docs/policy.md for the format)."""
        if not isinstance(text, str):
            raise PolicyError("toml", type(text).__name__, "TOML text (str)")
        import tomllib  # (here: `zviz run` without --policy never parses TOML)

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError("toml", str(e), "valid TOML") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        if not isinstance(data, Mapping):
            raise PolicyError("policy", data, "a table")
        known = {"name", "preset", "syscalls", "fs", "net", "limits", "env", "namespaces"}
        for key in data:
            if key not in known:
                raise PolicyError(key, data[key], "one of the sections " + ", ".join(sorted(known)))
        base = cls.preset(data["preset"]) if "preset" in data else cls()
        kw: dict[str, Any] = {}

        def section(name: str, typ: type, current: Any) -> Any:
            sec = data.get(name)
            if sec is None:
                return current
            if not isinstance(sec, Mapping):
                raise PolicyError(name, sec, "a table")
            names = {f.name for f in attrs.fields(typ)}
            for k in sec:
                if k not in names:
                    raise PolicyError(f"{name}.{k}", sec[k], "one of " + ", ".join(sorted(names)))
            try:
                return attrs.evolve(current, **sec)
            except PolicyError:
                raise
            except (TypeError, ValueError) as e:
                raise PolicyError(name, dict(sec), f"valid values ({e})") from None

        kw["syscalls"] = section("syscalls", Syscalls, base.syscalls)
        kw["fs"] = section("fs", Filesystem, base.fs)
        kw["net"] = section("net", Network, base.net)
        kw["limits"] = section("limits", Limits, base.limits)
        kw["namespaces"] = section("namespaces", Namespaces, base.namespaces)
        if "env" in data:
            kw["env"] = data["env"]
        else:
            kw["env"] = base.env
        kw["name"] = data.get("name", base.name)
        try:
            return cls(**kw)
        except PolicyError:
            raise
        except (TypeError, ValueError) as e:  # a converter met a value of the wrong shape
            raise PolicyError("policy", dict(data), f"valid values ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        lim = {k: v for k, v in attrs.asdict(self.limits).items() if v is not None}
        return {
            "name": self.name,
            "syscalls": {"allow": list(self.syscalls.allow), "allow_dangerous": self.syscalls.allow_dangerous},
            "fs": {"read_only": list(self.fs.read_only), "read_write": list(self.fs.read_write),
                   "tmp_size": self.fs.tmp_size if self.fs.tmp_size is not None else False}
            | ({"disk": self.fs.disk} if self.fs.disk is not None else {})
            | ({"binds": [attrs.asdict(b) for b in self.fs.binds]} if self.fs.binds else {}),
            "net": {"mode": self.net.mode, "allow": [str(e) for e in self.net.allow]}
            | ({"allow_domains": list(self.net.allow_domains), "deny_domains": list(self.net.deny_domains),
                "ports": list(self.net.ports),
                "hosts": {k: list(v) for k, v in self.net.hosts}, "max_connections": self.net.max_connections}
               | ({"max_bytes": self.net.max_bytes} if self.net.max_bytes is not None else {})
               | ({"way": self.net.way} if self.net.way != "proxy" else {})
               if self.net.mode == "domains" else {}),
            "limits": lim | {k: False for k, v in attrs.asdict(self.limits).items() if v is None},
            "env": dict(self.env),
            "namespaces": attrs.asdict(self.namespaces),
        }

    def to_toml(self) -> str:
        import tomli_w

        d = self.to_dict()
        # TOML has no null: a disabled limit is written as `false` and read back as None.
        return tomli_w.dumps(d)


SYSCALL_GROUPS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {k: tuple(sorted(v)) for k, v in _syscalls.GROUPS.items()})
