"""`zviz mcp`: a Model Context Protocol server whose tools run in zviz sandboxes.

One sandbox (and one persistent Python) per client session, opened on the
first tool call and closed when the session ends (stdio: the client closes
the pipe; HTTP: DELETE, or the session is gone), when it idles out
(`--idle-timeout`: no tool call for that long; the next call opens a fresh
one and says so), or on `reset`. Over HTTP, `--max-sessions` caps the
sessions (a new one is refused with a message naming the cap).

A client's cancellation (`notifications/cancelled`) cancels the handler's
task; the code context then interrupts the cell (KeyboardInterrupt, the
variables kept) and the next call waits only for that cell's end.

Errors are tool results with `isError` and zviz's own message. Over HTTP,
sessions are those of the handshake era (`initialize`): the server answers
the stateless era's `server/discover` with "method not found", so that
clients fall back to a session of their own (a code interpreter's state
needs one). Over stdio the process serves one client, in either era.

The `mcp` package is imported here only (zviz's CLI imports this module
lazily, for `zviz mcp` alone).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from ._errors import PolicyError
from ._policy import Policy
from ._tools import (
    SessionConfig,
    ToolSession,
    error_text,
    execution_data,
    execution_text,
    images_of,
    listing_text,
    run_data,
    run_text,
)
from ._version import __version__

SESSION_HEADER = "mcp-session-id"

_TIMEOUT = {"type": "number", "exclusiveMinimum": 0, "description": "seconds (default: the policy's limits.wall_s)"}
_ENCODING = {"type": "string", "enum": ["text", "base64"], "default": "text",
             "description": "text (UTF-8) or base64 (any bytes)"}
TOOLS: tuple[types.Tool, ...] = (
    types.Tool(name="run_python", description=(
        "Run Python code in a persistent interpreter inside a sandbox: variables, imports and the working "
        "directory (/workspace) persist between calls. Returns stdout, stderr, the repr of the last "
        "expression and the error, if any; matplotlib figures and displayed images come back as images."),
        input_schema={"type": "object", "properties": {"code": {"type": "string"}, "timeout": _TIMEOUT},
                      "required": ["code"]}),
    types.Tool(name="run_command", description=(
        "Run a command in the sandbox: a string runs with /bin/sh -c, a list of strings is the argv. "
        "Returns the exit status, stdout and stderr."),
        input_schema={"type": "object", "properties": {
            "command": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
            "timeout": _TIMEOUT,
            "cwd": {"type": "string", "description": "working directory inside the sandbox (default /workspace)"}},
            "required": ["command"]}),
    types.Tool(name="write_file", description="Write a file in the sandbox (relative paths start at /workspace).",
               input_schema={"type": "object", "properties": {"path": {"type": "string"},
                                                              "content": {"type": "string"},
                                                              "encoding": _ENCODING},
                             "required": ["path", "content"]}),
    types.Tool(name="read_file", description="Read a file of the sandbox, as UTF-8 text or base64.",
               input_schema={"type": "object", "properties": {"path": {"type": "string"}, "encoding": _ENCODING},
                             "required": ["path"]}),
    types.Tool(name="list_files", description="List a directory of the sandbox (default /workspace).",
               input_schema={"type": "object", "properties": {"path": {"type": "string", "default": "."}}}),
    types.Tool(name="reset", description=("Close this session's sandbox and start afresh: every file, "
                                          "process and variable is gone."),
               input_schema={"type": "object", "properties": {}}),
)


class SessionRefused(Exception):
    """A tool call that has no session to run in (said to the client)."""


class Sessions:
    """The server's sessions: their sandboxes, the idle reaper, the cap."""

    def __init__(self, config: SessionConfig, *, idle_timeout: float | None, max_sessions: int | None) -> None:
        self.config = config
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.by_id: dict[str, ToolSession] = {}
        self.http_busy: dict[str, int] = {}  # HTTP requests in flight per session (a GET stream counts)
        self.http_seen: dict[str, float] = {}
        self.opening = 0  # new-session requests being answered
        self.stdio: ToolSession | None = None

    def full(self) -> bool:
        return self.max_sessions is not None and len(self.by_id) + self.opening >= self.max_sessions

    def refusal(self) -> str:
        return (f"zviz mcp: {len(self.by_id)} sessions are open, the most this server allows (--max-sessions "
                f"{self.max_sessions}). Close one (the client's DELETE) or wait for one to idle out"
                + (f" (--idle-timeout {self.idle_timeout:g} s)." if self.idle_timeout else "."))

    def lookup(self, session_id: str | None) -> ToolSession:
        if session_id is None:  # stdio: the process serves one client
            if self.stdio is None:
                self.stdio = ToolSession(self.config)
            return self.stdio
        sess = self.by_id.get(session_id)
        if sess is None:
            raise SessionRefused("this MCP session is unknown to zviz (it ended or idled out): start a new session")
        return sess

    async def end(self, session_id: str) -> None:
        sess = self.by_id.pop(session_id, None)
        self.http_busy.pop(session_id, None)
        self.http_seen.pop(session_id, None)
        if sess is not None:
            await sess.aclose()

    async def reap(self) -> None:
        """Every second: close the sandboxes of sessions idle for `idle_timeout`
        (no tool call), and forget HTTP sessions nobody used for as long."""
        if self.idle_timeout is None:
            return
        while True:
            await anyio.sleep(min(1.0, self.idle_timeout / 4))
            now = time.monotonic()
            for sess in [*self.by_id.values(), *([self.stdio] if self.stdio else [])]:
                if sess.sandbox_open and sess.busy == 0 and now - sess.last_used > self.idle_timeout:
                    await sess.close_sandbox(f"the previous sandbox was closed after {self.idle_timeout:g} s "
                                             "without a tool call (--idle-timeout): this is a fresh one")
            for sid in list(self.by_id):
                if self.http_busy.get(sid, 0) == 0 and now - self.http_seen.get(sid, now) > self.idle_timeout:
                    await self.end(sid)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for sid in list(self.by_id):
                await self.end(sid)
            if self.stdio is not None:
                await self.stdio.aclose()


# ---- tool calls


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[_text(text)], is_error=True)


def _args(arguments: dict[str, Any] | None, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    args = dict(arguments or {})
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; this tool takes {', '.join(allowed) or 'none'}")
    missing = [a for a in required if a not in args]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    return args


async def call_tool(sess: ToolSession, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
    """One tool call on a session: its result, or its failure as a tool error."""
    sess.busy += 1
    try:
        result = await _dispatch(sess, name, arguments)
    except Exception as e:  # noqa: BLE001 (said to the client; a cancellation is not an Exception)
        return _error(error_text(e))
    finally:
        sess.busy -= 1
        sess.last_used = time.monotonic()
    note = sess.take_note()
    if note:
        result.content.insert(0, _text(f"({note})"))
    return result


async def _dispatch(sess: ToolSession, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
    content: list[types.ContentBlock] = []
    if name == "run_python":
        a = _args(arguments, ("code", "timeout"), ("code",))
        ex = await sess.run_python(a["code"], a.get("timeout"))
        content.append(_text(execution_text(ex)))
        content += [types.ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=mime)
                    for mime, data in images_of(ex)]
        return types.CallToolResult(content=content, structured_content=execution_data(ex), is_error=not ex.ok)
    if name == "run_command":
        a = _args(arguments, ("command", "timeout", "cwd"), ("command",))
        r = await sess.run_command(a["command"], a.get("timeout"), a.get("cwd"))
        return types.CallToolResult(content=[_text(run_text(r))], structured_content=run_data(r))
    if name == "write_file":
        a = _args(arguments, ("path", "content", "encoding"), ("path", "content"))
        n = await sess.write_file(a["path"], a["content"], a.get("encoding", "text"))
        return types.CallToolResult(content=[_text(f"wrote {n} bytes to {a['path']}")])
    if name == "read_file":
        a = _args(arguments, ("path", "encoding"), ("path",))
        return types.CallToolResult(content=[_text(await sess.read_file(a["path"], a.get("encoding", "text")))])
    if name == "list_files":
        a = _args(arguments, ("path",))
        return types.CallToolResult(content=[_text(listing_text(await sess.list_files(a.get("path", "."))))])
    if name == "reset":
        _args(arguments, ())
        await sess.reset()
        return types.CallToolResult(content=[_text("the sandbox was closed; the next call starts a fresh one")])
    raise ValueError(f"no tool named {name!r} (tools: {', '.join(t.name for t in TOOLS)})")


def build_server(sessions: Sessions, *, http: bool = False) -> Server[Any]:
    async def list_tools(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
                         ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(TOOLS))

    async def on_call(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        request = ctx.request
        headers = getattr(request, "headers", None)
        sid = headers.get(SESSION_HEADER) if headers is not None else None
        if headers is not None and sid is None:
            return _error("zviz mcp over HTTP keeps a sandbox per session: connect with the initialize handshake "
                          "(a session id), not the stateless protocol")
        try:
            sess = sessions.lookup(sid)
        except SessionRefused as e:
            return _error(str(e))
        return await call_tool(sess, params.name, params.arguments)

    async def no_discover(ctx: ServerRequestContext[Any], params: types.RequestParams) -> types.DiscoverResult:
        raise MCPError(types.METHOD_NOT_FOUND, "zviz mcp keeps a sandbox per session: use the initialize handshake")

    server: Server[Any] = Server("zviz", version=__version__,
                                 instructions=("Tools that run Python and commands in a zviz sandbox (a light "
                                               "Linux sandbox): one per session, files under /workspace."),
                                 on_list_tools=list_tools, on_call_tool=on_call)
    if http:  # (over stdio the process is the session, in either era; there a refused probe fails the client)
        server.add_request_handler("server/discover", types.RequestParams, no_discover)
    return server


# ---- transports


async def serve_stdio(sessions: Sessions) -> None:
    """Serve one client on stdin/stdout until it closes them."""
    from mcp.server.stdio import stdio_server

    server = build_server(sessions)
    try:
        async with stdio_server() as (read, write), anyio.create_task_group() as tg:
            tg.start_soon(sessions.reap)
            tg.start_soon(_stop_on_signals, sessions)
            await server.run(read, write, server.create_initialization_options())
            tg.cancel_scope.cancel()
    finally:
        await sessions.aclose()


async def _stop_on_signals(sessions: Sessions) -> None:
    """SIGTERM/SIGHUP (a client that kills its server rather than closing the
    pipe): close the sandboxes, then exit. (Cancelling the server is not
    enough: the SDK reads stdin in a worker thread that a cancellation does
    not interrupt.)"""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            await sessions.aclose()
            sys.stdout.flush()
            os._exit(0)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def http_app(sessions: Sessions, host: str) -> ASGIApp:
    """The streamable-HTTP app (at /mcp), wrapped to see sessions open and end."""
    server = build_server(sessions, http=True)
    inner: ASGIApp = server.streamable_http_app(
        host=host, max_sessions=None,
        # the SDK forgets a session nobody used for this long; we close its sandbox then too
        session_idle_timeout=sessions.idle_timeout if sessions.idle_timeout else None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        sid = next((v.decode("latin-1") for k, v in scope["headers"] if k == SESSION_HEADER.encode()), None)
        if sid is None:
            if scope["method"] != "POST":
                await inner(scope, receive, send)
                return
            if sessions.full():
                await _json_error(send, 503, sessions.refusal())
                return
            sessions.opening += 1
            opened: list[str] = []

            async def watch(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start" and message["status"] < 400:
                    opened.extend(v.decode("latin-1") for k, v in message.get("headers", ())
                                  if k.lower() == SESSION_HEADER.encode())
                    for new in opened:
                        if new not in sessions.by_id:
                            sessions.by_id[new] = ToolSession(sessions.config)
                            sessions.http_seen[new] = time.monotonic()
                await send(message)

            try:
                await inner(scope, receive, watch)
            finally:
                sessions.opening -= 1
            return
        if sid not in sessions.by_id:  # ended, idled out or made up: the SDK answers it, and nothing is kept for
            await inner(scope, receive, send)  # it (anyone who reaches the port may send any id, any number)
            return
        sessions.http_busy[sid] = sessions.http_busy.get(sid, 0) + 1
        try:
            await inner(scope, receive, send)
        finally:
            if sid in sessions.http_busy:
                sessions.http_busy[sid] -= 1
                sessions.http_seen[sid] = time.monotonic()
            if scope["method"] == "DELETE":  # the client ended its session
                await sessions.end(sid)

    return app


async def _json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": types.INTERNAL_ERROR, "message": message}})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})


async def serve_http(sessions: Sessions, host: str, port: int) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp until SIGINT/SIGTERM (asyncio: uvicorn)."""
    import uvicorn

    config = uvicorn.Config(http_app(sessions, host), host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sessions.reap)
            await server.serve()
            tg.cancel_scope.cancel()
    finally:
        await sessions.aclose()


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http takes HOST:PORT (e.g. 127.0.0.1:8765), not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def policy_of(path: str | None, preset: str | None, read_only: Sequence[str]) -> Policy:
    """--policy FILE (TOML, or an OCI seccomp profile) | --preset NAME (default shell), plus --ro paths."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PolicyError("--policy", path, f"a readable file ({e.strerror})") from None
        if path.endswith(".json") or text.lstrip().startswith("{"):
            from ._oci import policy_from_oci

            policy = policy_from_oci(text, base=Policy.shell())
        else:
            policy = Policy.from_toml(text)
    else:
        policy = Policy.preset(preset or "shell")
    if read_only:
        policy = policy.with_paths(read_only=[os.path.abspath(p) for p in read_only])
    return policy


def cli(path: str | None, preset: str | None, read_only: Sequence[str], python: str, *, http: str | None,
        idle_timeout: float | None, max_sessions: int | None) -> int:
    """`zviz mcp` (its arguments as the CLI parsed them); a bad one is the CLI's usage error."""
    from ._cli import UsageError

    try:
        return _serve(path, preset, read_only, python, http=http, idle_timeout=idle_timeout, max_sessions=max_sessions)
    except ValueError as e:
        if isinstance(e, PolicyError):
            raise
        raise UsageError(str(e)) from None


def _serve(path: str | None, preset: str | None, read_only: Sequence[str], python: str, *, http: str | None,
           idle_timeout: float | None, max_sessions: int | None) -> int:
    config = SessionConfig(policy=policy_of(path, preset, read_only), python=python)
    if idle_timeout is not None and not (idle_timeout > 0 and math.isfinite(idle_timeout)):
        raise ValueError(f"--idle-timeout must be a positive number of seconds, not {idle_timeout!r}")
    if max_sessions is not None and max_sessions < 1:
        raise ValueError(f"--max-sessions must be at least 1, not {max_sessions}")
    sessions = Sessions(config, idle_timeout=idle_timeout, max_sessions=max_sessions)
    if http is None:
        anyio.run(serve_stdio, sessions, backend="trio")
        return 0
    host, port = parse_hostport(http)
    print(f"zviz mcp: serving http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve_http, sessions, host, port, backend="asyncio")
    return 0
