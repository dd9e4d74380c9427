"""zviz on Ray: run many Python snippets in sandboxes spread over a Ray cluster.

    import ray, zviz
    from zviz.ray import SandboxPool

    ray.init()                       # or ray.init(address="auto") on a cluster
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=4) as pool:
        results = await pool.map_python(snippets, timeout=10)      # in input order
        async for r in pool.imap_python(snippets): ...             # as they finish

One Ray actor per node (or `actors_per_node`), each holding `sandboxes_per_node`
warm sandboxes of the policy; each snippet runs in a sandbox no other snippet
used (docs/scale.md). Needs the `ray` extra: `pip install zviz[ray]`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

try:
    import ray
    import ray.exceptions
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as _e:  # pragma: no cover - exercised by tests/test_ray.py in a fresh interpreter
    raise ImportError(f"zviz.ray needs Ray: pip install zviz[ray] (or pip install 'ray>=2.40'); {_e}") from _e

import anyio
import attrs

from ._policy import Policy
from ._snippets import Snippet, SnippetResult, SnippetWorker, check_options, failed

__all__ = ["PythonBatchRunner", "SandboxPool", "Snippet", "SnippetResult"]

# Snippet and SnippetResult are shown as this module's, like zviz's public names
for _cls in (Snippet, SnippetResult):
    _cls.__module__ = "zviz.ray"
del _cls

_RAY: Any = ray  # Ray's untyped functions, called through Any (mypy --strict)
#: how long the caller's bridge thread waits in one `ray.wait` (it then looks at cancellation)
_WAIT_S = 0.25
#: the attempts of a snippet whose actor died (the first one and one retry)
ATTEMPTS = 2


def _require_ray() -> None:
    if not ray.is_initialized():
        raise RuntimeError("zviz.ray.SandboxPool: Ray is not initialised: call ray.init() first "
                           "(ray.init(address='auto') joins a cluster started with `ray start --head`)")


class _PoolActor:
    """The Ray actor (an async actor: its methods run on one asyncio loop)."""

    def __init__(self, policy: Policy, sandboxes: int, preload: tuple[str, ...], python: str,
                 fresh_every: int) -> None:
        ctx = ray.get_runtime_context()
        where = {"node_id": ctx.get_node_id(), "node_ip": _RAY.util.get_node_ip_address(),
                 "actor": ctx.get_actor_id() or ""}
        self._worker = SnippetWorker(policy, sandboxes=sandboxes, preload=preload, python=python,
                                     fresh_every=fresh_every, where=where)

    async def start(self) -> dict[str, Any]:
        await self._worker.start()
        return {**self._worker.where, "pid": os.getpid()}

    async def run(self, code: str, timeout: float | None, policy: Policy | None) -> SnippetResult:
        return await self._worker.run(code, timeout, policy)

    async def close(self) -> None:
        await self._worker.aclose()


_RemoteActor: Any = ray.remote(_PoolActor)


@attrs.define(eq=False)
class _Actor:
    handle: Any
    node_id: str
    in_flight: int = 0
    started: Any = None  # the ObjectRef of start()
    info: Mapping[str, Any] | None = None


@attrs.define(eq=False)
class _Job:
    index: int
    snippet: Snippet
    submitted: float
    attempts: int = 0
    actor: _Actor | None = None


class SandboxPool:
    """Sandboxes on every node of a Ray cluster, fed with Python snippets.

    policy: the sandboxes' `Policy` (default `Policy.python()`; for a venv,
    `with_paths(read_only=[venv])` and `python=` its interpreter).
    sandboxes_per_node: warm sandboxes (concurrent snippets) per actor.
    actors_per_node: actors per node (each has one event loop: use more on
    nodes with many cores). preload: modules each sandbox's template imports
    once. fresh_sandbox_every: a sandbox serves this many snippets and is then
    replaced (1: each snippet has a sandbox of its own; docs/scale.md says what
    larger values share). in_flight_per_actor: snippets sent to an actor and
    not yet answered (back-pressure; default 2 x sandboxes_per_node).
    actor_cpus: the CPUs each actor reserves in Ray's accounting (0: it only
    supervises; the snippets' CPU is the sandboxes'). nodes: the Ray node ids to
    use (default every alive node).

    Needs `ray.init()` first. Usable from trio and asyncio (`async with
    SandboxPool(...) as pool:`), and from blocking code (`run_batch`, `close`).
    """

    def __init__(self, policy: Policy | None = None, *, sandboxes_per_node: int = 2, actors_per_node: int = 1,
                 preload: Sequence[str] = (), python: str = "python3", fresh_sandbox_every: int = 1,
                 in_flight_per_actor: int | None = None, actor_cpus: float = 0.0,
                 nodes: Sequence[str] | None = None) -> None:
        self.policy, self.preload = check_options(policy, sandboxes_per_node, fresh_sandbox_every, preload, python)
        for name, value in (("actors_per_node", actors_per_node), ("in_flight_per_actor", in_flight_per_actor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        if not isinstance(actor_cpus, (int, float)) or actor_cpus < 0:
            raise ValueError(f"actor_cpus must be a number >= 0, not {actor_cpus!r}")
        _require_ray()
        self.python = python
        self.sandboxes_per_node = sandboxes_per_node
        self.fresh_sandbox_every = fresh_sandbox_every
        self.in_flight_per_actor = in_flight_per_actor or 2 * sandboxes_per_node
        self._actor_cpus = float(actor_cpus)
        alive = [n["NodeID"] for n in _RAY.nodes() if n.get("Alive")]
        if nodes is not None:
            unknown = [n for n in nodes if n not in alive]
            if isinstance(nodes, str) or unknown or not nodes:
                raise ValueError(f"nodes must be a non-empty list of alive Ray node ids (ray.nodes()); "
                                 f"unknown or dead: {unknown or nodes!r}")
            alive = list(nodes)
        self._lock = threading.Lock()
        self._closed = False
        self.replaced = 0  # actors replaced after they died
        self._actors: list[_Actor] = [self._spawn(n) for n in alive for _ in range(actors_per_node)]

    def __repr__(self) -> str:
        return (f"<zviz.ray.SandboxPool {self.policy.name} actors={len(self._actors)} "
                f"sandboxes_per_node={self.sandboxes_per_node}{' closed' if self._closed else ''}>")

    # ---- actors

    def _spawn(self, node_id: str) -> _Actor:
        handle = _RemoteActor.options(
            num_cpus=self._actor_cpus, max_concurrency=self.in_flight_per_actor + 4, max_restarts=0,
            max_task_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
        ).remote(self.policy, self.sandboxes_per_node, self.preload, self.python, self.fresh_sandbox_every)
        actor = _Actor(handle, node_id)
        actor.started = handle.start.remote()
        return actor

    def _replace(self, actor: _Actor) -> None:
        """`actor` died (or cannot be reached): kill what is left of it and start another on its node
        (elsewhere when the node is gone: the scheduling is soft)."""
        with self._lock:
            if actor not in self._actors or self._closed:
                return
            self._actors.remove(actor)
            self._actors.append(self._spawn(actor.node_id))
            self.replaced += 1
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    @property
    def actors(self) -> list[Any]:
        """The live actors' handles (`ray.kill` one to see the pool replace it)."""
        return [a.handle for a in self._actors]

    def _pick(self) -> _Actor | None:
        with self._lock:
            free = [a for a in self._actors if a.in_flight < self.in_flight_per_actor]
            return min(free, key=lambda a: a.in_flight) if free else None

    def _capacity(self) -> int:
        return len(self._actors) * self.in_flight_per_actor

    # ---- running snippets

    def _job(self, index: int, item: str | Snippet, timeout: float | None) -> _Job:
        if isinstance(item, str):
            snippet = Snippet(code=item, timeout=timeout)
        elif isinstance(item, Snippet):
            snippet = item if item.timeout is not None or timeout is None else attrs.evolve(item, timeout=timeout)
        else:
            raise TypeError(f"a snippet is a str or a zviz.ray.Snippet, not {type(item).__name__} (item {index})")
        return _Job(index, snippet, time.monotonic())

    def _submit(self, job: _Job, actor: _Actor) -> Any:
        job.attempts += 1
        job.actor = actor
        with self._lock:  # several loops (run_batch from threads) may share the pool
            actor.in_flight += 1
        return actor.handle.run.remote(job.snippet.code, job.snippet.timeout, job.snippet.policy)

    def _settle(self, job: _Job, outcome: object) -> SnippetResult | None:
        """The result of a finished attempt, or None when it was resubmitted (its actor died)."""
        actor = job.actor
        assert actor is not None
        with self._lock:
            actor.in_flight -= 1
        wall = time.monotonic() - job.submitted
        if isinstance(outcome, SnippetResult):
            return attrs.evolve(outcome, index=job.index, attempts=job.attempts, wall_s=wall)
        where = dict(actor.info or {})
        where = {k: str(where.get(k, "")) for k in ("node_id", "node_ip", "actor")}
        if isinstance(outcome, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                                ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
            self._replace(actor)
            if job.attempts < ATTEMPTS:
                return None
            reason = f"its actor died on each of {job.attempts} attempts: {type(outcome).__name__}: {outcome}"
        else:
            reason = f"{type(outcome).__name__}: {outcome}"
        return attrs.evolve(failed(reason, where, index=job.index, attempts=job.attempts), wall_s=wall)

    async def _started(self) -> None:
        """Wait for every actor's first sandboxes: a policy the node cannot set up raises here."""
        pending = [a for a in self._actors if a.info is None]
        if not pending:
            return
        refs = [a.started for a in pending]
        outcomes = await _bridge(_get_all, refs)
        for actor, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, ray.exceptions.RayTaskError):
                raise cast(Any, outcome).as_instanceof_cause()
            if isinstance(outcome, BaseException):
                self._replace(actor)  # died while starting: its replacement starts on its own
                continue
            actor.info = outcome

    async def imap_python(self, snippets: Iterable[str | Snippet], *, timeout: float | None = None,
                          ordered: bool = False) -> AsyncGenerator[SnippetResult, None]:
        """Run each snippet once in a sandbox of the pool; yield its `SnippetResult` as it finishes
        (`ordered=True`: in input order). At most `in_flight_per_actor` per actor are sent ahead:
        `snippets` is read as results are taken. A snippet whose actor died is retried once on
        another, then reported failed. Leaving the loop early (break, cancellation) cancels the
        snippets in flight: their sandboxes are closed."""
        if self._closed:
            raise RuntimeError("this SandboxPool is closed: make a new one")
        await self._started()
        source: Iterator[str | Snippet] = iter(snippets)
        pending: dict[Any, _Job] = {}  # ObjectRef -> job
        retry: list[_Job] = []
        done: dict[int, SnippetResult] = {}  # ordered: finished, not yet yielded
        next_out = 0
        index = 0
        exhausted = False
        try:
            while True:
                # fill: retries first, then new snippets, while an actor has room (and, ordered, the
                # results held back for order count against the window)
                while (retry or not exhausted) and len(pending) + len(done) < self._capacity():
                    actor = self._pick()
                    if actor is None:
                        break
                    if retry:
                        job = retry.pop(0)
                    else:
                        item = next(source, _END)
                        if item is _END:
                            exhausted = True
                            break
                        job = self._job(index, item, timeout)  # type: ignore[arg-type]
                        index += 1
                    pending[self._submit(job, actor)] = job
                if not pending:
                    break
                for ref, outcome in await _bridge(_wait_some, list(pending)):
                    job = pending.pop(ref)
                    result = self._settle(job, outcome)
                    if result is None:
                        retry.append(job)
                    elif ordered:
                        done[result.index] = result
                    else:
                        yield result
                while ordered and next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
            while ordered and next_out in done:
                yield done.pop(next_out)
                next_out += 1
        finally:
            for ref, job in pending.items():  # cancelled or left early: stop their work on the nodes
                if job.actor is not None:
                    with self._lock:
                        job.actor.in_flight -= 1
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - its actor is gone
                    pass

    async def map_python(self, snippets: Iterable[str | Snippet], *, timeout: float | None = None
                         ) -> list[SnippetResult]:
        """Every snippet's `SnippetResult`, in input order (`imap_python(ordered=True)` collected)."""
        out: list[SnippetResult] = []
        gen = self.imap_python(snippets, timeout=timeout, ordered=True)
        try:
            async for r in gen:
                out.append(r)
        finally:
            await gen.aclose()
        return out

    def run_batch(self, snippets: Iterable[str | Snippet], *, timeout: float | None = None) -> list[SnippetResult]:
        """`map_python` for blocking code (a script, a Ray task): runs its own event loop."""
        return anyio.run(self._map_for_sync, list(snippets), timeout)

    async def _map_for_sync(self, snippets: list[str | Snippet], timeout: float | None) -> list[SnippetResult]:
        return await self.map_python(snippets, timeout=timeout)

    # ---- closing

    async def aclose(self) -> None:
        """Close every actor's sandboxes, then end the actors. Idempotent."""
        await _bridge(self._close_blocking)

    def close(self) -> None:
        """`aclose()` for blocking code."""
        self._close_blocking()

    def _close_blocking(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            actors, self._actors = self._actors, []
        refs = [a.handle.close.remote() for a in actors]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=30)
        finally:
            for a in actors:
                try:
                    ray.kill(a.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    async def __aenter__(self) -> SandboxPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


# ---- the bridge to the caller's loop: Ray's calls block, so they run in a worker thread
# (the same code for trio and asyncio); a wait is short, so a cancelled caller's thread ends soon


async def _bridge(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def _outcome(ref: Any) -> object:
    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - the caller sorts them (a dead actor, a bug)
        return e


def _wait_some(refs: list[Any]) -> list[tuple[Any, object]]:
    """At least one finished ref (or none after _WAIT_S) and every other already finished, with outcomes."""
    ready, rest = ray.wait(refs, num_returns=1, timeout=_WAIT_S)
    if ready and rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    return [(r, _outcome(r)) for r in ready]


def _get_all(refs: list[Any]) -> list[object]:
    return [_outcome(r) for r in refs]


class PythonBatchRunner:
    """A callable class for Ray Data's `map_batches`: runs the `code` column's snippets in warm
    sandboxes held by the map actor itself (no pool actor in between).

        ds.map_batches(PythonBatchRunner, fn_constructor_kwargs={"policy": policy}, concurrency=2,
                       batch_size=16)

    Adds the columns ok, exit_status, stdout, stderr, result, error (the exception as
    "Name: value", or ""), failure (or ""), timed_out, duration_s and node_ip. Each batch runs
    at most `sandboxes` snippets at a time. The same arguments as `SandboxPool` where they
    apply; `code_column` names the input column; `timeout` applies to every snippet.
    """

    def __init__(self, policy: Policy | None = None, *, sandboxes: int = 2, preload: Sequence[str] = (),
                 python: str = "python3", fresh_sandbox_every: int = 1, timeout: float | None = None,
                 code_column: str = "code") -> None:
        policy, pre = check_options(policy, sandboxes, fresh_sandbox_every, preload, python, sandboxes_name="sandboxes")
        where = {"node_id": "", "node_ip": "", "actor": ""}
        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            where = {"node_id": ctx.get_node_id(), "node_ip": _RAY.util.get_node_ip_address(),
                     "actor": ctx.get_actor_id() or ""}
        self._timeout = timeout
        self._column = code_column
        self._loop = _LoopThread()
        self._worker = SnippetWorker(policy, sandboxes=sandboxes, preload=pre, python=python,
                                     fresh_every=fresh_sandbox_every, where=where)
        try:
            self._loop.call(self._worker.start())
        except BaseException:
            self._loop.stop()  # start() closed what it made
            raise

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import asyncio

        codes = [str(c) for c in batch[self._column]]

        async def run_all() -> list[SnippetResult]:
            return list(await asyncio.gather(*(self._worker.run(c, self._timeout) for c in codes)))

        results: list[SnippetResult] = self._loop.call(run_all())
        out: dict[str, Any] = {k: list(v) for k, v in batch.items()}
        out.update(
            ok=[r.ok for r in results], exit_status=[-1 if r.exit_status is None else r.exit_status for r in results],
            stdout=[r.stdout for r in results], stderr=[r.stderr for r in results],
            result=[r.result or "" for r in results],
            error=[f"{r.error.name}: {r.error.value}" if r.error else "" for r in results],
            failure=[r.failure or "" for r in results], timed_out=[r.timed_out for r in results],
            duration_s=[r.duration_s for r in results], node_ip=[r.node_ip for r in results])
        return out

    def close(self) -> None:
        """Close the sandboxes and the loop thread (also when collected)."""
        loop = getattr(self, "_loop", None)  # None: __init__ failed before it
        if loop is not None and loop.alive:
            try:
                self._loop.call(self._worker.aclose())
            finally:
                self._loop.stop()

    def __del__(self) -> None:
        self.close()


class _LoopThread:
    """An asyncio loop in a daemon thread of its own (the batch runner's sandboxes live on it)."""

    def __init__(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zviz-ray-batch", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._loop.is_closed()

    def call(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
