"""`zviz mcp` driven by the mcp SDK's own client, over stdio and streamable
HTTP, with the client on trio and on asyncio (the server is a subprocess)."""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import anyio
import pytest

pytest.importorskip("mcp", reason="the mcp extra (pip install 'zviz[mcp]')")

from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from .conftest import HAVE_VENV, VENV, VENV_PY

pytestmark = pytest.mark.anyio

ZVIZ_MCP = [sys.executable, "-m", "zviz", "mcp"]


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


def _venv_args() -> list[str]:
    return ["--ro", str(VENV), "--python", VENV_PY] if HAVE_VENV else []


def stdio(*extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=ZVIZ_MCP[0], args=[*ZVIZ_MCP[1:], *_venv_args(), *extra],
                                 env={"TMPDIR": os.environ.get("TMPDIR", "/tmp")})


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (what the host sees)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = pathlib.Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(int(d))
    return found


async def gone(marker: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not processes_with(marker):
            return True
        await anyio.sleep(0.1)
    return False


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def start_sleeper(client: Client, seconds: str) -> None:
    """A process of the session's sandbox the host can find: `sleep <seconds>`."""
    code = f"import subprocess\np = subprocess.Popen(['sleep', '{seconds}'])"
    r = await client.call_tool("run_python", {"code": code})
    assert not r.is_error, text(r)
    deadline = time.monotonic() + 5  # (right after the exec, its cmdline may still be empty)
    while not processes_with(f"sleep {seconds}"):
        assert time.monotonic() < deadline, "the sandbox's sleep is not visible on the host"
        await anyio.sleep(0.02)


async def test_stdio_tools_state_files_errors_and_session_end():
    marker = f"{4000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    async with Client(stdio()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"run_python", "run_command", "write_file", "read_file", "list_files", "reset"}

        r = await client.call_tool("run_python", {"code": "x = 41\nprint('hi')\nx + 1"})
        assert not r.is_error and "stdout:\nhi" in text(r) and "result: 42" in text(r)
        assert r.structured_content["result"] == "42"
        r = await client.call_tool("run_python", {"code": "x * 2"})  # the state persists
        assert "result: 82" in text(r)
        r = await client.call_tool("run_python", {"code": "1 / 0"})  # the cell's error: a tool error
        assert r.is_error and "ZeroDivisionError: division by zero" in text(r)

        r = await client.call_tool("write_file", {"path": "notes/a.txt", "content": "hello"})
        assert not r.is_error and "wrote 5 bytes" in text(r)
        r = await client.call_tool("write_file", {"path": "blob.bin", "content": base64.b64encode(b"\xff\x00").decode(),
                                                  "encoding": "base64"})
        assert not r.is_error
        r = await client.call_tool("run_command", {"command": "cat notes/a.txt; echo; pwd; exit 3"})
        assert not r.is_error and text(r).startswith("exit status 3") and "hello\n/workspace" in text(r)
        r = await client.call_tool("run_command", {"command": ["ls", "notes"], "cwd": "/workspace"})
        assert r.structured_content["stdout"] == "a.txt\n"
        r = await client.call_tool("list_files", {})
        assert "blob.bin" in text(r) and "notes" in text(r)
        r = await client.call_tool("read_file", {"path": "blob.bin"})  # not text: the message says what to do
        assert r.is_error and "encoding='base64'" in text(r)
        r = await client.call_tool("read_file", {"path": "blob.bin", "encoding": "base64"})
        assert base64.b64decode(text(r)) == b"\xff\x00"

        # zviz's errors come back as tool errors carrying zviz's message
        r = await client.call_tool("read_file", {"path": "missing.txt"})
        assert r.is_error and "FileNotFoundError" in text(r) and "missing.txt" in text(r)
        r = await client.call_tool("run_command", {"command": ["no-such-program-x"]})
        assert r.is_error and "CommandNotFoundError" in text(r) and "no-such-program-x" in text(r)
        r = await client.call_tool("write_file", {"path": "/etc/zviz-x", "content": "x"})
        assert r.is_error and "PermissionError" in text(r)
        r = await client.call_tool("run_python", {"code": "1", "timeout": -1})
        assert r.is_error and "timeout must be a positive number" in text(r)
        r = await client.call_tool("run_python", {"cdoe": "1"})
        assert r.is_error and "unknown argument(s) cdoe" in text(r)

        # reset: a fresh sandbox (no variable, no file)
        await start_sleeper(client, marker)
        r = await client.call_tool("reset", {})
        assert not r.is_error
        assert await gone(f"sleep {marker}"), "reset left the old sandbox's process running"
        r = await client.call_tool("run_python", {"code": "import os\n(os.path.exists('notes'), 'x' in dir())"})
        assert "result: (False, False)" in text(r)

        await start_sleeper(client, marker)
    # the client closed the pipe: the server closed the session's sandbox and exited
    assert await gone(f"sleep {marker}"), "the sandbox outlived its session"
    assert await gone("-m zviz mcp --ro") or not HAVE_VENV  # the server exited


async def test_stdio_cancellation_interrupts_the_cell():
    async with Client(stdio()) as client:
        await client.call_tool("run_python", {"code": "import time\nx = 7"})
        t0 = time.monotonic()
        with anyio.move_on_after(1.0):
            await client.call_tool("run_python", {"code": "while True:\n    time.sleep(0.01)"})
        assert time.monotonic() - t0 < 5
        # the next call is not stuck behind the cancelled cell, and the state is kept
        with anyio.fail_after(10):
            r = await client.call_tool("run_python", {"code": "x + 1"})
        assert not r.is_error and "result: 8" in text(r), text(r)


async def test_a_broken_context_is_restarted_and_said():
    """Code that breaks the context's protocol (a forged frame header on its
    control socket) is a tool error; the next call gets a fresh Python."""
    forge = ("s = display.__globals__['S'].ctrl\n"  # the driver's control channel, as a cell can reach it
             "s.sendall(b'\\xff' * 64)\nimport time\ntime.sleep(1)")
    async with Client(stdio()) as client:
        await client.call_tool("run_python", {"code": "x = 1"})
        r = await client.call_tool("run_python", {"code": forge})
        assert r.is_error and "CodeContextError: code context broken" in text(r), text(r)
        r = await client.call_tool("run_python", {"code": "'x' in dir()"})
        assert not r.is_error and "result: False" in text(r) and "Python process was restarted" in text(r)


@pytest.mark.skipif(not HAVE_VENV, reason="no .venv-sandbox (scripts/setup-testvenv.sh builds it): matplotlib")
async def test_figure_comes_back_as_image_content():
    async with Client(stdio()) as client:
        r = await client.call_tool("run_python", {"code": (
            "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('zviz')\n'plotted'")},
            read_timeout_seconds=60)
        assert not r.is_error, text(r)
        images = [c for c in r.content if c.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(b"\x89PNG\r\n\x1a\n")
        assert "result: 'plotted'" in text(r) and "1 image(s) attached" in text(r)


async def test_stdio_idle_timeout_closes_the_sandbox():
    marker = f"{5000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    async with Client(stdio("--idle-timeout", "1.5")) as client:
        await client.call_tool("run_python", {"code": "x = 1"})
        await start_sleeper(client, marker)
        assert await gone(f"sleep {marker}", within=8), "the idle session's sandbox was not closed"
        r = await client.call_tool("run_python", {"code": "'x' in dir()"})
        assert "idle-timeout" in text(r) and "result: False" in text(r)  # said once, a fresh sandbox
        r = await client.call_tool("run_python", {"code": "2"})
        assert "idle" not in text(r)


# ---- streamable HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(*extra: str, quiet: bool = False):
    """`zviz mcp --http` on a free port: (its URL, the process). quiet: its stderr
    to /dev/null (a test that floods it with requests: a pipe nobody reads would fill)."""
    port = free_port()
    proc = subprocess.Popen([*ZVIZ_MCP, *_venv_args(), "--http", f"127.0.0.1:{port}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "zviz mcp --http ended"
            assert time.monotonic() < deadline, "zviz mcp --http did not listen"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# the SDK's HTTP client (httpx2) leaves async generators to the collector on trio: its warning, not ours
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_http_sessions_cap_end_and_idle():
    m1 = f"{6000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    m2 = f"{7000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    with http_server("--max-sessions", "1", "--idle-timeout", "2") as (url, proc):
        async with Client(url) as a:
            r = await a.call_tool("run_python", {"code": "x = 'a'\nx"})
            assert "result: 'a'" in text(r)
            await start_sleeper(a, m1)
            # the cap: a second session is refused with a message naming it
            with pytest.raises(Exception) as info:
                async with Client(url) as b:
                    await b.call_tool("run_python", {"code": "1"})
            assert "--max-sessions 1" in repr(info.value) or "--max-sessions 1" in str(info.value.__cause__), \
                repr(info.value)
            r = await a.call_tool("run_python", {"code": "x * 2"})  # the open session is unaffected
            assert "result: 'aa'" in text(r)
            # cancellation over HTTP: interrupted, and the next call is not stuck
            with anyio.move_on_after(1.0):
                await a.call_tool("run_python", {"code": "import time\nwhile True:\n    time.sleep(0.01)"})
            with anyio.fail_after(10):
                r = await a.call_tool("run_python", {"code": "x"})
            assert "result: 'a'" in text(r), text(r)
        # the client ended its session (DELETE): its sandbox is closed
        assert await gone(f"sleep {m1}"), "the HTTP session's sandbox outlived the session"
        async with Client(url) as b:  # room again
            r = await b.call_tool("run_python", {"code": "'x' in dir()"})
            assert "result: False" in text(r)  # a sandbox of its own
            await start_sleeper(b, m2)
            assert await gone(f"sleep {m2}", within=10), "the idle session's sandbox was not closed"
            r = await b.call_tool("run_python", {"code": "3"})
            assert "idle-timeout" in text(r) and "result: 3" in text(r)
        assert proc.poll() is None
    assert not processes_with(f"sleep {m1}") and not processes_with(f"sleep {m2}")


def test_sigterm_closes_the_sandboxes():
    """A client that kills its stdio server instead of closing the pipe: the
    server closes its sandbox before it exits (raw JSON-RPC, no SDK)."""
    import json

    marker = f"{2000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    p = subprocess.Popen(ZVIZ_MCP, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(msg: dict) -> dict | None:
        p.stdin.write((json.dumps({"jsonrpc": "2.0", **msg}) + "\n").encode())
        p.stdin.flush()
        return json.loads(p.stdout.readline()) if "id" in msg else None

    try:
        call({"id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                                          "clientInfo": {"name": "test", "version": "1"}}})
        call({"method": "notifications/initialized"})
        r = call({"id": 2, "method": "tools/call", "params": {"name": "run_python", "arguments": {
            "code": f"import subprocess\nq = subprocess.Popen(['sleep', '{marker}'])"}}})
        assert r["result"]["isError"] is False
        deadline = time.monotonic() + 5
        while not processes_with(f"sleep {marker}"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p.terminate()
        assert p.wait(20) == 0
        assert not processes_with(f"sleep {marker}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()
        p.stdout.close()


@pytest.mark.parametrize(("args", "status", "says"), [
    (["--http", "nonsense"], 2, "--http takes HOST:PORT"),
    (["--max-sessions", "0"], 2, "--max-sessions must be at least 1"),
    (["--idle-timeout", "-1"], 2, "--idle-timeout must be a positive number"),
    (["--policy", "/nonexistent/p.toml"], 125, "/nonexistent/p.toml"),
    (["--preset", "nope"], 125, "nope"),
])
def test_cli_errors(args, status, says):
    r = subprocess.run([*ZVIZ_MCP, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == status and says in r.stderr, (r.returncode, r.stderr)
