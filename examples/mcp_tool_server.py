"""`zviz mcp` from an MCP client: the mcp SDK's own client starts the server
over stdio (as Claude Desktop or Claude Code would, from their JSON config:
docs/integrations.md) and calls its tools. The session's sandbox keeps a
persistent Python; it is closed when the client closes the session.

    pip install 'zviz[mcp]'
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters


def text(result: Any) -> str:
    return " / ".join(c.text.replace("\n", " ") for c in result.content if c.type == "text")


async def main() -> None:
    server = StdioServerParameters(command=sys.executable, args=["-m", "zviz", "mcp", "--preset", "shell"])
    async with Client(server) as client:
        tools = await client.list_tools()
        print("tools:", ", ".join(sorted(t.name for t in tools.tools)))
        r = await client.call_tool("run_python", {"code": "x = 6 * 7\nx"})
        print("run_python:", text(r))
        r = await client.call_tool("run_python", {"code": "x + 1"})
        print("state kept:", text(r))
        await client.call_tool("write_file", {"path": "hello.txt", "content": "hello from the client"})
        r = await client.call_tool("run_command", {"command": "cat hello.txt; echo; pwd"})
        print("run_command:", text(r))
        r = await client.call_tool("read_file", {"path": "nope.txt"})
        print("error:", r.is_error, text(r))
        with anyio.move_on_after(1):  # a cancelled call interrupts its cell...
            await client.call_tool("run_python", {"code": "import time\nwhile True: time.sleep(0.1)"})
        r = await client.call_tool("run_python", {"code": "x"})  # ...and the next one runs at once
        print("after a cancellation:", text(r))
    print("session closed: its sandbox is gone")


if __name__ == "__main__":
    anyio.run(main)
