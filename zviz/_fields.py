"""The values inside a policy's fields: sizes ("512M"), seconds, counts,
absolute paths, lists of strings, and the attrs converter of each field that
takes one (named functions: mypy's attrs plugin types them, and the field's
name is in every PolicyError). Pure."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from ._errors import PolicyError, _PolicyTypeError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_SIZE_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(field: str, value: object) -> int | None:
    """'512M', '1GiB', 4096 -> bytes; None stays None (no limit)."""
    if value is None or value is False:  # TOML writes 'no limit' as false
        return None
    if isinstance(value, bool):
        raise PolicyError(field, value, "a size in bytes (int) or a string like '512M'")
    if isinstance(value, int):
        if value <= 0:
            raise PolicyError(field, value, "a positive size")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            n = int(float(m.group(1)) * _SIZE_MULT[m.group(2).lower()])
            if n > 0:
                return n
    raise PolicyError(field, value, "a size in bytes (int) or a string like '512M', '2G'")


def _seconds(field: str, value: object) -> float | None:
    if value is None or value is False:  # TOML writes 'no limit' as false
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PolicyError(field, value, "a positive number of seconds, or None")
    if value != value or value == float("inf"):  # NaN, inf
        raise PolicyError(field, value, "a finite positive number of seconds, or None")
    return float(value)


def _count(field: str, value: object) -> int | None:
    if value is None or value is False:  # TOML writes 'no limit' as false
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolicyError(field, value, "a positive whole number, or None")
    return value


# attrs converters, one per field (named: the field is in every message)
def _conv_fs_tmp_size(value: object) -> int | None:
    return parse_size("fs.tmp_size", value)


def _conv_fs_disk(value: object) -> int | None:
    return parse_size("fs.disk", value)


def _conv_limits_wall_s(value: object) -> float | None:
    return _seconds("limits.wall_s", value)


def _conv_limits_cpu_s(value: object) -> float | None:
    return _seconds("limits.cpu_s", value)


def _conv_limits_memory(value: object) -> int | None:
    return parse_size("limits.memory", value)


def _conv_limits_processes(value: object) -> int | None:
    return _count("limits.processes", value)


def _conv_limits_file_size(value: object) -> int | None:
    return parse_size("limits.file_size", value)


def _conv_limits_open_files(value: object) -> int | None:
    return _count("limits.open_files", value)


def _conv_limits_output(value: object) -> int | None:
    return parse_size("limits.output", value)


def _paths(field: str, value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Iterable):
        # one path string is not split into characters: a type error, said as such
        raise _PolicyTypeError(field, value, "a list of absolute paths (not one string: wrap it in a list)")
    out = []
    for p in value:
        if not isinstance(p, str) or not p.startswith("/") or "\0" in p:
            raise PolicyError(field, p, "an absolute path (a string starting with '/')")
        norm = os.path.normpath(p)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        out.append(norm)
    return tuple(dict.fromkeys(out))  # keep order, drop duplicates


def _tuple_of_str(field: str, value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PolicyError(field, value, "a list of strings")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str):
            raise PolicyError(field, v, "a string")
    return out


# net.mode = "domains" (docs/network.md)

def _egress_names(field: str, value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PolicyError(field, value, "a list of domain names ('example.com', '*.example.com')")
    out = []
    for v in value:
        from . import _egressproto  # (only for names: its parsers' classes cost ~6 ms to build)

        if isinstance(v, str) and "://" in v:
            raise PolicyError(field, v, f"a domain name, not a URL: {v.split('://', 1)[1].split('/', 1)[0]!r}")
        if (isinstance(v, str) and v.rpartition(":")[2].isdigit()
                and _egressproto.name_error(v.rpartition(":")[0].removeprefix("*.")) is None):
            where = ("a deny rule covers every port" if field == "net.deny_domains"
                     else "and the port in net.ports (ports=[...])")
            raise PolicyError(field, v, f"a domain name without a port: {v.rpartition(':')[0]!r}, {where}")
        try:
            pattern = _egressproto.normalize_pattern(v)
        except ValueError as e:
            raise PolicyError(field, v, f"a domain name or '*.' and one ({e})") from None
        too_wide = _egressproto.allow_breadth_error(pattern) if field == "net.allow_domains" else None
        if too_wide is not None:
            raise PolicyError(field, v, f"a narrower rule: {too_wide}")
        out.append(pattern)
    if len(out) > 256:
        raise PolicyError(field, len(out), "at most 256 names")
    return tuple(dict.fromkeys(out))


def _conv_net_allow_domains(value: object) -> tuple[str, ...]:
    return _egress_names("net.allow_domains", value)


def _conv_net_deny_domains(value: object) -> tuple[str, ...]:
    return _egress_names("net.deny_domains", value)


def _conv_net_ports(value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PolicyError("net.ports", value, "a list of TCP ports, e.g. [80, 443]")
    out = []
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise PolicyError("net.ports", p, "a port from 1 to 65535")
        out.append(p)
    if not out:
        raise PolicyError("net.ports", (), "at least one port")
    return tuple(sorted(set(out)))


def _conv_net_hosts(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    items = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise PolicyError("net.hosts", value, "a mapping of name to address ({'pkgs.test': '127.0.0.1'})")
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        from . import _egressproto  # (only for pins)

        if not (isinstance(item, tuple) and len(item) == 2):
            raise PolicyError("net.hosts", item, "NAME = ADDRESS pairs")
        k, v = item
        try:
            name = _egressproto.normalize_name(k)
        except ValueError as e:
            raise PolicyError("net.hosts", k, f"a host name ({e})") from None
        addrs = (v,) if isinstance(v, str) else v
        if isinstance(addrs, bytes) or not isinstance(addrs, Iterable):
            raise PolicyError(f"net.hosts.{name}", v, "an IP address or a list of them")
        canon = []
        for a in addrs:
            try:
                canon.append(str(_egressproto.canonical_ip(a)))
            except (ValueError, AttributeError, TypeError):
                raise PolicyError(f"net.hosts.{name}", a, "an IP address") from None
        if not canon:
            raise PolicyError(f"net.hosts.{name}", v, "at least one IP address")
        out[name] = tuple(dict.fromkeys([*out.get(name, ()), *canon]))  # (PKGS.test and pkgs.test: one name)
    return tuple(sorted(out.items()))


def _conv_net_max_connections(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:  # (no "no limit": None is refused)
        raise PolicyError("net.max_connections", value, "a positive whole number (connections open at once)")
    return value


def _conv_net_max_bytes(value: object) -> int | None:
    return parse_size("net.max_bytes", value)
