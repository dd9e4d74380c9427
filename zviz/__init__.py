"""zviz: run untrusted code in a light Linux sandbox, from trio or asyncio.

    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        r = await sb.run(["python3", "-c", "print(1 + 1)"])

Everything public is re-exported here; every other module is private.
"""

from . import sync as sync  # the blocking facade: zviz.sync.open_sandbox
from ._context import CodeContext as CodeContext
from ._errors import (
    CodeContextError as CodeContextError,
    CommandNotFoundError as CommandNotFoundError,
    FeatureUnavailable as FeatureUnavailable,
    PolicyError as PolicyError,
    ResourceExhausted as ResourceExhausted,
    SandboxClosedError as SandboxClosedError,
    SandboxSetupError as SandboxSetupError,
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
from ._probe import KernelFeatures as KernelFeatures, probe as probe_host
from ._process import Process as Process
from ._records import RunResult as RunResult, SandboxStatistics as SandboxStatistics
from ._sandbox import Sandbox as Sandbox, open_sandbox as open_sandbox
from ._supervisor import DenialEvent as DenialEvent
from ._version import __version__ as __version__

__all__ = [
    "SYSCALL_GROUPS",
    "Bind",
    "CodeContext",
    "CodeContextError",
    "CommandNotFoundError",
    "DenialEvent",
    "DisplayData",
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
    "StreamOutput",
    "Syscalls",
    "UnsupportedKernelError",
    "ZvizError",
    "ZvizWarning",
    "open_sandbox",
    "probe_host",
]

# Public names carry the public module, like trio does.
for _obj in list(globals().values()):
    if getattr(_obj, "__module__", "").startswith("zviz._"):
        try:
            _obj.__module__ = "zviz"
        except (AttributeError, TypeError):
            pass
del _obj
