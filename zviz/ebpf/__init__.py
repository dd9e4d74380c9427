"""zviz.ebpf: an optional eBPF monitor (bcc; root only) and `zviz trace`.

    async with zviz.open_sandbox(policy, monitor=True) as sb: ...
    sb.statistics().syscalls          # {"openat": 412, "read": 977, ...}

    async with zviz.ebpf.open_monitor() as mon:      # one loaded program, many sandboxes
        async with zviz.open_sandbox(policy, monitor=mon) as sb: ...

Importing this module never imports bcc. Using the monitor where it cannot
run raises `zviz.FeatureUnavailable` naming what is missing and the fix; see
`status()` and `zviz check`. How attribution works, what is counted and what
it costs: docs/monitoring.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from .._errors import FeatureUnavailable

__all__ = ["Monitor", "TraceResult", "open_monitor", "status", "trace"]

DEBIAN_DIST = "/usr/lib/python3/dist-packages"


def status() -> tuple[bool, str]:
    """(available, reason): whether the monitor could run here, and why not.
    Checks without importing bcc."""
    try:
        _check()
    except FeatureUnavailable as e:
        return False, f"{e.reason}; fix: {e.fix}"
    return True, "ok (bcc importable, tracefs mounted, kernel headers present)"


def _check() -> None:
    import importlib.util

    if os.geteuid() != 0:
        raise FeatureUnavailable("eBPF monitor", "it needs root (CAP_BPF, CAP_PERFMON)", "run as root")
    if importlib.util.find_spec("bcc") is None and not os.path.isdir(os.path.join(DEBIAN_DIST, "bcc")):
        raise FeatureUnavailable("eBPF monitor", "bcc is not installed",
                                 "apt-get install python3-bpfcc (or ./scripts/setup-ebpf.sh)")
    if not os.path.exists("/sys/kernel/tracing/events/raw_syscalls"):
        raise FeatureUnavailable("eBPF monitor", "tracefs is not mounted at /sys/kernel/tracing",
                                 "mount -t tracefs nodev /sys/kernel/tracing (or ./scripts/setup-ebpf.sh)")
    build = f"/lib/modules/{os.uname().release}/build/include"
    if not os.path.exists(build):
        raise FeatureUnavailable("eBPF monitor", f"no kernel headers at {build}",
                                 "apt-get install linux-headers-$(uname -r), or ./scripts/setup-ebpf.sh, which links "
                                 "Debian's linux-headers-amd64 when no package matches this kernel")


def _import_bcc():  # type: ignore[no-untyped-def]
    _check()
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


from ._monitor import Monitor, _attach_monitor  # noqa: E402  (no bcc import at module level)
from ._trace import TraceResult, trace  # noqa: E402


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
