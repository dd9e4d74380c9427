"""zviz.ebpf: an optional eBPF monitor (bcc; root only).

    async with zviz.open_sandbox(policy, monitor=True) as sb: ...
    sb.statistics().syscalls          # {"openat": 412, "read": 977, ...}

    async with zviz.ebpf.open_monitor() as mon:      # one loaded program, many sandboxes
        async with zviz.open_sandbox(policy, monitor=mon) as sb: ...

Importing this module never imports bcc. Using the monitor where it cannot
run raises `zviz.FeatureUnavailable` naming what is missing and the fix; see
`status()` and `zviz check`. How attribution works, what is counted and what
it costs: docs/monitoring.md. `trace` and `TraceResult` (`zviz trace`, which
uses this monitor when it can, else the seccomp learning mode) live in the
core (zviz/_trace.py) and are re-exported here, where they were first public.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .._errors import FeatureUnavailable
from .._probe import DEBIAN_DIST, bcc_status as status, check_bcc
from .._trace import TraceResult, trace  # zviz trace lives in the core; re-exported here
from ._monitor import Monitor, _attach_monitor  # imports no bcc at module level

__all__ = ["Monitor", "TraceResult", "open_monitor", "status", "trace"]


def _import_bcc() -> Any:  # the bcc module (untyped: every attribute is dynamic)
    check_bcc()
    try:
        import bcc
    except ImportError:
        # Debian's python3-bpfcc is pure Python over libbcc: importable from any
        # CPython 3. Appended last, so the environment's own packages win.
        import sys

        if DEBIAN_DIST not in sys.path:
            sys.path.append(DEBIAN_DIST)
        try:
            import bcc
        except ImportError as e:
            raise FeatureUnavailable("eBPF monitor", f"bcc does not import ({e})",
                                     "apt-get install python3-bpfcc (or ./scripts/setup-ebpf.sh)") from None
    return bcc


@contextlib.asynccontextmanager
async def open_monitor(*, _trace: bool = False) -> AsyncIterator[Monitor]:
    """Load the eBPF program (compiled by bcc, ~1 s) and serve every sandbox
    opened with `monitor=` this monitor. Unloaded on exit."""
    mon = await Monitor._load(trace=_trace)
    try:
        async with mon._running():
            yield mon
    finally:
        mon._close()


__all__ += ["_attach_monitor"]
