"""The synchronous facade, for code that is not async (smolagents' executors,
scripts, notebooks' plain cells):

    with zviz.sync.open_sandbox(zviz.Policy.python()) as sb:
        r = sb.run(["python3", "-c", "print(1 + 1)"])

Same methods as `zviz.Sandbox`, blocking. Each sandbox runs the async core on
a private event-loop thread of its own (anyio's blocking portal, on trio), so
it works from any thread, from several threads at once, and from a worker
thread of a running asyncio or trio program (never from the event-loop thread
of a running loop itself: that would block the loop; use the async API there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.from_thread

from ._args import OutputCallback
from ._errors import SandboxClosedError
from ._files import DEFAULT_MAX_LIST, DEFAULT_MAX_READ, FileInfo, Files as _AsyncFiles
from ._policy import Network, Policy
from ._process import Process as _AsyncProcess
from ._proxy import FdReceiveStream, FdSendStream
from ._records import RunResult, SandboxStatistics
from ._sandbox import Sandbox as _AsyncSandbox, _create
from ._snapshot import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, SnapshotInfo
from ._supervisor import DenialEvent

if TYPE_CHECKING:
    from ._egress import EgressEvent

__all__ = ["Files", "Process", "ReceiveStream", "Sandbox", "SendStream", "open_sandbox", "run_snippet"]

T = TypeVar("T")


class _Portal:
    """A private event-loop thread (trio) and calls into it."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal(backend="trio"))
        self.stopped = False

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if self.stopped:  # (anyio's own error: "This portal is not running")
            raise SandboxClosedError("this sandbox is closed (close() was called, or its `with` block ended): "
                                     "open a new one")
        return self.portal.call(functools.partial(fn, *args, **kw))

    def stop(self) -> None:
        self.stopped = True
        self._stack.close()


def _finalize(portal: _Portal, sb: _AsyncSandbox) -> None:
    """weakref.finalize of a sync Sandbox never closed: close it (the async
    core warns), then stop the loop thread (else the interpreter would wait
    for it at exit)."""
    with contextlib.suppress(Exception):
        if not sb.closed:
            import warnings

            warnings.warn(f"unclosed sync {sb!r}: use `with zviz.sync.open_sandbox(...)` or close()",
                          ResourceWarning, stacklevel=1)
        portal.call(sb.aclose)
    portal.stop()


class Sandbox:
    """A sandbox with blocking methods. Made by `Sandbox.create` or
    `open_sandbox`; no public constructor."""

    def __init__(self, portal: _Portal, sb: _AsyncSandbox) -> None:
        self._portal = portal
        self._sb = sb
        self.files = Files(portal, sb.files)
        self._finalizer = weakref.finalize(self, _finalize, portal, sb)

    @classmethod
    def create(cls, policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
               keep_workdir: bool = False, monitor: bool | object = False,
               template: str | os.PathLike[str] | None = None) -> Sandbox:
        """Open a sandbox (arguments of `zviz.open_sandbox`); `close()` it."""
        portal = _Portal()
        try:
            # (no pool: this loop ends with the sandbox, a pre-started one would be wasted)
            sb = portal.call(_create, policy, workdir=workdir, keep_workdir=keep_workdir, monitor=monitor,
                             template=template, use_pool=False)
        except BaseException:
            portal.stop()
            raise
        return cls(portal, sb)

    @property
    def policy(self) -> Policy:
        return self._sb.policy

    @property
    def workdir(self) -> str:
        return self._sb.workdir

    @property
    def closed(self) -> bool:
        return self._sb.closed

    def __repr__(self) -> str:
        return "<zviz.sync" + repr(self._sb)[len("<zviz"):]

    def close(self) -> None:
        """Close the sandbox (`Sandbox.aclose`) and stop its loop thread. Idempotent."""
        self._finalizer.detach()
        if self._portal.stopped:
            return
        try:
            self._portal.call(self._sb.aclose)
        finally:
            self._portal.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, argv: Sequence[str] | str, *, stdin: bytes | None = b"", timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None, shell: bool = False,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        """`zviz.Sandbox.run`, blocking. Callbacks run on the sandbox's loop thread."""
        result: RunResult = self._call(self._sb.run, argv, stdin=stdin, timeout=timeout, env=env, cwd=cwd,
                                       shell=shell, on_stdout=on_stdout, on_stderr=on_stderr)
        return result

    def start(self, argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
              shell: bool = False, stdin: bool = True, stdout: bool = True, stderr: bool = True,
              timeout: float | None = None) -> Process:
        """`zviz.Sandbox.start`, blocking; the Process's methods block too."""
        proc: _AsyncProcess = self._call(self._sb.start, argv, env=env, cwd=cwd, shell=shell, stdin=stdin,
                                         stdout=stdout, stderr=stderr, timeout=timeout)
        return Process(self._portal, proc)

    def snapshot(self, path: str | os.PathLike[str], *, max_files: int = DEFAULT_MAX_FILES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> SnapshotInfo:
        """`zviz.Sandbox.snapshot`, blocking."""
        result: SnapshotInfo = self._call(self._sb.snapshot, path, max_files=max_files, max_bytes=max_bytes)
        return result

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """`files.write(path, data, mode=mode)`."""
        self.files.write(path, data, mode=mode)

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        """`files.read(path, max_bytes=max_bytes)`."""
        return self.files.read(path, max_bytes=max_bytes)

    def statistics(self) -> SandboxStatistics:
        """`zviz.Sandbox.statistics` (also once closed: the figures of its whole life)."""
        if self._portal.stopped:  # (its loop thread is gone: nothing changes the figures any more)
            return self._sb.statistics()
        result: SandboxStatistics = self._portal.call(_sync, self._sb.statistics)
        return result

    def events_so_far(self) -> tuple[DenialEvent | EgressEvent, ...]:
        """`zviz.Sandbox.events_so_far` (also once closed; with net.mode = "domains", EgressEvents too)."""
        if self._portal.stopped:
            return self._sb.events_so_far()
        result: tuple[DenialEvent | EgressEvent, ...] = self._portal.call(_sync, self._sb.events_so_far)
        return result

    def set_network(self, network: Network) -> None:
        """`Sandbox.set_network`: new rules within the sandbox's network mode."""
        self._call(self._sb.set_network, network)

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self._portal.call(fn, *args, **kw)


async def _sync(fn: Callable[[], T]) -> T:
    """A plain function of the sandbox, run on its loop thread (its state is that thread's)."""
    return fn()


_snippets_portal: _Portal | None = None
_snippets_lock = threading.Lock()


def run_snippet(code: str, policy: Policy | None = None, *, python: str = "python3", stdin: bytes = b"",
                timeout: float | None = None, env: Mapping[str, str] | None = None,
                warm: bool | None = None) -> RunResult:
    """`zviz.run_snippet`, blocking: `python -c code` in a fresh sandbox of its
    own, forked from a warm interpreter where the policy allows. The calls of
    every thread share one private event-loop thread (made on first use)."""
    from ._warm import run_snippet as _run_snippet

    global _snippets_portal  # noqa: PLW0603 - one loop thread per process, like the warm interpreters
    with _snippets_lock:
        if _snippets_portal is None:
            _snippets_portal = _Portal()
            # stopped before the interpreter joins its threads at exit (atexit would be too late:
            # the loop's thread never ends on its own), as concurrent.futures stops its workers
            threading._register_atexit(_stop_snippets_portal)  # type: ignore[attr-defined]
        portal = _snippets_portal
    result: RunResult = portal.call(_run_snippet, code, policy, python=python, stdin=stdin, timeout=timeout,
                                    env=env, warm=warm)
    return result


def _stop_snippets_portal() -> None:
    global _snippets_portal
    with _snippets_lock:
        portal, _snippets_portal = _snippets_portal, None
    if portal is not None:
        portal.stop()


@contextlib.contextmanager
def open_sandbox(policy: Policy | None = None, *, workdir: str | os.PathLike[str] | None = None,
                 keep_workdir: bool = False, monitor: bool | object = False,
                 template: str | os.PathLike[str] | None = None) -> Iterator[Sandbox]:
    """`with zviz.sync.open_sandbox(policy) as sb: sb.run([...])` (arguments
    of `zviz.open_sandbox`). Leaving the block closes it."""
    sb = Sandbox.create(policy, workdir=workdir, keep_workdir=keep_workdir, monitor=monitor, template=template)
    try:
        yield sb
    finally:
        sb.close()


class Files:
    """`zviz.Sandbox.files`, blocking."""

    def __init__(self, portal: _Portal, files: _AsyncFiles) -> None:
        self._portal = portal
        self._files = files

    def read(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        result: bytes = self._portal.call(self._files.read, path, max_bytes=max_bytes)
        return result

    def read_text(self, path: str, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_MAX_READ) -> str:
        result: str = self._portal.call(self._files.read_text, path, encoding=encoding, max_bytes=max_bytes)
        return result

    def write(self, path: str, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644,
              encoding: str = "utf-8", parents: bool = True) -> None:
        self._portal.call(self._files.write, path, data, mode=mode, encoding=encoding, parents=parents)

    def list(self, path: str = ".", *, max_entries: int = DEFAULT_MAX_LIST) -> list[FileInfo]:
        result: list[FileInfo] = self._portal.call(self._files.list, path, max_entries=max_entries)
        return result

    def stat(self, path: str, *, follow_symlinks: bool = True) -> FileInfo:
        result: FileInfo = self._portal.call(self._files.stat, path, follow_symlinks=follow_symlinks)
        return result

    def exists(self, path: str) -> bool:
        result: bool = self._portal.call(self._files.exists, path)
        return result

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._portal.call(self._files.remove, path, recursive=recursive)

    def mkdir(self, path: str, *, parents: bool = False, exist_ok: bool = False, mode: int = 0o755) -> None:
        self._portal.call(self._files.mkdir, path, parents=parents, exist_ok=exist_ok, mode=mode)

    def rename(self, src: str, dst: str) -> None:
        self._portal.call(self._files.rename, src, dst)


class SendStream:
    """A process's stdin, blocking."""

    def __init__(self, portal: _Portal, stream: FdSendStream) -> None:
        self._portal = portal
        self._stream = stream

    def send_all(self, data: bytes) -> None:
        self._portal.call(self._stream.send_all, data)

    def close(self) -> None:
        self._portal.call(self._stream.aclose)


class ReceiveStream:
    """A process's stdout or stderr, blocking."""

    def __init__(self, portal: _Portal, stream: FdReceiveStream) -> None:
        self._portal = portal
        self._stream = stream

    def receive_some(self, max_bytes: int | None = None) -> bytes:
        """At most `max_bytes`; b"" at EOF."""
        result: bytes = self._portal.call(self._stream.receive_some, max_bytes)
        return result

    def read(self) -> bytes:
        """Everything until EOF."""
        chunks = []
        while chunk := self.receive_some():
            chunks.append(chunk)
        return b"".join(chunks)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.receive_some():
            yield chunk

    def close(self) -> None:
        self._portal.call(self._stream.aclose)


class Process:
    """`zviz.Process`, blocking. A context manager: leaving kills and reaps it."""

    def __init__(self, portal: _Portal, proc: _AsyncProcess) -> None:
        self._portal = portal
        self._proc = proc
        self.stdin = SendStream(portal, proc.stdin) if proc.stdin is not None else None
        self.stdout = ReceiveStream(portal, proc.stdout) if proc.stdout is not None else None
        self.stderr = ReceiveStream(portal, proc.stderr) if proc.stderr is not None else None

    def __repr__(self) -> str:
        return "<zviz.sync" + repr(self._proc)[len("<zviz"):]

    @property
    def argv(self) -> tuple[str, ...]:
        return self._proc.argv

    @property
    def returncode(self) -> int | None:
        result: int | None = self._portal.call(_sync, lambda: self._proc.returncode)
        return result

    @property
    def pid_in_sandbox(self) -> int | None:
        result: int | None = self._portal.call(_sync, lambda: self._proc.pid_in_sandbox)
        return result

    @property
    def timed_out(self) -> bool:
        return self._proc.timed_out

    def wait(self) -> int:
        result: int = self._portal.call(self._proc.wait)
        return result

    def send_signal(self, sig: int) -> None:
        self._portal.call(_sync, lambda: self._proc.send_signal(sig))

    def terminate(self) -> None:
        self._portal.call(_sync, self._proc.terminate)

    def kill(self) -> None:
        self._portal.call(_sync, self._proc.kill)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self._portal.call(self._proc.__aexit__, None, None, None)
