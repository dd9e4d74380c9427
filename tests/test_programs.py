"""Real programs under the python preset: numpy, pandas and matplotlib from a
venv exposed read-only, and a Jupyter kernel (ipykernel) inside a sandbox,
driven from the host through jupyter_client (examples/jupyter_kernel.py).

The venv is scripts/setup-testvenv.sh's `.venv-sandbox/` (built here when it
is missing; skipped with the reason when it cannot be built, e.g. offline)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import zviz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-sandbox")
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="session")
def testvenv() -> str:
    probe = [os.path.join(VENV, "bin", "python"), "-c", "import numpy, pandas, matplotlib, ipykernel, jupyter_client"]
    if not os.path.exists(probe[0]) or subprocess.run(probe, capture_output=True).returncode:
        r = subprocess.run([os.path.join(ROOT, "scripts", "setup-testvenv.sh")], capture_output=True, text=True,
                           timeout=900)
        if r.returncode:
            pytest.skip(f"cannot build the test venv (scripts/setup-testvenv.sh): {r.stderr[-500:]}")
    return VENV


SCIENCE = """
import numpy as np, pandas as pd, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
df = pd.DataFrame({"x": np.arange(10), "y": np.arange(10) ** 2})
print(df.y.sum(), df.describe().loc["mean", "y"])
fig, ax = plt.subplots(); ax.plot(df.x, df.y); fig.savefig("plot.png")
"""


async def test_numpy_pandas_matplotlib_from_a_read_only_venv(testvenv):
    policy = zviz.Policy.python().with_paths(read_only=[testvenv])
    async with zviz.open_sandbox(policy) as sb:
        await sb.files.write("science.py", SCIENCE)
        r = await sb.run([os.path.join(testvenv, "bin", "python"), "science.py"], timeout=120)
        assert r.ok, r.stderr.decode()
        assert r.stdout.split() == [b"285", b"28.5"]
        assert (await sb.files.stat("plot.png")).size > 1000
        # (numpy's BLAS may try mbind, which is denied: harmless, it falls back)


def test_jupyter_kernel_driven_through_jupyter_client(testvenv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "jupyter_kernel.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sum of squares: 30" in r.stdout and "status: ok" in r.stdout, (r.stdout, r.stderr)
    assert "plot: file True" in r.stdout


def test_the_test_venv_is_world_readable(testvenv):
    for d, dirs, files in os.walk(testvenv):
        for name in dirs + files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                assert os.stat(p).st_mode & 0o004, p

