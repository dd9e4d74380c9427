"""Snippets run in warm sandboxes, one fresh sandbox per snippet by default:
the body of zviz.ray's actors and of its Ray Data batch runner (asyncio: a
Ray async actor's loop, or a private loop thread). No Ray here.

Isolation (docs/scale.md, "What a warm sandbox is"): a snippet runs with
`Sandbox.run_python` in a fresh directory, in a sandbox that no other snippet
used (`fresh_every=1`): it cannot see another snippet's files, processes or
Python state. There it runs in one interpreter started for it (run_python's
`fork=False`: it imports `preload` itself), not in a fork of a template:
a template would be started for that one snippet, which costs a second
interpreter start and a fork. The sandbox itself is made ahead: each slot
prepares its next one while the others run. `fresh_every=N` reuses a sandbox
for N snippets: its template (which imported `preload` once) is started ahead
and each snippet gets a fresh fork of it (no Python state is shared), but
files written outside its own directory and processes that left its session
are seen by the next ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._errors import ZvizError
from ._execution import Execution, ExecutionError
from ._policy import Policy
from ._sandbox import Sandbox

WARM_CODE = "pass"


def _frozen_map(value: Mapping[str, int]) -> Mapping[str, int]:
    return dict(value)


@attrs.frozen(kw_only=True)
class Snippet:
    """One piece of Python for a pool, with what differs from the pool's defaults.

    code: run like `python -c` (`Sandbox.run_python`). timeout: seconds, or
    None for the call's (or the policy's `limits.wall_s`). policy: a `Policy`
    for this snippet only: it runs in a sandbox of its own made for it (cold:
    no sandbox of that policy is kept warm).
    """

    code: str
    timeout: float | None = None
    policy: Policy | None = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.code, str):
            raise TypeError(f"Snippet.code must be a str, not {type(self.code).__name__}")
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or not self.timeout > 0):
            raise ValueError(f"Snippet.timeout must be a positive number of seconds or None, not {self.timeout!r}")
        if self.policy is not None and not isinstance(self.policy, Policy):
            raise TypeError(f"Snippet.policy must be a zviz.Policy or None, not {type(self.policy).__name__}")


@attrs.frozen(kw_only=True)
class SnippetResult:
    """What became of one snippet.

    index: its position in the input. ok: it ran and exited 0. exit_status:
    0, the code of a `SystemExit`, 1 for any other exception, None if it did
    not run. error: the snippet's exception (`ExecutionError`), or None.
    failure: why the pool could not run it (its actor or node died twice, its
    sandbox could not be made), or None. stdout/stderr/result: as in
    `Execution`. timed_out: its timeout interrupted it. restarted: its process
    died or was killed (a crash, the memory limit, a cell that ignored the
    interrupt). denials: denied system calls by name. duration_s: its run in the
    sandbox; wall_s: from its submission to its result (queueing, retries and
    Ray included). node_id/node_ip/actor: where it ran (last attempt).
    attempts: 1, or 2 when its first actor died.
    """

    index: int = -1
    ok: bool = False
    exit_status: int | None = None
    error: ExecutionError | None = None
    failure: str | None = None
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    timed_out: bool = False
    restarted: bool = False
    denials: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_map)
    duration_s: float = 0.0
    wall_s: float = 0.0
    node_id: str = ""
    node_ip: str = ""
    actor: str = ""
    attempts: int = 1


def exit_status(error: ExecutionError | None) -> int:
    """A shell-style status of a snippet: 0, SystemExit's code, or 1."""
    if error is None:
        return 0
    if error.name == "SystemExit":
        value = error.value.strip()
        if value in ("", "None", "0"):
            return 0
        try:
            return int(value) & 0xFF
        except ValueError:
            return 1  # sys.exit("message")
    return 1


def from_execution(ex: Execution, denials: Mapping[str, int], where: Mapping[str, str]) -> SnippetResult:
    status = exit_status(ex.error)
    return SnippetResult(ok=status == 0, exit_status=status, error=ex.error, stdout=ex.stdout, stderr=ex.stderr,
                         result=ex.result, timed_out=ex.interrupted, restarted=ex.restarted, denials=denials,
                         duration_s=ex.duration_s, node_id=where.get("node_id", ""),
                         node_ip=where.get("node_ip", ""), actor=where.get("actor", ""))


def failed(reason: str, where: Mapping[str, str], *, index: int = -1, attempts: int = 1) -> SnippetResult:
    return SnippetResult(index=index, failure=reason, attempts=attempts, node_id=where.get("node_id", ""),
                         node_ip=where.get("node_ip", ""), actor=where.get("actor", ""))


def check_options(policy: Policy | None, sandboxes: int, fresh_every: int, preload: Sequence[str],
                  python: str, *, sandboxes_name: str = "sandboxes_per_node") -> tuple[Policy, tuple[str, ...]]:
    from ._context import check_preload

    if policy is None:
        policy = Policy.python()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a zviz.Policy (e.g. zviz.Policy.python()), not {type(policy).__name__}")
    for name, value in ((sandboxes_name, sandboxes), ("fresh_sandbox_every", fresh_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, not {value!r}")
    if not isinstance(python, str) or not python:
        raise TypeError("python must be a command or path inside the sandbox, e.g. 'python3' or a venv's bin/python")
    return policy, check_preload(preload)


@attrs.define
class _Slot:
    sandbox: Sandbox | None = None
    uses: int = 0
    next: asyncio.Task[Sandbox] | None = None


class SnippetWorker:
    """`sandboxes` slots, each holding a warm sandbox; `run()` takes a free slot."""

    def __init__(self, policy: Policy, *, sandboxes: int, preload: tuple[str, ...], python: str,
                 fresh_every: int, where: Mapping[str, str]) -> None:
        self._policy = policy
        self._preload = preload
        self._python = python
        self._fresh_every = fresh_every
        self._where = dict(where)
        self._slots = [_Slot() for _ in range(sandboxes)]
        self._free: asyncio.Queue[_Slot] | None = None
        self._closing = False
        self._stray: set[Sandbox] = set()  # cold sandboxes of policy overrides, while they run
        self._checked = False  # python and preload were seen to start (else start() raises)
        self._starting = asyncio.Lock()  # concurrent first calls make the slots' sandboxes once

    async def start(self) -> None:
        """Make every slot's first sandbox (raises what the first failure raised, closing the others)."""
        async with self._starting:
            if self._free is None:
                await self._start()

    async def _start(self) -> None:
        free: asyncio.Queue[_Slot] = asyncio.Queue()
        results = await asyncio.gather(*(self._make(self._policy) for _ in self._slots), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for slot, r in zip(self._slots, results, strict=True):
            if isinstance(r, Sandbox):
                slot.sandbox = r
            free.put_nowait(slot)
        self._free = free
        if errors:
            await self.aclose()
            raise errors[0]

    async def _make(self, policy: Policy) -> Sandbox:
        if self._closing:
            raise ZvizError("the pool is closing")
        sb = await Sandbox.create(policy)
        try:
            if policy == self._policy and (self._fresh_every > 1 or not self._checked):
                # warm its template (snippets will only fork), or, once, see that the
                # interpreter starts and imports the preload (one interpreter, gone after)
                ex = await sb.run_python(WARM_CODE, preload=self._preload, python=self._python, timeout=60,
                                         fork=self._fresh_every > 1)
                self._checked = True
                if ex.error is not None:
                    raise ZvizError(f"warming a sandbox failed: {ex.error.name}: {ex.error.value}")
            elif policy == self._policy:
                # its zygote (the init of its pid namespace, spawned by its first
                # command) is started now, off the snippet's path; it has run nothing
                fd, _ = await sb._open_root()
                fd.close()
            if self._closing:
                raise ZvizError("the pool is closing")
        except BaseException:
            with _shielded():
                await sb.aclose()
            raise
        return sb

    async def run(self, code: str, timeout: float | None = None, policy: Policy | None = None) -> SnippetResult:
        """Run one snippet in a free slot's sandbox; never raises for the snippet's own failures."""
        await self.start()
        assert self._free is not None
        slot = await self._free.get()
        try:
            if policy is not None and policy != self._policy:
                return await self._cold(code, timeout, policy)
            return await self._in_slot(slot, code, timeout)
        finally:
            self._free.put_nowait(slot)

    async def _in_slot(self, slot: _Slot, code: str, timeout: float | None) -> SnippetResult:
        sb = slot.sandbox
        if sb is None:
            task, slot.next = slot.next, None
            try:
                sb = await task if task is not None else await self._make(self._policy)
            except (ZvizError, OSError, ValueError) as e:
                return failed(f"could not make a sandbox: {type(e).__name__}: {e}", self._where)
            slot.sandbox = sb
        done = False
        try:
            result = await self._run_in(sb, code, timeout, fork=self._fresh_every > 1)
            done = True
            return result
        finally:
            slot.uses += 1
            if not done or slot.uses >= self._fresh_every or sb.closed:
                slot.sandbox, slot.uses = None, 0
                with _shielded():
                    await sb.aclose()
                if not self._closing:
                    slot.next = asyncio.get_running_loop().create_task(self._make(self._policy))

    async def _cold(self, code: str, timeout: float | None, policy: Policy) -> SnippetResult:
        try:
            sb = await Sandbox.create(policy)
        except (ZvizError, OSError, ValueError) as e:
            return failed(f"could not make a sandbox of the snippet's policy: {type(e).__name__}: {e}", self._where)
        self._stray.add(sb)
        try:
            return await self._run_in(sb, code, timeout, fork=False)
        finally:
            self._stray.discard(sb)
            with _shielded():
                await sb.aclose()

    async def _run_in(self, sb: Sandbox, code: str, timeout: float | None, *, fork: bool) -> SnippetResult:
        before = dict(sb.statistics().denials)
        try:
            ex = await sb.run_python(code, preload=self._preload, python=self._python, timeout=timeout,
                                     fork=fork)
        except (ZvizError, OSError) as e:  # CodeContextError, a closed sandbox, a setup error
            return failed(f"{type(e).__name__}: {e}", self._where)
        after = sb.statistics().denials
        denials = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}
        return from_execution(ex, denials, self._where)

    async def aclose(self) -> None:
        """Close every sandbox (warm, being made, or running a snippet: its call ends with a failure)."""
        self._closing = True
        with _shielded():
            for slot in self._slots:
                task, slot.next = slot.next, None
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await (await task).aclose()
                held, slot.sandbox = slot.sandbox, None
                if held is not None:
                    await held.aclose()
            for sb in list(self._stray):
                await sb.aclose()

    @property
    def where(self) -> Mapping[str, str]:
        return self._where


@contextlib.contextmanager
def _shielded() -> Any:
    """anyio's shield: aclose() finishes even when the caller is being cancelled."""
    import anyio

    with anyio.CancelScope(shield=True):
        yield
