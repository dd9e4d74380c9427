"""The agent tools every integration offers (MCP, pydantic-ai, smolagents,
deep agents), over one sandbox: a session that opens the sandbox and its
code context on first use, and the tools' results as plain data.

`ToolSession` is the I/O shell (a sandbox, a code context); the rest is pure:
argument checks and the text an agent reads back. Each front-end (zviz._mcp,
zviz.integrations.*) maps these onto its framework's tool and error types.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Sequence
from typing import Any

import anyio
import attrs

from ._context import CodeContext
from ._execution import Execution
from ._files import FileInfo
from ._policy import Policy
from ._records import RunResult
from ._sandbox import Sandbox

MAX_TEXT = 100_000  # characters of one stream shown to the agent (the rest is counted, not shown)
MAX_LIST = 10_000  # entries of one list_files (a listing is read by a model)


@attrs.frozen(kw_only=True)
class SessionConfig:
    """What each session's sandbox is made of."""

    policy: Policy = attrs.field(factory=Policy.shell)
    python: str = "python3"  # the interpreter of run_python, inside the sandbox
    preload: tuple[str, ...] = ()


class ToolSession:
    """One agent's sandbox and persistent Python, opened on first use.

    Calls from several tasks are fine (the code context takes turns);
    `reset()` and `aclose()` close the sandbox (every process of it), and
    the next call opens a fresh one."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self._sb: Sandbox | None = None
        self._ctx: CodeContext | None = None
        self._lock = anyio.Lock()
        self.busy = 0  # tool calls in flight
        self.last_used = time.monotonic()
        self.note: str | None = None  # said once, with the next result (the sandbox was closed meanwhile)
        self.closed = False

    @property
    def sandbox_open(self) -> bool:
        return self._sb is not None

    async def sandbox(self) -> Sandbox:
        async with self._lock:
            if self.closed:
                raise RuntimeError("this session is closed")
            if self._sb is None:
                self._sb = await Sandbox.create(self.config.policy)
            return self._sb

    async def context(self) -> CodeContext:
        sb = await self.sandbox()
        async with self._lock:
            if self._ctx is None or self._ctx.closed:
                self._ctx = await sb.create_code_context(preload=self.config.preload, python=self.config.python)
            elif self._ctx.broken is not None:  # the code in it broke the protocol: a fresh process, and say so
                reason = self._ctx.broken
                await self._ctx.restart()
                self.note = f"the Python process was restarted ({reason[:200]}): every variable was lost"
            return self._ctx

    async def close_sandbox(self, note: str | None = None) -> bool:
        """Close the sandbox (if open); `note` is told to the next call. True if one was open."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                sb, self._sb, self._ctx = self._sb, None, None
                if sb is None:
                    return False
                self.note = note
                await sb.aclose()
        return True

    async def reset(self) -> None:
        await self.close_sandbox()

    async def aclose(self) -> None:
        self.closed = True
        await self.close_sandbox()

    def take_note(self) -> str | None:
        note, self.note = self.note, None
        return note

    # ---- the tools (results as data; zviz's errors raise)

    def bounded_timeout(self, timeout: object) -> float | None:
        """The agent's `timeout`, never past the policy's `limits.wall_s`: the
        agent is not the policy's author (an MCP client, an LLM), so it may ask
        for less wall-clock time than the configuration allows, not more (None:
        the policy's own)."""
        t = check_timeout(timeout)
        wall = self.config.policy.limits.wall_s
        if t is None or wall is None:
            return t
        return min(t, wall)

    async def run_python(self, code: str, timeout: float | None = None) -> Execution:
        check_code(code)
        t = self.bounded_timeout(timeout)
        ctx = await self.context()
        return await ctx.run(code, timeout=t)

    async def run_command(self, command: str | Sequence[str], timeout: float | None = None,
                          cwd: str | None = None) -> RunResult:
        argv, shell = command_of(command)
        t = self.bounded_timeout(timeout)
        sb = await self.sandbox()
        return await sb.run(argv, shell=shell, timeout=t, cwd=cwd or None)

    async def write_file(self, path: str, content: str, encoding: str = "text") -> int:
        data = decode_content(content, encoding)
        sb = await self.sandbox()
        await sb.files.write(check_path(path), data)
        return len(data)

    async def read_file(self, path: str, encoding: str = "text", max_bytes: int = 10 * 1024**2) -> str:
        sb = await self.sandbox()
        data = await sb.files.read(check_path(path), max_bytes=max_bytes)
        return encode_content(data, encoding, path)

    async def list_files(self, path: str = ".", max_entries: int = MAX_LIST) -> list[FileInfo]:
        sb = await self.sandbox()
        return await sb.files.list(check_path(path), max_entries=max_entries)


# ---- argument checks (bad arguments: TypeError/ValueError, said to the agent)


def check_code(code: object) -> str:
    if not isinstance(code, str):
        raise TypeError(f"code must be a string of Python, not {type(code).__name__}")
    return code


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or math.isnan(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string (relative paths start at /workspace), not {path!r}")
    return path


def command_of(command: object) -> tuple[str | list[str], bool]:
    """(argv, shell): a string runs with /bin/sh -c, a list is the argv itself."""
    if isinstance(command, str):
        if not command.strip():
            raise ValueError("command is empty")
        return command, True
    if isinstance(command, Sequence) and command and all(isinstance(a, str) for a in command):
        return list(command), False
    raise ValueError(f"command must be a shell string or a non-empty list of strings (an argv), not {command!r}")


def decode_content(content: object, encoding: str) -> bytes:
    if not isinstance(content, str):
        raise TypeError(f"content must be a string, not {type(content).__name__}")
    if encoding == "text":
        return content.encode()
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except binascii.Error as e:
            raise ValueError(f"content is not valid base64 ({e})") from None
    raise ValueError(f"encoding must be 'text' or 'base64', not {encoding!r}")


def encode_content(data: bytes, encoding: str, path: str) -> str:
    if encoding == "base64":
        return base64.b64encode(data).decode()
    if encoding != "text":
        raise ValueError(f"encoding must be 'text' or 'base64', not {encoding!r}")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text ({len(data)} bytes): read it with encoding='base64'") from None


# ---- what the agent reads back


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    return text[:MAX_TEXT] + f"\n[... {len(text) - MAX_TEXT} more characters not shown]"


def execution_text(ex: Execution) -> str:
    """A cell's outcome as the text an agent reads: output, result, error."""
    parts: list[str] = []
    if ex.stdout:
        parts.append("stdout:\n" + _cut(ex.stdout))
    if ex.stderr:
        parts.append("stderr:\n" + _cut(ex.stderr))
    if ex.result is not None:
        parts.append("result: " + _cut(ex.result))
    if ex.error is not None:
        tb = "".join(ex.error.traceback)
        parts.append(f"error: {ex.error.name}: {ex.error.value}" + (f"\n{_cut(tb)}" if tb else ""))
    if ex.interrupted:
        parts.append("(the cell was interrupted: its timeout or a cancellation; variables are kept)")
    if ex.restarted:
        parts.append("(the Python process was restarted: every variable was lost)")
    if ex.output_dropped:
        parts.append(f"({ex.output_dropped} bytes of output over the cap were dropped)")
    images = sum(1 for d in ex.display if any(k.startswith("image/") for k in d))
    if images:
        parts.append(f"({images} image(s) attached)")
    return "\n".join(parts) if parts else "(no output)"


def execution_data(ex: Execution) -> dict[str, Any]:
    return {"stdout": ex.stdout, "stderr": ex.stderr, "result": ex.result,
            "error": None if ex.error is None else {"name": ex.error.name, "value": ex.error.value,
                                                    "traceback": "".join(ex.error.traceback)},
            "interrupted": ex.interrupted, "restarted": ex.restarted}


def images_of(ex: Execution) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of every image the cell displayed (figures included)."""
    out: list[tuple[str, bytes]] = []
    for bundle in ex.display:
        for mime in ("image/png", "image/jpeg"):
            data = bundle.get(mime)
            if isinstance(data, bytes):
                out.append((mime, data))
                break
    return out


def run_text(r: RunResult) -> str:
    head = "timed out" if r.timed_out else f"exit status {r.status}"
    parts = [head]
    if r.stdout:
        parts.append("stdout:\n" + _cut(r.stdout.decode(errors="replace")))
    if r.stderr:
        parts.append("stderr:\n" + _cut(r.stderr.decode(errors="replace")))
    if r.truncated:
        parts.append("(output over the policy's limit was cut)")
    return "\n".join(parts)


def run_data(r: RunResult) -> dict[str, Any]:
    return {"exit_code": r.exit_code, "status": r.status, "timed_out": r.timed_out,
            "stdout": r.stdout.decode(errors="replace"), "stderr": r.stderr.decode(errors="replace")}


def listing_text(entries: Sequence[FileInfo]) -> str:
    if not entries:
        return "(empty)"
    return "\n".join(f"{e.type:<7} {e.size:>10}  {e.name}" for e in entries)


def error_text(e: BaseException) -> str:
    """A failure as the agent reads it: the exception's type and zviz's message."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{type(e).__name__}: {e.strerror}: {e.filename}"
    return f"{type(e).__name__}: {e}"
