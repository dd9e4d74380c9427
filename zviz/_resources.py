"""A sandbox's host-side resources beyond its processes and fds: its memory
cgroup (zviz/_cgroup.py) and its size-capped workdir (zviz/_disk.py). Owned by
open_sandbox from before the sandbox is planned until after every process of
it is dead; their figures are kept for statistics() after release."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

from . import _cgroup, _disk, _kernel

if TYPE_CHECKING:
    from . import _snapshot


class HostResources:
    def __init__(self, workdir: str, disk_limit: int | None) -> None:
        self._workdir = workdir
        self._disk_limit = disk_limit
        self.cgroup: _cgroup.MemoryCgroup | None = None
        self.cgroup_reason = "limits.memory is not set"
        self._memory_final: tuple[int | None, int | None, int] = (None, None, 0)  # limit, peak, OOM kills
        self.disk_mounted = False
        self.template_mounted = False  # a template's overlay is on the workdir (zviz/_snapshot.py)
        self._template_helper: bytes | None = None  # its idmapping's helper process, reaped at release
        self._disk_final: int | None = None
        self._oom_seen = 0  # the memory cgroup's OOM kills already attributed to a command

    def create_cgroup(self, memory: int | None) -> None:
        if memory is not None:
            self.cgroup, self.cgroup_reason = _cgroup.MemoryCgroup.create(_cgroup.unique_name(), memory)

    def mount_disk(self, size: int, uid: int, gid: int) -> None:
        _disk.mount(self._workdir, size, uid, gid)
        self.disk_mounted = True

    def mount_template(self, template: _snapshot.Template, uid: int, gid: int) -> None:
        """Root: the template's copy-on-write overlay on the workdir (on the
        size-capped tmpfs, if any, which then holds the upper layer)."""
        from . import _snapshot

        self._template_helper = _snapshot.mount(template, self._workdir, uid, gid)
        self.template_mounted = True

    def resource_limit(self, status: int) -> str | None:
        """A sandbox-wide limit that ended a command: killed by the memory
        cgroup's OOM killer (a kill the cgroup counted since the last SIGKILLed
        command looked: nothing is read on the common path), or failed with
        the size-capped workdir full."""
        if self.cgroup is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            kills = self.cgroup.oom_kills()
            seen, self._oom_seen = self._oom_seen, kills
            if kills > seen:
                return "memory"
        if self.disk_mounted and status != 0 and _disk.full(self._workdir):
            return "disk"
        return None

    def memory_figures(self) -> tuple[int | None, int | None, int]:
        cg = self.cgroup
        if cg is None:
            return self._memory_final
        return cg.limit, cg.peak(), cg.oom_kills()

    def disk_figures(self) -> tuple[int | None, int | None]:
        """(fs.disk where enforced, bytes in the workdir's tmpfs now or at release)."""
        enforced = self.disk_mounted or self._disk_final is not None
        used = _disk.used(self._workdir)[0] if self.disk_mounted else self._disk_final
        return (self._disk_limit if enforced else None), used

    def unmount_now(self) -> None:
        """What must go even if teardown could not run (the loop is gone):
        the template's overlay and the size-capped tmpfs, so that removing
        the workdir removes files, not the template's view."""
        if self.template_mounted:
            self.template_mounted = False
            _disk.unmount(self._workdir)
            helper, self._template_helper = self._template_helper, None
            if helper is not None:
                _kernel.reap_template_helper(helper)
        if self.disk_mounted:
            self.disk_mounted = False
            _disk.unmount(self._workdir)

    async def release(self) -> None:
        """After every process of the sandbox is dead: its memory cgroup and its
        size-capped workdir's tmpfs (the files in it go with the mount)."""
        if self.cgroup is not None:
            self._memory_final = self.memory_figures()
            cg, self.cgroup = self.cgroup, None
            await cg.remove()
        if self.template_mounted:
            self.template_mounted = False
            if self.disk_mounted:
                self._disk_final = _disk.used(self._workdir)[0]
            _disk.unmount_overlay(self._workdir)  # its upper layer goes with the workdir; its shutdown off our path
            helper, self._template_helper = self._template_helper, None
            if helper is not None:
                _kernel.reap_template_helper(helper)
        if self.disk_mounted:
            if self._disk_final is None:
                self._disk_final = _disk.used(self._workdir)[0]
            self.disk_mounted = False
            _disk.unmount(self._workdir)
