"""One sandbox's host side: a slot of the process's bound (_capacity.py), its
host uid (_ids.py) and its workdir (_workdir.py), acquired in that order and
given back on every way out (success, error, cancellation), after the
sandbox's processes are gone."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs

from . import _capacity, _ids
from ._rmtree import OverBudget, remove_async
from ._workdir import Stale, Workdir, create, sweep_in_background

INLINE_BUDGET = 64  # directory entries removed on the event loop before the rest goes to a thread


@attrs.define(eq=False)
class HostSide:
    """What the host holds for one sandbox: its uid lease and its workdir."""

    lease: Any  # _ids.Lease
    path: str
    owned: Workdir | None  # None: a workdir the caller gave (kept)
    keep: bool = False
    # Every process of the sandbox lived in a pid namespace whose init is
    # reaped by now (the kernel kills the namespace with it): nothing of the
    # uid can be left, and the kill by uid is skipped (~0.2 ms).
    pid_namespace: bool = False
    released: bool = False  # given back (its slot too)

    def done(self) -> None:
        """Mark it given back and free its slot (once)."""
        if not self.released:
            self.released = True
            _capacity.GATE.leave()

    def teardown(self, budget: int | None = None) -> None:
        """Kill whatever still runs as the sandbox's uid (there is no other
        process of that uid), remove the workdir, hand the uid back. What
        cannot be done keeps the uid out of use: a kill that failed, or a
        removal that failed (something keeps filling it; the entry is then
        stale and the next sweep removes it). With a `budget`, OverBudget
        (nothing handed back yet) when the workdir has more entries: call
        again, off the event loop."""
        kept = None
        try:
            if not self.pid_namespace:
                self.lease.kill_all()
        except OSError:
            kept = self.path
        if self.owned is None:
            kept = self.path  # the caller's workdir: its files are this uid's
        elif self.keep:
            self.owned.keep()
            kept = self.path
        else:
            try:
                self.owned.remove(budget)
            except OverBudget:
                raise
            except OSError:
                self.owned.release()
                kept = self.owned.entry_path
        self.lease.release(kept=kept)


async def acquire(workdir: str | None, keep: bool, walk: bool = False) -> HostSide:
    """A sandbox's host resources (a slot, a uid, a workdir), to be given
    back by `release` (or `release_now`) exactly once, from any task or
    thread (nothing here is tied to the acquiring task); on failure, nothing
    is held."""
    await _capacity.GATE.enter()
    try:
        with _capacity.exhaustion_as_error("host-ids"):
            lease = _ids.acquire(workdir)
        try:
            if workdir is None:
                sweep_in_background(on_stale=reclaim)
                with _capacity.exhaustion_as_error("workdir"):
                    wd = create((lease.uid, lease.gid) if lease.separate else None, walk=walk)
                lease.note_entry(wd.entry_path)
                return HostSide(lease=lease, path=wd.path, owned=wd, keep=keep)
            lease.note_entry(workdir)  # should we die, the uid stays with this workdir
            return HostSide(lease=lease, path=workdir, owned=None)
        except BaseException:
            lease.release()
            raise
    except BaseException:
        _capacity.GATE.leave()
        raise


async def release(side: HostSide) -> None:
    """Give back what `acquire` took, after the sandbox's processes are gone.
    A small workdir (the common case) goes in one bounded step here (a
    thread's wake-up costs more on a busy host); a big one in a worker
    thread, off the event loop. Idempotent."""
    if side.released:
        return
    try:
        side.teardown(budget=INLINE_BUDGET)
    except OverBudget:
        await remove_async(side.teardown)
    finally:
        side.done()


def release_now(side: HostSide) -> None:
    """`release` without an event loop (the loop that owned the sandbox is
    gone): the whole workdir in this thread. Idempotent."""
    if side.released:
        return
    try:
        side.teardown()
    finally:
        side.done()


@contextlib.asynccontextmanager
async def host_side(workdir: str | None, keep: bool, walk: bool = False) -> AsyncIterator[HostSide]:
    """Acquire a sandbox's host resources (a slot, a uid, a workdir) and give
    them all back on every way out: success, error, cancellation."""
    side = await acquire(workdir, keep, walk)
    try:
        yield side
    finally:
        with anyio.CancelScope(shield=True):
            await release(side)


def reclaim(s: Stale) -> None:
    """Before a dead host's workdir is removed: kill what still runs as its uid."""
    if s.ids is not None:
        _ids.reclaim(*s.ids)
