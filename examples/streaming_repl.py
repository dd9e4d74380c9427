"""Drive a Python REPL inside a sandbox, line by line (streaming stdio)."""

import trio

import zviz


async def ask(proc: zviz.Process, line: str, marker: bytes) -> bytes:
    """Send one line; read stdout until `marker` shows up (the prompts go to stderr)."""
    await proc.stdin.send_all(line.encode() + b"\n")
    buf = b""
    with trio.fail_after(10):
        while marker not in buf or not buf.endswith(b"\n"):
            buf += await proc.stdout.receive_some()
    return buf


async def main() -> None:
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        repl = await sb.start(["python3", "-i", "-q", "-u"])
        await repl.stdin.send_all(b"x = 21\n")  # state lives on between lines
        out = await ask(repl, "print('answer', x * 2)", b"answer")
        print(out.decode().strip())
        await repl.stdin.aclose()
        print("repl exited with", await repl.wait())


if __name__ == "__main__":
    trio.run(main)
