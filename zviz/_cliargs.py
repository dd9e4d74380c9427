"""`zviz run`'s flags made into a Policy (and nothing else: _cli parses them,
runs the sandbox and prints). Kept apart from _cli.py, which must hold every
subcommand's arguments for `zviz --help` and stays lean; this module is
imported only by a `zviz run` (in the CLI server, once)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import attrs

from ._errors import PolicyError
from ._policy import Bind, Endpoint, Network, Policy, parse_size


def policy_from_args(a: argparse.Namespace, absolute: Callable[[str], str]) -> Policy:
    """The policy of `zviz run`'s flags: --policy FILE (TOML, or an OCI runtime
    spec in JSON) or --preset, then --ro/--rw/--bind, --net or the domain
    flags, --timeout/--memory/--disk, --env. `absolute` makes a path of the
    caller's absolute. Every bad value is a PolicyError naming the flag."""
    if a.policy:
        try:
            with open(absolute(a.policy), encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PolicyError("--policy", a.policy, f"a readable file ({e.strerror})") from None
        if a.policy.endswith(".json") or text.lstrip().startswith("{"):
            from ._oci import policy_from_oci

            policy = policy_from_oci(text, base=Policy.shell())
        else:
            policy = Policy.from_toml(text)
    elif a.preset:
        policy = Policy.preset(a.preset)
    else:
        policy = Policy.shell()
    if a.ro or a.rw:
        policy = policy.with_paths(read_only=[absolute(x) for x in a.ro],
                                   read_write=[absolute(x) for x in a.rw])
    if a.bind:
        # HOST may be relative (to here); a malformed one is a PolicyError (status 125)
        binds = tuple(Bind.parse(absolute(h) + ":" + rest if h else text)
                      for text in a.bind for h, _, rest in [text.partition(":")])
        policy = attrs.evolve(policy, fs=attrs.evolve(policy.fs, binds=policy.fs.binds + binds))
    if a.net:
        if len(a.net) == 1 and a.net[0] in ("none", "loopback"):
            net = Network(mode=a.net[0])
        else:
            if any(m in ("none", "loopback") for m in a.net):
                raise PolicyError("--net", a.net, "either one of none/loopback, or HOST:PORT entries")
            net = Network(mode="allow", allow=[Endpoint.parse(m) for m in a.net])
        policy = attrs.evolve(policy, net=net)
    if a.allow_domain or a.deny_domain or a.add_host or getattr(a, "egress_direct", False):
        policy = attrs.evolve(policy, net=_domains_from_args(a, policy.net))
    lim = policy.limits
    if a.timeout is not None:
        lim = attrs.evolve(lim, wall_s=a.timeout)
    if a.memory is not None:
        lim = attrs.evolve(lim, memory=parse_size("--memory", a.memory))
    if a.json is False:
        lim = attrs.evolve(lim, output=None)  # passthrough: nothing is captured
    policy = attrs.evolve(policy, limits=lim)
    if a.disk is not None:
        policy = attrs.evolve(policy, fs=attrs.evolve(policy.fs, disk=parse_size("--disk", a.disk)))
    if a.env:
        env = dict(policy.env)
        for item in a.env:
            k, sep, v = item.partition("=")
            if not sep:
                raise PolicyError("--env", item, "NAME=VALUE")
            env[k] = v
        policy = attrs.evolve(policy, env=env)
    return policy


def _domains_from_args(a: argparse.Namespace, current: Network) -> Network:
    """--allow-domain NAME[:PORT], --deny-domain NAME, --add-host NAME:IP: net.mode = "domains"."""
    if a.net:
        raise PolicyError("--net", a.net, "no --net with --allow-domain/--deny-domain/--add-host (domains mode)")
    if not a.allow_domain and current.mode != "domains":
        raise PolicyError("--allow-domain", [], "at least one --allow-domain NAME with --deny-domain, --add-host "
                          "or --egress-direct")
    names, ports = [], {80, 443}
    for item in a.allow_domain + a.deny_domain:
        _, sep, rest = item.partition("://")
        if sep:  # a URL: its host is what was meant
            host = rest.split("/", 1)[0]
            raise PolicyError("--allow-domain" if item in a.allow_domain else "--deny-domain", item,
                              f"a domain name (with :PORT for --allow-domain), not a URL: {host}")
    for item in a.allow_domain:
        name, sep, port = item.rpartition(":")
        if sep and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise PolicyError("--allow-domain", item, "NAME or NAME:PORT, PORT a number from 1 to 65535 "
                              "(e.g. pkgs.test:8080)")
        if sep:
            names.append(_domain_arg("--allow-domain", item, name))
            ports.add(int(port))
        else:
            names.append(_domain_arg("--allow-domain", item, item))
    hosts: dict[str, list[str]] = {}
    for item in a.add_host:
        name, ip = _add_host(item)
        hosts.setdefault(name, []).append(ip)
    for item in a.deny_domain:
        name, sep, port = item.rpartition(":")
        if sep and port.isdigit():
            raise PolicyError("--deny-domain", item, f"a name without a port: {name} (a deny rule covers every port)")
    deny = [_domain_arg("--deny-domain", item, item) for item in a.deny_domain]
    way = "direct" if getattr(a, "egress_direct", False) else current.way
    if current.mode != "domains":
        net = Network.domains(names, ports=sorted(ports), deny=deny, hosts=hosts, way=way)
    else:  # from --policy: the flags add to it
        net = Network.domains([*current.allow_domains, *names], ports=sorted(ports | set(current.ports)),
                              deny=[*current.deny_domains, *deny], hosts={**{k: list(v) for k, v in current.hosts},
                                                                          **hosts},
                              max_connections=current.max_connections, max_bytes=current.max_bytes, way=way)
    _check_pins_allowed(a.add_host, net)
    return net


def _domain_arg(flag: str, item: str, name: str) -> str:
    """`name` (of the flag's `item`) if it is a name or `*.` and one, else a PolicyError naming the flag."""
    from ._egressproto import allow_breadth_error, normalize_pattern

    try:
        pattern = normalize_pattern(name)
    except ValueError as e:
        raise PolicyError(flag, item, f"a domain name or '*.' and one, e.g. pypi.org or '*.pythonhosted.org' "
                          f"({e})") from None
    too_wide = allow_breadth_error(pattern) if flag == "--allow-domain" else None
    if too_wide is not None:
        raise PolicyError(flag, item, f"a narrower rule: {too_wide}")
    return name


def _add_host(item: str) -> tuple[str, str]:
    """--add-host NAME:IP (IPv6 as [addr] or bare): (NAME, IP), or a PolicyError naming the flag."""
    import ipaddress

    from ._egressproto import name_error

    name, sep, ip = item.partition(":")
    if ip.startswith("[") and ip.endswith("]"):
        ip = ip[1:-1]
    why = None if sep and name and ip else "a name, a colon, an address"
    if why is None and name.startswith("*."):
        why = "a pin is for one name, not a pattern: pin each name"
    why = why or name_error(name)
    if why is None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            why = f"{ip!r} is not an IP address"
    if why is not None:
        raise PolicyError("--add-host", item, f"NAME:IP, e.g. pkgs.test:127.0.0.1 or pkgs.test:[::1] ({why})")
    return name, ip


def _check_pins_allowed(items: list[str], net: Network) -> None:
    """An --add-host NAME that no --allow-domain allows is a mistake (a typo,
    most often): the pin would never be used."""
    from ._egressproto import matches, normalize_name

    for item in items:
        name = normalize_name(item.partition(":")[0])  # (valid: the Network above took it)
        if not any(matches(p, name) for p in net.allow_domains):
            raise PolicyError("--add-host", item, f"a name an --allow-domain allows ({name} is not: add "
                              f"--allow-domain {name}; a pin only says where an allowed name goes)")
