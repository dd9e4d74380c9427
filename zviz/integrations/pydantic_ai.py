"""pydantic-ai: a toolset that gives an agent a sandbox.

    from zviz.integrations.pydantic_ai import ZvizToolset
    agent = Agent(model, toolsets=[ZvizToolset(zviz.Policy.python())])

Tools: `run_python` (a persistent interpreter: variables persist between
calls), `run_command`, `write_file`, `read_file`, `list_files`. The sandbox
opens on the first tool call and closes when the agent run ends (the agent
enters and exits its toolsets around each run): each run has a sandbox of
its own. zviz's errors reach the model as failed tool calls (`ToolFailed`)
with zviz's message; figures come back as images.
"""

from __future__ import annotations

from typing import Any

from pydantic_ai import ToolReturn
from pydantic_ai.exceptions import ToolFailed
from pydantic_ai.messages import BinaryContent
from pydantic_ai.toolsets import FunctionToolset

from .._policy import Policy
from .._tools import SessionConfig, ToolSession, error_text, execution_text, images_of, listing_text, run_text

__all__ = ["ZvizToolset"]


class ZvizToolset(FunctionToolset[Any]):
    """run_python, run_command and file tools bound to one sandbox per agent run."""

    def __init__(self, policy: Policy | None = None, *, python: str = "python3", preload: tuple[str, ...] = (),
                 id: str | None = "zviz") -> None:
        super().__init__(id=id)
        self.config = SessionConfig(policy=policy or Policy.shell(), python=python, preload=tuple(preload))
        self._session: ToolSession | None = None
        self._entered = 0
        for fn in (self.run_python, self.run_command, self.write_file, self.read_file, self.list_files):
            self.add_function(fn, name=fn.__name__)

    @property
    def session(self) -> ToolSession:
        """The current run's session (a fresh one outside a run)."""
        if self._session is None:
            self._session = ToolSession(self.config)
        return self._session

    async def __aenter__(self) -> ZvizToolset:
        self._entered += 1
        return self

    async def __aexit__(self, *args: Any) -> bool | None:
        self._entered -= 1
        if self._entered == 0 and self._session is not None:
            session, self._session = self._session, None
            await session.aclose()
        return None

    async def run_python(self, code: str, timeout: float | None = None) -> ToolReturn:
        """Run Python code in a persistent interpreter in the sandbox (variables, imports and the working
        directory /workspace persist between calls). Returns stdout, stderr, the value of the last
        expression and the error, if any; figures come back as images.

        Args:
            code: the Python source to run.
            timeout: seconds before the code is interrupted (default: the policy's).
        """
        try:
            ex = await self.session.run_python(code, timeout)
        except Exception as e:  # noqa: BLE001 (the model reads it)
            raise ToolFailed(error_text(e)) from None
        images = [BinaryContent(data=data, media_type=mime) for mime, data in images_of(ex)]
        return ToolReturn(return_value=execution_text(ex), content=images or None)

    async def run_command(self, command: str | list[str], timeout: float | None = None, cwd: str | None = None) -> str:
        """Run a command in the sandbox: a string runs with /bin/sh -c, a list of strings is the argv.

        Args:
            command: a shell command line, or an argv.
            timeout: seconds before it is killed (default: the policy's).
            cwd: the working directory inside the sandbox (default /workspace).
        """
        try:
            return run_text(await self.session.run_command(command, timeout, cwd))
        except Exception as e:  # noqa: BLE001
            raise ToolFailed(error_text(e)) from None

    async def write_file(self, path: str, content: str, encoding: str = "text") -> str:
        """Write a file in the sandbox (relative paths start at /workspace).

        Args:
            path: where.
            content: the text, or base64 with encoding="base64".
            encoding: "text" or "base64".
        """
        try:
            n = await self.session.write_file(path, content, encoding)
        except Exception as e:  # noqa: BLE001
            raise ToolFailed(error_text(e)) from None
        return f"wrote {n} bytes to {path}"

    async def read_file(self, path: str, encoding: str = "text") -> str:
        """Read a file of the sandbox.

        Args:
            path: which (relative paths start at /workspace).
            encoding: "text" (UTF-8) or "base64".
        """
        try:
            return await self.session.read_file(path, encoding)
        except Exception as e:  # noqa: BLE001
            raise ToolFailed(error_text(e)) from None

    async def list_files(self, path: str = ".") -> str:
        """List a directory of the sandbox (type, size, name per line).

        Args:
            path: which directory (default /workspace).
        """
        try:
            return listing_text(await self.session.list_files(path))
        except Exception as e:  # noqa: BLE001
            raise ToolFailed(error_text(e)) from None
