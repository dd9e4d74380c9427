"""An MCP-style tool server's sandbox lifetime: one sandbox per session,
created by one request's handler, used by later requests, closed by another
(every handler is a task of its own, as in an MCP or HTTP server).

The server loop here is a stand-in (a list of requests, one task each); with a
real MCP SDK the handlers look the same.
"""

from __future__ import annotations

import os

import anyio

import zviz


class ToolServer:
    def __init__(self) -> None:
        self.sessions: dict[str, zviz.Sandbox] = {}

    async def handle(self, request: dict[str, str]) -> str:
        sid = request["session"]
        if request["method"] == "open":
            self.sessions[sid] = await zviz.Sandbox.create(zviz.Policy.python())
            return f"opened {sid}"
        if request["method"] == "run_python":
            r = await self.sessions[sid].run(["python3", "-c", request["code"]], timeout=10)
            return f"session {sid}: {r.stdout.decode().strip() or r.stderr.decode().strip()}"
        if request["method"] == "write":
            await self.sessions[sid].files.write(request["path"], request["text"])
            return f"wrote {request['path']}"
        if request["method"] == "close":
            await self.sessions.pop(sid).aclose()
            return f"closed {sid}"
        raise ValueError(request["method"])

    async def aclose(self) -> None:
        for sb in self.sessions.values():
            await sb.aclose()
        self.sessions.clear()


async def main() -> None:
    server = ToolServer()
    batches = [
        [{"session": "s1", "method": "open"}, {"session": "s2", "method": "open"}],
        [{"session": "s1", "method": "run_python", "code": "print(6 * 7)"},
         {"session": "s2", "method": "write", "path": "msg.txt", "text": "hello"}],
        [{"session": "s2", "method": "run_python", "code": "print(open('msg.txt').read())"}],
        [{"session": "s1", "method": "close"}, {"session": "s2", "method": "close"}],
    ]
    workdirs = []
    try:
        for batch in batches:
            replies: list[str] = []

            async def one(req: dict[str, str], replies: list[str] = replies) -> None:
                replies.append(await server.handle(req))

            async with anyio.create_task_group() as tg:  # each request: a task of its own
                for req in batch:
                    tg.start_soon(one, req)
            workdirs += [sb.workdir for sb in server.sessions.values()]
            for line in sorted(replies):
                print(line)
    finally:
        await server.aclose()
    print("left behind:", sum(os.path.exists(w) for w in set(workdirs)))  # noqa: ASYNC240


if __name__ == "__main__":
    anyio.run(main)
