"""The public API's signatures, as docs/api.md shows them (one line each).

`python scripts/api_signatures.py` prints them; tests/test_api_docs.py checks
that every one of them is in docs/api.md, so the document cannot drift from
the code. Private parameters (a leading underscore) must not exist at all.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterator
from typing import Any

import attrs

import zviz
import zviz.sync
from zviz._files import Files
from zviz._proxy import FdReceiveStream, FdSendStream

# (title prefix, object): classes list their public methods, properties and fields
TOP: list[tuple[str, Any]] = [
    ("zviz.open_sandbox", zviz.open_sandbox), ("zviz.Sandbox", zviz.Sandbox), ("zviz.Process", zviz.Process),
    ("Sandbox.files", Files), ("zviz.FileInfo", zviz.FileInfo), ("zviz.RunResult", zviz.RunResult),
    ("zviz.SandboxStatistics", zviz.SandboxStatistics), ("zviz.DenialEvent", zviz.DenialEvent),
    ("zviz.EventsMissed", zviz.EventsMissed), ("zviz.EgressEvent", zviz.EgressEvent),
    ("zviz.EgressStatistics", zviz.EgressStatistics), ("zviz.DomainStatistics", zviz.DomainStatistics), ("zviz.CodeContext", zviz.CodeContext),
    ("zviz.Execution", zviz.Execution), ("zviz.ExecutionError", zviz.ExecutionError),
    ("zviz.StreamOutput", zviz.StreamOutput), ("zviz.DisplayData", zviz.DisplayData),
    ("zviz.Policy", zviz.Policy), ("zviz.Filesystem", zviz.Filesystem), ("zviz.Bind", zviz.Bind),
    ("zviz.Limits", zviz.Limits),
    ("zviz.Network", zviz.Network), ("zviz.Endpoint", zviz.Endpoint), ("zviz.Namespaces", zviz.Namespaces),
    ("zviz.Syscalls", zviz.Syscalls), ("zviz.KernelFeatures", zviz.KernelFeatures),
    ("zviz.probe_host", zviz.probe_host), ("zviz.set_pool_size", zviz.set_pool_size), ("zviz.run_snippet", zviz.run_snippet), ("Process.stdin", FdSendStream), ("Process.stdout", FdReceiveStream),
    ("zviz.sync.open_sandbox", zviz.sync.open_sandbox), ("zviz.sync.run_snippet", zviz.sync.run_snippet), ("zviz.sync.Sandbox", zviz.sync.Sandbox),
    ("zviz.sync.Process", zviz.sync.Process), ("zviz.sync.Sandbox.files", zviz.sync.Files),
    ("zviz.sync.Process.stdin", zviz.sync.SendStream), ("zviz.sync.Process.stdout", zviz.sync.ReceiveStream),
]
try:  # the `ray` extra: documented in docs/api.md's zviz.ray section when installed
    import zviz.ray
except ImportError:
    RAY = False
else:
    RAY = True
    TOP += [("zviz.ray.SandboxPool", zviz.ray.SandboxPool), ("zviz.ray.Snippet", zviz.ray.Snippet),
            ("zviz.ray.SnippetResult", zviz.ray.SnippetResult),
            ("zviz.ray.PythonBatchRunner", zviz.ray.PythonBatchRunner)]
SKIP = {"__init__", "__repr__", "__eq__", "__hash__", "__ne__", "__setattr__", "__delattr__", "__getstate__",
        "__setstate__", "__lt__", "__le__", "__gt__", "__ge__", "__attrs_init__", "__match_args__"}


# attributes set in __init__ (not visible on the class): name -> type
INSTANCE = {
    "zviz.Sandbox": ["policy: Policy", "workdir: str", "files: Files"],
    "zviz.Process": ["argv: tuple[str, ...]", "stdin: FdSendStream | None", "stdout: FdReceiveStream | None",
                     "stderr: FdReceiveStream | None", "timed_out: bool", "limit: str | None"],
    "zviz.CodeContext": ["preload: tuple[str, ...]", "broken: str | None", "closed: bool"],
    "zviz.sync.Sandbox": ["files: Files"],
    "zviz.ray.SandboxPool": ["policy: Policy", "preload: tuple[str, ...]", "python: str", "sandboxes_per_node: int",
                             "fresh_sandbox_every: int", "in_flight_per_actor: int", "replaced: int"],
    "zviz.sync.Process": ["stdin: SendStream | None", "stdout: ReceiveStream | None",
                          "stderr: ReceiveStream | None"],
}


def _ann(a: Any) -> str:
    return a if isinstance(a, str) else getattr(a, "__name__", repr(a))


def _default(name: str, v: Any) -> str:
    if name == "mode" and isinstance(v, int):
        return oct(v)
    return repr(v)


def sig(fn: Any) -> str:
    """`(a: T = d, *, b: U) -> R`, annotations as written, without self/cls."""
    s = inspect.signature(fn)
    parts: list[str] = []
    star = False
    for p in s.parameters.values():
        if p.name in ("self", "cls"):
            continue
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star = "*" + text, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        elif p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.annotation is not p.empty:
            text += f": {_ann(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.name, p.default)}"
        parts.append(text)
    ret = f" -> {_ann(s.return_annotation)}" if s.return_annotation is not s.empty else ""
    return f"({', '.join(parts)}){ret}"


def members(cls: type) -> Iterator[tuple[str, Any]]:
    fields = getattr(cls, "__attrs_attrs__", None)
    if fields is not None:
        for f in fields:
            if not f.name.startswith("_"):
                default = "" if f.default is attrs.NOTHING or isinstance(f.default, attrs.Factory) else \
                    f" = {_default(f.name, f.default)}"
                yield f.name, f"{f.name}: {_ann(f.type)}{default}"
    for name, obj in sorted(vars(cls).items()):
        if name.startswith("_") and name not in ("__aenter__", "__aexit__", "__enter__", "__exit__"):
            continue
        if name in SKIP or (fields is not None and any(f.name == name for f in fields)):
            continue
        if isinstance(obj, property):
            ret = inspect.signature(obj.fget).return_annotation if obj.fget else ""
            yield name, f"{name}: {_ann(ret)}"
        elif isinstance(obj, (classmethod, staticmethod)):
            yield name, f"{name}{sig(getattr(cls, name))}"
        elif inspect.isfunction(obj):
            yield name, f"{name}{sig(obj)}"


def lines() -> Iterator[str]:
    for title, obj in TOP:
        if inspect.isclass(obj) and not issubclass(obj, enum.Enum):
            yield title
            for text in INSTANCE.get(title, []):
                yield f"{title}.{text}"
            for _name, text in members(obj):
                yield f"{title}.{text}"
        else:
            yield f"{title}{sig(obj)}"


if __name__ == "__main__":
    for line in lines():
        print(line)
