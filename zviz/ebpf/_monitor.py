"""The monitor: loads zviz/ebpf/_program.c with bcc, attributes syscalls to
sandboxes, drains denial events into each sandbox's event stream."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from .._syscall_table import BY_NUMBER

if TYPE_CHECKING:
    from .._sandbox import Sandbox

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_program.c")
ABI_NAMES = {0: "", 1: "x32:", 2: "ia32:"}
DRAIN_INTERVAL = 0.05


def syscall_label(nr: int, abi: int) -> str:
    """A name that does not mislabel compat calls: an i386 number is not an
    x86_64 one, so ia32 calls keep their number."""
    if abi == 2:
        return f"ia32:{nr}" if nr < 1024 else "ia32:syscall_unknown"
    return ABI_NAMES.get(abi, "?:") + BY_NUMBER.get(nr, "syscall_unknown")  # one bucket: keys stay bounded


class Monitor:
    """One loaded eBPF program serving any number of sandboxes. Made by
    `zviz.ebpf.open_monitor()` (or by `open_sandbox(monitor=True)`)."""

    def __init__(self, bpf: Any, trace: bool = False) -> None:
        self._bpf = bpf
        self._trace = trace
        self._tracked = bpf[b"tracked"]
        self._stats = bpf[b"stats"]
        self._errnos = bpf[b"errnos"]
        self._sandboxes: dict[int, Sandbox] = {}
        self._next_sid = 1
        self._closed = False
        self.events_seen = 0
        self.load_s = 0.0  # how long bcc took to compile and load the program
        bpf[b"events"].open_ring_buffer(self._on_event)

    def __repr__(self) -> str:
        return f"<zviz.ebpf.Monitor sandboxes={len(self._sandboxes)} events={self.events_seen}>"

    @classmethod
    async def _load(cls, trace: bool = False) -> Monitor:
        """trace: also compile the sys_enter probe (paths and endpoints, for
        `zviz trace`); a monitor without it adds only sys_exit to every call."""
        from . import _import_bcc

        bcc = _import_bcc()
        t0 = time.monotonic()
        cflags = ["-DZVIZ_TRACE"] if trace else []
        try:
            bpf = await anyio.to_thread.run_sync(lambda: bcc.BPF(src_file=PROGRAM.encode(), cflags=cflags))
        except Exception as e:  # noqa: BLE001 - bcc raises plain Exception on compile/load failure
            from .._errors import FeatureUnavailable

            raise FeatureUnavailable("eBPF monitor", f"the program did not load ({e})",
                                     "check `zviz check`; kernel headers must match well enough "
                                     "(./scripts/setup-ebpf.sh)") from None
        mon = cls(bpf, trace)
        mon.load_s = time.monotonic() - t0
        return mon

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drain)
            try:
                yield
            finally:
                self.drain_now()
                tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        while True:
            await anyio.sleep(DRAIN_INTERVAL)
            self.drain_now()

    def drain_now(self) -> None:
        if not self._closed:
            self._bpf.ring_buffer_consume()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bpf.cleanup()

    # ---- per sandbox

    def register(self, sb: Sandbox) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self._sandboxes[sid] = sb
        return sid

    def unregister(self, sid: int) -> None:
        self.drain_now()
        self._sandboxes.pop(sid, None)
        for table in (self._stats, self._errnos):
            for k in [k for k in table.keys() if k.sid == sid]:  # noqa: SIM118 - a bcc map, not a dict
                with contextlib.suppress(KeyError):
                    del table[k]

    def set_trace(self, on: bool) -> None:
        """Also report paths and connect addresses (used by `zviz trace`, whose
        monitor is loaded with the sys_enter probe)."""
        if not self._trace:
            raise RuntimeError("this monitor was loaded without the trace probe")
        self._bpf[b"trace_on"][ctypes.c_int(0)] = ctypes.c_uint(1 if on else 0)

    @property
    def map_fd(self) -> int:
        return int(self._tracked.map_fd)

    def syscalls_for(self, sid: int) -> dict[str, int]:
        out: Counter[str] = Counter()
        for k, v in self._stats.items():
            if k.sid == sid:
                out[syscall_label(k.nr, k.abi)] += v.calls
        return dict(out)

    def errors_for(self, sid: int) -> dict[tuple[str, str], int]:
        out: Counter[tuple[str, str]] = Counter()
        for k, v in self._errnos.items():
            if k.sid == sid:
                out[(syscall_label(k.nr, k.abi), errno.errorcode.get(k.err, str(k.err)))] += v.value
        return dict(out)

    def _on_event(self, ctx: Any, data: Any, size: int) -> None:
        from .._supervisor import DenialEvent

        ev = self._bpf[b"events"].event(data)
        self.events_seen += 1
        sb = self._sandboxes.get(ev.sid)
        if sb is None:
            return
        if ev.kind in (2, 3):  # trace mode: a path or a sockaddr the program used
            rec = getattr(sb, "_trace_record", None)
            if rec is not None:
                # ev.data reads as bytes cut at the first NUL: take the raw field
                raw = ctypes.string_at(ctypes.addressof(ev) + type(ev).data.offset, 256)
                if ev.kind == 2:
                    rec.path(BY_NUMBER.get(ev.nr, str(ev.nr)), raw.split(b"\0", 1)[0].decode("utf-8", "replace"),
                             ev.flags)
                else:
                    rec.sockaddr(raw[:28])
            return
        if ev.kind == 0 and ev.ret == -errno.ENOSYS and BY_NUMBER.get(ev.nr) == "clone3" and ev.abi == 0:
            return  # glibc probes clone3 for every thread and falls back: not an attempt
        name = syscall_label(ev.nr, ev.abi)
        comm = ev.comm.decode(errors="replace")
        if ev.kind == 1:
            detail, err = f"killed by the seccomp filter (foreign ABI), comm={comm}", 0
        else:
            err = -ev.ret
            detail = f"returned -{errno.errorcode.get(err, err)}, comm={comm}"
        sb._add_event(DenialEvent(time=time.time(), pid=ev.pid, command=comm, syscall=name, nr=ev.nr, args=(),
                                  detail=detail, errno=err, source="ebpf"))


@contextlib.asynccontextmanager
async def _attach_monitor(sb: Sandbox, monitor: object) -> AsyncIterator[Monitor]:
    """Used by open_sandbox: `monitor=True` loads a monitor for this sandbox
    alone; a Monitor is shared."""
    if monitor is True:
        from . import open_monitor

        async with open_monitor(_trace=sb._trace is not None) as mon, _registered(sb, mon):
            yield mon
    elif isinstance(monitor, Monitor):
        async with _registered(sb, monitor):
            yield monitor
    else:
        raise TypeError(f"monitor must be True, False, or a monitor from zviz.ebpf.open_monitor(), not {monitor!r}")


@contextlib.asynccontextmanager
async def _registered(sb: Sandbox, mon: Monitor) -> AsyncIterator[None]:
    sid = mon.register(sb)
    sb._attach_monitor(mon, sid)
    try:
        yield
    finally:
        sb._detach_monitor()
        mon.unregister(sid)


