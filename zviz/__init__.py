"""zviz: run untrusted code in a light Linux sandbox, from trio or asyncio.

    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        r = await sb.run(["python3", "-c", "print(1 + 1)"])

Everything public is re-exported here; every other module is private.

The names are imported on first use (PEP 562), so that `import zviz` and the
command line (`zviz --help`, `zviz run`) load only the modules they need: the
whole package, with trio and attrs' class building, costs ~150 ms of start-up.
"""

from ._version import __version__ as __version__

TYPE_CHECKING = False  # (not typing's: importing typing is ~5 ms of `zviz --help`)
if TYPE_CHECKING:  # what a type checker and an IDE see: the same names, imported eagerly
    from . import sync as sync  # the blocking facade: zviz.sync.open_sandbox
    from ._context import CodeContext as CodeContext
    from ._egress import (
        DomainStatistics as DomainStatistics,
        EgressEvent as EgressEvent,
        EgressStatistics as EgressStatistics,
    )
    from ._errors import (
        CodeContextError as CodeContextError,
        CommandNotFoundError as CommandNotFoundError,
        FeatureUnavailable as FeatureUnavailable,
        PolicyError as PolicyError,
        ResourceExhausted as ResourceExhausted,
        SandboxClosedError as SandboxClosedError,
        SandboxSetupError as SandboxSetupError,
        TemplateError as TemplateError,
        UnsupportedKernelError as UnsupportedKernelError,
        ZvizError as ZvizError,
        ZvizWarning as ZvizWarning,
    )
    from ._events import EventsMissed as EventsMissed
    from ._execution import (
        DisplayData as DisplayData,
        Execution as Execution,
        ExecutionError as ExecutionError,
        StreamOutput as StreamOutput,
    )
    from ._files import FileInfo as FileInfo
    from ._policy import (
        SYSCALL_GROUPS as SYSCALL_GROUPS,
        Bind as Bind,
        Endpoint as Endpoint,
        Filesystem as Filesystem,
        Limits as Limits,
        Namespaces as Namespaces,
        Network as Network,
        Policy as Policy,
        Syscalls as Syscalls,
    )
    from ._pool import set_pool_size as set_pool_size
    from ._probe import KernelFeatures as KernelFeatures, probe as probe_host
    from ._process import Process as Process
    from ._records import RunResult as RunResult, SandboxStatistics as SandboxStatistics
    from ._sandbox import Sandbox as Sandbox, open_sandbox as open_sandbox
    from ._snapshot import SnapshotInfo as SnapshotInfo
    from ._supervisor import DenialEvent as DenialEvent
    from ._warm import run_snippet as run_snippet

# public name -> (private module, name there); keep in step with the block above
_LAZY: dict[str, tuple[str, str]] = {
    "CodeContext": ("._context", "CodeContext"),
    **{n: ("._errors", n) for n in (
        "CodeContextError", "CommandNotFoundError", "FeatureUnavailable", "PolicyError", "ResourceExhausted",
        "SandboxClosedError", "SandboxSetupError", "TemplateError", "UnsupportedKernelError", "ZvizError",
        "ZvizWarning")},
    "EventsMissed": ("._events", "EventsMissed"),
    **{n: ("._egress", n) for n in ("DomainStatistics", "EgressEvent", "EgressStatistics")},
    **{n: ("._execution", n) for n in ("DisplayData", "Execution", "ExecutionError", "StreamOutput")},
    "FileInfo": ("._files", "FileInfo"),
    **{n: ("._policy", n) for n in (
        "SYSCALL_GROUPS", "Bind", "Endpoint", "Filesystem", "Limits", "Namespaces", "Network", "Policy", "Syscalls")},
    "KernelFeatures": ("._probe", "KernelFeatures"),
    "probe_host": ("._probe", "probe"),
    "set_pool_size": ("._pool", "set_pool_size"),
    "Process": ("._process", "Process"),
    "RunResult": ("._records", "RunResult"),
    "SandboxStatistics": ("._records", "SandboxStatistics"),
    "Sandbox": ("._sandbox", "Sandbox"),
    "open_sandbox": ("._sandbox", "open_sandbox"),
    "SnapshotInfo": ("._snapshot", "SnapshotInfo"),
    "DenialEvent": ("._supervisor", "DenialEvent"),
    "run_snippet": ("._warm", "run_snippet"),
}

__all__ = [
    "SYSCALL_GROUPS",
    "Bind",
    "CodeContext",
    "CodeContextError",
    "CommandNotFoundError",
    "DenialEvent",
    "DisplayData",
    "DomainStatistics",
    "EgressEvent",
    "EgressStatistics",
    "Endpoint",
    "EventsMissed",
    "Execution",
    "ExecutionError",
    "FeatureUnavailable",
    "FileInfo",
    "Filesystem",
    "KernelFeatures",
    "Limits",
    "Namespaces",
    "Network",
    "Policy",
    "PolicyError",
    "Process",
    "ResourceExhausted",
    "RunResult",
    "Sandbox",
    "SandboxClosedError",
    "SandboxSetupError",
    "SandboxStatistics",
    "SnapshotInfo",
    "StreamOutput",
    "Syscalls",
    "TemplateError",
    "UnsupportedKernelError",
    "ZvizError",
    "ZvizWarning",
    "open_sandbox",
    "probe_host",
    "run_snippet",
    "set_pool_size",
]
assert set(__all__) == set(_LAZY)  # one list of public names, checked at import


if not TYPE_CHECKING:  # (a type checker sees the imports above, and no fallback for unknown names)
    import importlib as _importlib

    def __getattr__(name: str) -> object:
        if name == "sync":  # a public module, also imported on first use
            return _importlib.import_module(".sync", __name__)
        try:
            module, attr = _LAZY[name]
        except KeyError:
            raise AttributeError(f"module 'zviz' has no attribute {name!r}") from None
        obj = getattr(_importlib.import_module(module, __name__), attr)
        # Public names carry the public module, like trio's do.
        if getattr(obj, "__module__", "").startswith("zviz._"):
            try:
                obj.__module__ = "zviz"
            except (AttributeError, TypeError):
                pass
        globals()[name] = obj  # the next access is a plain attribute
        return obj

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY, "sync"})
del TYPE_CHECKING
