"""A synchronous code executor (the shape smolagents' executors have): no
async anywhere in the caller. The sandbox's event loop runs on a private
thread; the executor can be called from several threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import zviz


class SandboxExecutor:
    def __init__(self) -> None:
        self._sb = zviz.sync.Sandbox.create(zviz.Policy.python())

    def __call__(self, code: str) -> str:
        r = self._sb.run(["python3", "-c", code], timeout=10)
        if not r.ok:
            raise RuntimeError(r.stderr.decode())
        return r.stdout.decode().strip()

    def close(self) -> None:
        self._sb.close()


if __name__ == "__main__":
    ex = SandboxExecutor()
    try:
        print("executor:", ex("print(1 + 2)"))
        with ThreadPoolExecutor(4) as pool:
            print("threads:", [int(x) for x in pool.map(lambda i: ex(f"print({i} * {i})"), range(4))])
        with zviz.sync.open_sandbox() as sb:  # the shell preset, as a block
            print("cwd:", sb.run("cd / && pwd", shell=True).stdout.decode().strip())
    finally:
        ex.close()
