"""Trace a snippet, tighten the policy to what it used, and run it again.

Uses the eBPF monitor when this runs as root with bcc, else the seccomp
learning mode (which is not a security boundary: trace only code you would
run anyway)."""

import trio

import zviz
import zviz.ebpf

SNIPPET = "import json, statistics; print(json.dumps({'median': statistics.median([5, 1, 3])}))"
GREEDY = "import socket; socket.socket(socket.AF_INET)  # wants more than the trace saw"


async def main() -> None:
    t = await zviz.ebpf.trace(["python3", "-c", SNIPPET], base=zviz.Policy.python())
    tight = t.policy
    print(f"traced in {t.mode} mode: {len(t.syscalls)} distinct syscalls; the preset allowed "
          f"{len(zviz.Policy.python().syscalls.names())}, the tightened policy allows {len(tight.syscalls.names())}")
    async with zviz.open_sandbox(tight) as sb:
        r = await sb.run(["python3", "-c", SNIPPET])
        print("same snippet, tight policy:", r.stdout.decode().strip())
        r = await sb.run(["python3", "-c", GREEDY])
        print("greedy snippet denied:", dict(r.denials))


if __name__ == "__main__":
    trio.run(main)
