"""LangChain deep agents: a sandbox backend (deepagents' `BaseSandbox`).

    from deepagents import create_deep_agent
    from zviz.integrations.deepagents import ZvizSandbox
    backend = ZvizSandbox(zviz.Policy.shell())
    agent = create_deep_agent(model=model, backend=backend)
    ...
    backend.close()

The agent's `execute` tool runs shell commands in the sandbox (`/bin/sh -c`,
cwd `/workspace`); its file tools (ls, read_file, write_file, edit_file,
glob, grep) go through deepagents' `BaseSandbox`, which builds them on
`execute()`, `upload_files()` and `download_files()`: those three are zviz's
(`Sandbox.run`, `sb.files`). Paths are the sandbox's own: write under
`/workspace` (or `/tmp`); elsewhere is refused (`permission_denied`).

deepagents' backends are synchronous (its async methods run them in a
worker thread): the backend runs its sandbox on an event-loop thread of its
own, opened on first use. `close()` ends it (also a context manager).
"""

from __future__ import annotations

import errno
import uuid
import weakref
from typing import Any

from deepagents.backends.protocol import ExecuteResponse, FileDownloadResponse, FileUploadResponse
from deepagents.backends.sandbox import BaseSandbox

from .._policy import Policy
from .._tools import SessionConfig
from ._loop import Loop

__all__ = ["ZvizSandbox"]


def _file_error(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "file_not_found"
    if isinstance(e, PermissionError):
        return "permission_denied"
    if isinstance(e, IsADirectoryError):
        return "is_directory"
    if e.errno in (errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG):
        return "invalid_path"
    return f"{type(e).__name__}: {e}"


class ZvizSandbox(BaseSandbox):
    """A deepagents sandbox backend: one zviz sandbox, opened on first use."""

    enable_capture_offload = False

    def __init__(self, policy: Policy | None = None, *, timeout: float | None = None) -> None:
        self.policy = policy or Policy.shell()
        self.timeout = timeout  # execute()'s default (None: the policy's limits.wall_s)
        self._id = f"zviz-{uuid.uuid4().hex[:12]}"
        self._loop = Loop(SessionConfig(policy=self.policy))
        self._finalizer = weakref.finalize(self, self._loop.close)

    @property
    def id(self) -> str:
        return self._id

    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        """Run `command` with /bin/sh -c in the sandbox: stdout then stderr, the status."""
        t = self.timeout if timeout is None else (float(timeout) if timeout > 0 else float("inf"))
        try:
            r = self._loop.call(self._loop.session.run_command, command, t, None)
        except (OSError, ValueError) as e:  # a command that cannot start: the model reads why
            return ExecuteResponse(output=f"{type(e).__name__}: {e}", exit_code=127)
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        if r.timed_out:
            out += "\n[zviz: the command was killed at its timeout]"
        return ExecuteResponse(output=out, exit_code=r.status, truncated=r.truncated)

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        out = []
        for path, data in files:
            try:
                self._loop.call(self._write, path, data)
                out.append(FileUploadResponse(path=path))
            except OSError as e:
                out.append(FileUploadResponse(path=path, error=_file_error(e)))
            except ValueError as e:
                out.append(FileUploadResponse(path=path, error=f"invalid_path: {e}"))
        return out

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        out = []
        for path in paths:
            try:
                out.append(FileDownloadResponse(path=path, content=self._loop.call(self._read, path)))
            except OSError as e:
                out.append(FileDownloadResponse(path=path, error=_file_error(e)))
            except ValueError as e:
                out.append(FileDownloadResponse(path=path, error=f"invalid_path: {e}"))
        return out

    async def _write(self, path: str, data: bytes) -> None:
        sb = await self._loop.session.sandbox()
        await sb.files.write(path, data)

    async def _read(self, path: str) -> bytes:
        sb = await self._loop.session.sandbox()
        return await sb.files.read(path)

    def close(self) -> None:
        """Close the sandbox (every process of it) and its event-loop thread."""
        self._finalizer()

    def __enter__(self) -> ZvizSandbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
