"""Run an LLM-written Python snippet in a sandbox, from trio."""

import trio

import zviz

SNIPPET = """
import statistics, json
data = [3, 1, 4, 1, 5, 9, 2, 6]
print(json.dumps({"mean": statistics.mean(data), "max": max(data)}))
"""


async def main() -> None:
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        r = await sb.run(["python3", "-c", SNIPPET], timeout=10)
        print("exit:", r.exit_code, "wall: %.1f ms" % (r.wall_s * 1e3))
        print("stdout:", r.stdout.decode().strip())
        if r.denials:
            print("denied:", dict(r.denials))


if __name__ == "__main__":
    trio.run(main)
