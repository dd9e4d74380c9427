"""The same API from an asyncio agent framework (zviz is written on anyio)."""

import asyncio

import zviz


async def tool_call(code: str) -> str:
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        r = await sb.run(["python3", "-c", code], timeout=10)
        return r.stdout.decode() if r.ok else f"error ({r.status}): {r.stderr.decode()[-500:]}"


async def main() -> None:
    # an agent fanning out three tool calls at once
    results = await asyncio.gather(*(tool_call(f"print({i} ** 2)") for i in range(3)))
    print([r.strip() for r in results])


if __name__ == "__main__":
    asyncio.run(main())
