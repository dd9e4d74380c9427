"""A Jupyter kernel inside a sandbox, driven from the host with jupyter_client.

The kernel (ipykernel, from a venv exposed read-only) talks ZeroMQ over unix
sockets in the sandbox's workdir (`transport: ipc`): the sandbox has no
network, and the host reaches the sockets through the workdir. The host side
here runs with the same venv's interpreter (it needs jupyter_client).

Needs the test venv: ./scripts/setup-testvenv.sh (numpy, pandas, matplotlib,
ipykernel, jupyter_client, pyzmq).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import trio

import zviz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-sandbox")

# What the host runs to drive the kernel (in the venv's interpreter).
DRIVER = r"""
import json, sys
from jupyter_client import BlockingKernelClient
c = BlockingKernelClient()
c.load_connection_file(sys.argv[1])
c.start_channels()
c.wait_for_ready(timeout=60)
reply = c.execute_interactive(sys.argv[2], timeout=60,
                              output_hook=lambda m: m["msg_type"] == "stream" and print(m["content"]["text"], end=""))
print("status:", reply["content"]["status"])
c.shutdown()
c.stop_channels()
"""

CELL = """
import numpy as np, pandas as pd, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
df = pd.DataFrame({"x": np.arange(5), "y": np.arange(5) ** 2})
plt.plot(df.x, df.y); plt.savefig("plot.png")
print("sum of squares:", int(df.y.sum()))
"""


async def main() -> None:
    if not os.path.exists(os.path.join(VENV, "bin", "python")):  # noqa: ASYNC240
        sys.exit("run ./scripts/setup-testvenv.sh first")
    policy = zviz.Policy.python().with_paths(read_only=[VENV])
    async with zviz.open_sandbox(policy) as sb:
        # The same sockets, named as each side sees them: /workspace inside, the workdir's host path outside.
        conn = {"transport": "ipc", "ip": os.path.join(sb.workspace, "kernel"), "shell_port": 1, "iopub_port": 2,
                "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": secrets.token_hex(16),
                "signature_scheme": "hmac-sha256", "kernel_name": "python3"}
        await sb.files.write("kernel.json", json.dumps(conn))
        await sb.files.write("host.json", json.dumps(conn | {"ip": os.path.join(sb.workdir, "kernel")}))
        async with await sb.start([os.path.join(VENV, "bin", "python"), "-m", "ipykernel_launcher", "-f",
                                   "kernel.json"], timeout=120) as kernel:
            host_conn = os.path.join(sb.workdir, "host.json")  # read by the host's client
            driver = await trio.to_thread.run_sync(
                lambda: subprocess.run([os.path.join(VENV, "bin", "python"), "-c", DRIVER, host_conn, CELL],
                                       capture_output=True, text=True, timeout=120, check=False))
            print(driver.stdout, end="")
            if driver.returncode:
                print(driver.stderr, file=sys.stderr)
                err = await kernel.stderr_stream().receive_some()
                print(err.decode(errors="replace"), file=sys.stderr)
        info = await sb.files.stat("plot.png")
        print("plot:", info.type, info.size > 1000)


if __name__ == "__main__":
    trio.run(main)
