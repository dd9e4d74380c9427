"""A reward farm on Ray: score model-written solutions by running their tests in sandboxes.

    pip install zviz[ray]
    python examples/ray_farm.py                 # a local Ray instance
    RAY_ADDRESS=auto python examples/ray_farm.py  # a cluster started with `ray start --head`

Each candidate runs in a sandbox of its own (no candidate sees another's files,
processes or state); its reward is 1.0 when its tests pass. A candidate that hangs
is interrupted by its timeout; one that tries what the policy forbids is denied.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import ray

import zviz
from zviz.ray import SandboxPool, Snippet

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
CANDIDATES = [
    "def add(a, b):\n    return a + b\n",                                   # right
    "def add(a, b):\n    return a - b\n",                                   # wrong
    "def add(a, b):\n    while True:\n        pass\n",                      # hangs
    "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n",    # forbidden
    "open('/tmp/answers', 'w').write('cheat')\ndef add(a, b):\n    return a + b\n",
    "import os\nprint(os.path.exists('/tmp/answers'))\ndef add(a, b):\n    return a + b\n",  # sees nothing
]


async def main() -> None:
    policy = zviz.Policy.python()
    async with SandboxPool(policy, sandboxes_per_node=2) as pool:
        snippets = [Snippet(code=c + TESTS, timeout=2) for c in CANDIDATES]
        results = await pool.map_python(snippets)
    for r in results:
        reward = 1.0 if r.ok else 0.0
        why = ("timed out" if r.timed_out else r.error.name if r.error else r.failure or "passed")
        print(f"candidate {r.index}: reward {reward} ({why}) denials={dict(r.denials)} "
              f"stdout={r.stdout.strip()!r} on {r.node_ip} in {r.duration_s * 1e3:.0f} ms")
    print("mean reward:", sum(r.ok for r in results) / len(results))


if __name__ == "__main__":
    temp_dir = None
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # a private local instance, removed afterwards
        temp_dir = tempfile.mkdtemp(prefix="ray-")
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 configure_logging=False)
    try:
        asyncio.run(main())
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
