"""Attacks by a semi-trusted MCP client (an LLM agent, or anyone who reaches
`zviz mcp --http`) on the server: arguments that would take more than the
server's configuration gives, and requests that would grow the server.
Evidence is what the host sees: the wall-clock time and the host's process
list, the server process's resident memory."""

from __future__ import annotations

import http.client
import os
import secrets
import sys
import time

import anyio
import pytest

pytest.importorskip("mcp", reason="the mcp extra (pip install 'zviz[mcp]')")

from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from ..test_mcp import _venv_args, gone, http_server, processes_with, text

pytestmark = pytest.mark.filterwarnings("ignore::zviz.ZvizWarning")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_client_timeout_cannot_outlast_the_policys_wall_clock(tmp_path, anyio_backend):
    """The server's policy says `limits.wall_s = 1`; the client asks for an
    endless command and an endless cell (`timeout` 1e9 and inf). Before: both
    ran to their end (4 s here, forever with a longer sleep), and the host's
    `sleep` outlived the policy's limit. Now the agent may ask for less time,
    never more."""
    pol = tmp_path / "p.toml"
    pol.write_text('name = "shell"\n[syscalls]\nallow = ["@shell"]\n[fs]\nread_only = ["/usr", "/bin", "/lib", '
                   '"/lib64", "/etc"]\n[limits]\nwall_s = 1.0\n')
    marker = f"{3000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    params = StdioServerParameters(command=sys.executable, args=["-m", "zviz", "mcp", "--policy", str(pol),
                                                                 *_venv_args()],
                                   env={"TMPDIR": os.environ.get("TMPDIR", "/tmp")})
    async with Client(params) as client:
        await client.call_tool("run_command", {"command": "true"})  # the sandbox is open
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            results = {}

            async def call(name: str, args: dict) -> None:
                results[name] = await client.call_tool(name, args)

            tg.start_soon(call, "run_command", {"command": f"sleep {marker}", "timeout": 1e9})
            deadline = time.monotonic() + 5
            while not processes_with(f"sleep {marker}") and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            assert processes_with(f"sleep {marker}"), "the command did not start"
            # on the host: the sandbox's sleep is gone within the policy's second (plus slack for a loaded host)
            assert await gone(f"sleep {marker}", within=4.0), "the client's timeout outlasted limits.wall_s"
        assert "timed out" in text(results["run_command"]), text(results["run_command"])
        r = await client.call_tool("run_python", {"code": "import time\ntime.sleep(6)\nprint('ran on')",
                                                  "timeout": float("inf")})
        assert "interrupted" in text(r) and "ran on" not in text(r), text(r)
        assert time.monotonic() - t0 < 8
        # a shorter timeout than the policy's is the client's to ask
        r = await client.call_tool("run_command", {"command": "sleep 0.5; echo ok", "timeout": 0.1})
        assert "timed out" in text(r)


def test_made_up_session_ids_do_not_grow_the_http_server():
    """Anyone who reaches `zviz mcp --http` may send requests with any
    `mcp-session-id`. Before, each unknown id (up to a header's size) was
    kept for good in two of the server's dicts: 3,000 requests with 8 KB ids
    grew the server by ~22 MiB, without bound and past `--max-sessions`. Now
    an id the server did not hand out leaves nothing behind."""
    with http_server(quiet=True) as (url, proc):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'

        def flood(n: int) -> None:
            for _ in range(n):
                conn.request("POST", "/mcp", body=body, headers={
                    "mcp-session-id": secrets.token_hex(4000), "content-type": "application/json",
                    "accept": "application/json, text/event-stream"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 404  # the SDK refuses an unknown session

        try:
            flood(300)  # warm up the server's allocator and caches
            before = _rss_mib(proc.pid)
            flood(3000)  # 24 MB of made-up ids
            grew = _rss_mib(proc.pid) - before
        finally:
            conn.close()
        assert grew < 8, f"the server grew by {grew:.1f} MiB for 3,000 unknown session ids"
        assert proc.poll() is None
