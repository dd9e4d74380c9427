"""Pre-started sandboxes: a small pool per event loop and policy.

What a fresh sandbox costs before its first command (its host uid and
workdir, the plan, its memory cgroup, the supervisor, and the spawn of its
zygote: new user, pid, mount, net, ipc and uts namespaces, the new root,
Landlock, seccomp, the exec of zviz-init) can be paid before a caller asks
for it. With a pool size N > 0, `open_sandbox(policy)` takes a ready
sandbox of exactly that policy when one is there, and the pool's task makes
another in the background; when none is ready the caller makes its own, as
without a pool.

A pooled sandbox is a fresh sandbox made early: nobody used it (it is handed
out once, never returned to the pool), it has its own workdir, its own /tmp
and its own pid namespace, whose init (the zygote) has run nothing yet. Its
host paths (fs.read_only, fs.read_write, the binds' sources) were bound as
they were then: it is handed out only if each still names the same file
(device and inode, `stamp`), else it is closed and the caller gets a fresh
one (a directory replaced, `rm -r build && mkdir build`, a file an editor
saved by rename: a fresh sandbox would show the new one); the same for the
addresses of `net.allow` names in `allow` mode (resolved once, as it was
made). Only
a request that a fresh default sandbox would answer is served from the pool:
a given `workdir=`, `keep_workdir=True`, `monitor=` or tracing make their
own. The key is the policy itself (a frozen value: equal policies share a
pool, any difference does not) and the kind: with a zygote (open_sandbox's)
or without one (a warm snippet's, `zviz.run_snippet` and `zviz run --
python3 -c CODE`, whose pid 1 is a fork of a warm interpreter; made up to
its supervisor and nothing in its namespaces until its command starts).

The size: `zviz.set_pool_size(n)`, else the environment variable
ZVIZ_POOL_SIZE, else 0 (no pool: nothing runs in the background). It is per
policy and per event loop. The pool's sandboxes count against the process's
bound of open sandboxes (`ZVIZ_MAX_SANDBOXES`); the pool fills only while
that bound leaves room for callers. Idle pooled sandboxes are closed when the
loop ends (like any sandbox of that loop), or when the size is lowered.

A failed refill is kept, reported once as a `ZvizWarning` to the next caller
of that policy (who then makes its own sandbox and sees the error itself if
it persists), and retried only after a back-off that doubles up to 30 s:
a broken host never makes the pool spin.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

from . import _capacity, _lifecycle
from ._errors import PolicyError, ZvizWarning

if TYPE_CHECKING:
    from ._policy import Policy
    from ._sandbox import Sandbox

    Key = tuple[Policy, bool]  # a policy, and whether its sandboxes have a zygote

ENV = "ZVIZ_POOL_SIZE"
MAX_SIZE = 64
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 30.0
# The pool makes a sandbox only once its loop has been idle this long: a refill
# is ~3 ms of work on the loop's thread, which must not delay a caller's
# running command (in a loop that is never idle, callers make their own).
IDLE_S = 0.002
# A caller that finds no ready sandbox while one of its policy is being made
# waits this long for it: the refill started earlier and ends sooner than a
# sandbox the caller would make (~3-5 ms). (Before round 15 the refill's spawn
# held the loop, so such a caller waited for it anyway.)
REFILL_WAIT_S = 0.005

class _Settings:
    size: int | None = None  # set_pool_size's; None: the environment's
    trio_pools: Any = None  # a trio RunVar, made on first use (trio is imported only when it runs)


def set_pool_size(size: int | None) -> None:
    """How many pre-started sandboxes to keep ready per policy and event loop
    (0 disables the pool; None goes back to ZVIZ_POOL_SIZE, default 0).
    `open_sandbox(policy)` takes a ready one when there is one, and the pool
    refills in the background; see docs/performance.md, "the cold path"."""
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int or None, not {type(size).__name__}")
        if not 0 <= size <= MAX_SIZE:
            raise ValueError(f"size must be between 0 and {MAX_SIZE}, not {size}")
    _Settings.size = size
    for pool in _live_pools():
        pool.wake_from_anywhere()  # shrink (or grow) now


def pool_size() -> int:
    if _Settings.size is not None:
        return _Settings.size
    text = os.environ.get(ENV, "")
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_SIZE:  # (isdigit alone: '²', Arabic-Indic digits)
        raise PolicyError(ENV, text, f"an integer from 0 to {MAX_SIZE}: pre-started sandboxes per policy")
    return int(text)


class _Failure:
    __slots__ = ("count", "error", "reported", "until")

    def __init__(self) -> None:
        self.count = 0
        self.until = 0.0
        self.error: BaseException | None = None
        self.reported = True


class Pool:
    """One event loop's pool: ready sandboxes by policy, and the task that refills them."""

    def __init__(self) -> None:
        self.ready: dict[Key, collections.deque[Sandbox]] = {}
        self.failures: dict[Key, _Failure] = {}
        self.wake = anyio.Event()
        self.call_soon = _lifecycle.threadsafe_caller()  # (made on its loop: set_pool_size may come from any thread)
        self.serving = False
        self.closed = False
        self.made = 0  # sandboxes made by the pool (tests, benchmarks)
        self.takes = 0  # requests seen (hits and misses)
        self.stamps: weakref.WeakKeyDictionary[Sandbox, tuple[object, ...]] = (
            weakref.WeakKeyDictionary())  # what its host paths were when it was made
        self.stale: list[Sandbox] = []  # taken out (a host path changed since), for the pool's task to close
        self.making: dict[Key, anyio.Event] = {}  # a refill in flight: set once it is ready (or failed)

    def wake_from_anywhere(self) -> None:
        """Wake the pool's task from any thread (its loop's, another one's)."""
        with contextlib.suppress(RuntimeError):  # (its loop has ended)
            self.call_soon(self._wake)

    def _wake(self) -> None:
        self.wake.set()  # (the event of the moment: the task replaces it each time it sleeps)

    def take(self, policy: Policy, zygote: bool = True) -> Sandbox | None:
        """A ready sandbox of exactly `policy` (now marked as the caller's),
        with a zygote or without one, or None; either way the pool refills
        behind it."""
        if self.closed:
            return None
        self.takes += 1
        if _looks_up_names(policy):
            return None  # (never pre-started: see _looks_up_names)
        key = (policy, zygote)
        q = self.ready.setdefault(key, collections.deque())
        f = self.failures.get(key)
        if f is not None and not f.reported:
            f.reported = True
            warnings.warn(f"zviz sandbox pool: pre-starting a sandbox failed ({f.count} time(s) in a row; "
                          f"retried in {f.until - anyio.current_time():.1f} s at the earliest): {f.error!r}",
                          ZvizWarning, stacklevel=4)
        sb = None
        now = None
        while q:
            candidate = q.popleft()
            life = candidate._life
            if life.closing or life.done.is_set():
                continue  # its service ended (the loop is ending, or it failed): never hand it out
            now = stamp(policy) if now is None else now
            if self.stamps.pop(candidate, None) != now:
                self.stale.append(candidate)  # it shows a host path as it was: a fresh one shows it as it is
                continue
            life.pooled = False
            sb = candidate
            break
        self._start()
        return sb

    def _start(self) -> None:
        self.wake.set()
        if not self.serving:
            self.serving = True
            _lifecycle.spawn_service(self.serve, name="zviz sandbox pool")

    def _next(self) -> tuple[Key | None, float]:
        """The (policy, kind) to refill now (None: nothing), and how long to sleep otherwise."""
        size = pool_size()
        now = anyio.current_time()
        sleep = math.inf
        gate = _capacity.GATE
        for key, q in self.ready.items():
            if len(q) >= size:
                continue
            f = self.failures.get(key)
            if f is not None and f.until > now:
                sleep = min(sleep, f.until - now)
                continue
            # leave room for callers: a pooled sandbox never takes a caller's slot
            if gate.active + 2 > _capacity.max_sandboxes() or gate.waiting():
                return None, 0.05
            return key, 0.0
        return None, sleep

    async def _shrink(self) -> None:
        while self.stale:
            with anyio.CancelScope(shield=True):
                await self.stale.pop().aclose()
        size = pool_size()
        for q in self.ready.values():
            while len(q) > size:
                sb = q.pop()
                with anyio.CancelScope(shield=True):
                    await sb.aclose()

    async def serve(self) -> None:
        """The pool's task: refill one sandbox at a time, each in its own step
        (callers run between the steps). Ends with the loop, closing what is left."""
        try:
            while True:
                await self._shrink()
                key, sleep = self._next()
                if key is None:
                    self.wake = anyio.Event()
                    with anyio.move_on_after(sleep):
                        await self.wake.wait()
                    continue
                await _idle(self)
                if self._next()[0] != key:
                    continue  # the size or the room changed meanwhile
                before = stamp(key[0])  # (before: a change while it is made is caught at take)
                self.making[key] = making = anyio.Event()
                try:
                    sb = await make(*key)
                except Exception as e:  # noqa: BLE001 - kept, reported to the next caller, retried later
                    f = self.failures.setdefault(key, _Failure())
                    f.count += 1
                    f.error = e
                    f.reported = False
                    f.until = anyio.current_time() + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (f.count - 1))
                    continue
                else:
                    self.failures.pop(key, None)
                    self.made += 1
                    self.stamps[sb] = before
                    self.ready[key].append(sb)
                finally:
                    del self.making[key]
                    making.set()
                await anyio.lowlevel.checkpoint()
        finally:
            self.closed = True
            with anyio.CancelScope(shield=True):
                for q in (*self.ready.values(), self.stale):
                    while q:
                        with contextlib.suppress(Exception):
                            await q.pop().aclose()


def _looks_up_names(policy: Policy) -> bool:
    """`allow` mode with host names: its sandbox allows the addresses they
    had when it was made, so a pre-started one could allow a name at an
    address it has left. Telling would take a lookup at every take, on the
    event loop (and an open already looks them up in a worker thread, which
    a pool hit would not save): such a policy is never pooled."""
    return policy.net.mode == "allow" and not all(e.is_ip() for e in policy.net.allow)


def stamp(policy: Policy) -> tuple[object, ...]:
    """What the policy's host paths name now: (device, inode) of each, None
    for one that does not exist (a few stats: ~1 us each)."""
    out: list[object] = []
    for path in (*policy.fs.read_only, *policy.fs.read_write, *(b.source for b in policy.fs.binds)):
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino))
    return tuple(out)


async def _idle(pool: Pool) -> None:
    """Return once the loop has been idle for IDLE_S: on trio, every task
    blocked that long; on asyncio (which cannot tell), no request for that long."""
    if sniffio.current_async_library() == "trio":
        await _lifecycle.trio_idle()(cushion=IDLE_S)
        return
    while True:
        seen = pool.takes
        await anyio.sleep(IDLE_S)
        if pool.takes == seen:
            return


async def make(policy: Policy, zygote: bool = True) -> Sandbox:
    """One pre-started sandbox: made as `open_sandbox(policy)` makes one, its
    zygote spawned now (the namespaces, the root, the filters: the costly
    part); without a zygote, as a warm snippet's (its command builds those)."""
    from . import _sandbox

    sb = await _sandbox._create(policy, pooled=True, zygote=zygote)
    if not zygote:
        return sb
    try:
        life = sb._life
        assert life.supervisor is not None
        await sb._runner.ensure_zygote(life.supervisor)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await sb.aclose()
        raise
    return sb


# ---- one pool per event loop

_asyncio_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()
_all: weakref.WeakSet[Pool] = weakref.WeakSet()


def _live_pools() -> list[Pool]:
    return [p for p in _all if not p.closed]


def current(create: bool = True) -> Pool | None:
    """This event loop's pool (made when `create` and missing)."""
    if sniffio.current_async_library() == "trio":
        import trio

        if _Settings.trio_pools is None:
            _Settings.trio_pools = trio.lowlevel.RunVar("zviz_pool")
        found: Pool | None = _Settings.trio_pools.get(None)
        if found is None and create:
            found = Pool()
            _Settings.trio_pools.set(found)
            _all.add(found)
        return found
    loop = asyncio.get_running_loop()
    pool = _asyncio_pools.get(loop)
    if pool is None and create:
        pool = _asyncio_pools[loop] = Pool()
        _all.add(pool)
    return pool


async def take_soon(policy: Policy, zygote: bool = True) -> Sandbox | None:
    """`open_sandbox`'s hook: `take`, or, when none is ready but one of that
    policy and kind is being made, that one once it is (up to REFILL_WAIT_S)."""
    sb = take(policy, zygote)
    if sb is not None:
        return sb
    pool = current(create=False)
    making = pool.making.get((policy, zygote)) if pool is not None else None
    if pool is None or making is None:
        return None
    with anyio.move_on_after(REFILL_WAIT_S):
        await making.wait()
    return pool.take(policy, zygote) if making.is_set() else None


def take(policy: Policy, zygote: bool = True) -> Sandbox | None:
    """A ready sandbox of `policy` (with a zygote or without) from this
    loop's pool, or None."""
    if pool_size() <= 0:
        pool = current(create=False)
        if pool is not None and any(pool.ready.values()):
            pool.wake.set()  # the size went to 0: let its task close the idle ones
        return None
    pool = current()
    assert pool is not None
    return pool.take(policy, zygote)
