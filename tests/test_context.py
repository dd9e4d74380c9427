"""Code contexts and run_python on the real kernel, from trio and asyncio."""

import gc
import itertools
import math
import os
import subprocess
import sys
import time

import anyio
import pytest

import zviz
from zviz import CodeContextError, DisplayData, Execution, Policy, StreamOutput

from .conftest import HAVE_VENV, VENV, VENV_PY, alive, needs_venv, run_as, zviz_tempdirs

pytestmark = pytest.mark.anyio



@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


def policy():
    return Policy.python().with_paths(read_only=[str(VENV)]) if HAVE_VENV else Policy.python()



async def test_state_persists_and_errors_are_data():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        ex = await ctx.run("import os, sys\nx = 41\nos.chdir('/tmp')\nprint('hi')\nx + 1")
        assert ex.ok and ex.stdout == "hi\n" and ex.result == "42" and ex.result_data == {"text/plain": "42"}
        ex = await ctx.run("x += 1\nprint(os.getcwd(), file=sys.stderr)\nos.write(1, b'raw')\nx")
        assert ex.result == "42" and ex.stderr == "/tmp\n" and ex.stdout == "raw"
        ex = await ctx.run("def f():\n    return 1 / 0\nf()")
        assert ex.error is not None and ex.error.name == "ZeroDivisionError" and ex.error.value == "division by zero"
        assert "<cell" in "".join(ex.error.traceback) and "return 1 / 0" in "".join(ex.error.traceback)
        assert "_driver" not in "".join(ex.error.traceback)
        ex = await ctx.run("x = (")
        assert ex.error.name == "SyntaxError"
        ex = await ctx.run("raise SystemExit(3)")
        assert ex.error.name == "SystemExit"
        # stdin reads get EOF; the control socket is no cell's or subprocess's fd 0..2
        ex = await ctx.run("import subprocess\nprint(repr(sys.stdin.read()), os.read(0, 5))\n"
                           "print(sorted(os.listdir('/proc/self/fd')) == ['0', '1', '2', '3'] or 'unused')\n"
                           "subprocess.run(['ls', '/proc/self/fd'])\nx")
        assert ex.stdout.splitlines()[0] == "'' b''"
        assert sorted(ex.stdout.split()[3:]) == ["0", "1", "2", "3"], ex.stdout  # ls: its fds, no socket
        assert ex.result == "42"


async def test_stream_yields_output_then_display_then_execution():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        events = [e async for e in ctx.stream(
            "import time\nprint('a', flush=True)\ntime.sleep(0.05)\nprint('b')\n"
            "class R:\n    def _repr_html_(self): return '<b>r</b>'\ndisplay(R())\n7")]
        assert isinstance(events[-1], Execution) and events[-1].result == "7"
        text = "".join(e.text for e in events if isinstance(e, StreamOutput))
        assert text == "a\nb\n"
        shown = [e.data for e in events if isinstance(e, DisplayData)]
        assert shown == [{"text/plain": shown[0]["text/plain"], "text/html": "<b>r</b>"}]
        assert events[-1].display == tuple(shown)


async def test_interrupt_keeps_the_state():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("n = 5")
        ex = await ctx.run("while True:\n    n += 1", timeout=0.5)  # the timeout interrupts
        assert ex.interrupted and not ex.restarted and ex.error.name == "KeyboardInterrupt"
        assert await ctx.get_var("n") > 5
        async with anyio.create_task_group() as tg:
            async def later():
                await anyio.sleep(0.3)
                await ctx.interrupt()
            tg.start_soon(later)
            ex = await ctx.run("import time\nn = -1\ntime.sleep(60)", timeout=math.inf)
        assert ex.interrupted and ex.error.name == "KeyboardInterrupt" and ex.duration_s < 10
        assert await ctx.get_var("n") == -1
        # a caller that gives up (cancellation) interrupts it too; the state lives on
        with anyio.move_on_after(0.3):
            await ctx.run("import time\nn = -2\ntime.sleep(60)", timeout=math.inf)
        assert (await ctx.run("n")).result == "-2"


async def test_a_cell_ignoring_the_interrupt_is_killed_and_the_context_restarted():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx, sb.code_context() as other:
        await other.run("y = 1")
        await ctx.run("x = 1")
        old = ctx.pid
        t = time.monotonic()
        ex = await ctx.run("import signal, subprocess, os\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                           "p = subprocess.Popen(['sleep', '1000'])\nprint(p.pid, flush=True)\nwhile True: pass",
                           timeout=0.3)
        assert time.monotonic() - t < 10
        assert ex.interrupted and ex.restarted and ex.error.name == "ContextKilled"
        assert "every variable was lost" in ex.error.value
        assert ctx.pid != old and not alive(old)
        with pytest.raises(KeyError):
            await ctx.get_var("x")
        # the cell's subprocess (its process group) died with it; the other context did not
        for _ in range(100):
            r = await sb.run(["sh", "-c", "cat /proc/[0-9]*/comm"])
            if b"sleep" not in r.stdout:
                break
            await anyio.sleep(0.02)
        assert b"python3" in r.stdout and b"sleep" not in r.stdout
        assert await other.get_var("y") == 1
        assert (await ctx.run("1 + 1")).result == "2"


@pytest.mark.parametrize("crash", ["import os; os._exit(3)", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                                   "import ctypes; ctypes.string_at(0)"])
async def test_a_crash_is_reported_and_the_context_restarted(crash):
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("x = 1")
        ex = await ctx.run("print('before', flush=True)\n" + crash)
        assert ex.restarted and not ex.interrupted and ex.error.name == "ContextDied" and ex.stdout == "before\n"
        with pytest.raises(KeyError):
            await ctx.get_var("x")
        assert (await ctx.run("2 * 3")).result == "6"


async def test_output_is_capped_per_cell_and_counted():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context(output_cap=1000) as ctx:
        ex = await ctx.run("import sys\nsys.stdout.write('x' * 300000)\nsys.stderr.write('e' * 10)\n1")
        assert ex.stdout == "x" * 1000 and ex.stderr == "e" * 10 and ex.output_dropped == 299000
        assert ex.result == "1"
        ex = await ctx.run("print('small')")
        assert ex.stdout == "small\n" and ex.output_dropped == 0


async def test_a_cell_whose_output_never_pauses_lets_the_loop_run():
    """A cell's loop took the next output without yielding to the event loop
    as long as some was ready: a cell that prints every 0.5 ms, read by a
    plain consumer of `stream()` that takes 2 ms an event, held the whole
    event loop (every other task and sandbox, a close from another task)
    until the cell ended. Now it yields at least every few ms."""
    code = "import time\nwhile True:\n    print('x' * 100, flush=True)\n    time.sleep(0.0005)"
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await anyio.sleep(0.01)
            ticks.append(time.monotonic())

    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("1")
        events = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            ticks.append(time.monotonic())
            async for _ev in ctx.stream(code, timeout=1.0):
                events += 1
                time.sleep(0.002)  # noqa: ASYNC251 - the slow, plain consumer this is about
            ticks.append(time.monotonic())
            tg.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(sorted(ticks))]
    assert events > 10, events
    assert max(gaps) < 0.4, f"the event loop was held for {max(gaps):.2f} s"


async def test_output_after_the_cell_is_not_the_cells():
    # a thread that writes after its cell ended writes to /dev/null or to a later
    # cell's pipe; never into a finished Execution
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        ex = await ctx.run("import threading, time, os\n"
                           "def spam():\n    time.sleep(0.2)\n    for _ in range(50):\n"
                           "        os.write(1, b'late\\n'); time.sleep(0.01)\n"
                           "threading.Thread(target=spam, daemon=True).start()\nprint('now')")
        assert ex.stdout == "now\n"
        await anyio.sleep(1.0)
        ex = await ctx.run("print('next')")
        assert ex.stdout == "next\n"


@needs_venv
async def test_display_a_matplotlib_figure_and_a_dataframe():
    async with zviz.open_sandbox(policy()) as sb, sb.code_context(python=VENV_PY, preload=("numpy", "pandas")) as ctx:
        ex = await ctx.run("import matplotlib.pyplot as plt, pandas as pd\nplt.plot([1, 3, 2])\n"
                           "df = pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})\ndisplay(df)\ndf")
        assert ex.ok, ex.error
        html = [d for d in ex.display if "text/html" in d]
        png = [d for d in ex.display if "image/png" in d]
        assert len(html) == 1 and "<table" in html[0]["text/html"]
        assert len(png) == 1 and len(png[0]["image/png"]) > 1000
        assert png[0]["image/png"].startswith(b"\x89PNG\r\n\x1a\n")
        assert "<table" in ex.result_data["text/html"] and "a  b" in ex.result
        assert (await ctx.run("plt.get_fignums()")).result == "[]"  # shown figures are closed


async def test_fork_is_independent_both_ways():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("x = [1]\nimport os\nos.chdir('/tmp')")
        twin = await ctx.fork()
        try:
            assert twin.pid != ctx.pid
            await twin.run("x.append('twin')\nt = 1")
            await ctx.run("x.append('parent')")
            assert await ctx.get_var("x") == [1, "parent"]
            assert await twin.get_var("x") == [1, "twin"]
            assert (await twin.run("os.getcwd()")).result == "'/tmp'"
            with pytest.raises(KeyError):
                await ctx.get_var("t")
            # each can be restarted or closed without the other
            await ctx.restart()
            assert await twin.get_var("t") == 1
            grand = await twin.fork()
            await twin.aclose()
            assert await grand.get_var("x") == [1, "twin"]
            await grand.aclose()
        finally:
            await twin.aclose()


async def test_run_python_has_a_fresh_state_each_call():
    async with zviz.open_sandbox(Policy.python()) as sb:
        ex = await sb.run_python("import json, os\njson.LEAK = 1\nG = 1\nopen('f', 'w').write('x')\n"
                                 "os.environ['LEAK'] = '1'\nprint(os.getcwd())\n2 + 2", preload=("json",))
        assert ex.ok and ex.result == "4"
        cwd = ex.stdout.strip()
        ex = await sb.run_python("import json, os\n(hasattr(json, 'LEAK'), 'G' in globals(), os.path.exists('f'), "
                                 "'LEAK' in os.environ, os.getcwd())", preload=("json",))
        assert ex.ok, ex.error
        assert ex.result.startswith("(False, False, False, False, ")
        assert cwd not in ex.result
        # like `python -c`: files left open are flushed, atexit handlers run, before the result
        ex = await sb.run_python(f"import atexit\nf = open('{sb.workspace}/left-open', 'w')\nf.write('data')\n"
                                 f"atexit.register(lambda: open('{sb.workspace}/atexit', 'w').write('ran'))")
        assert ex.ok and await sb.read_file("left-open") == b"data" and await sb.read_file("atexit") == b"ran"
        ex = await sb.run_python("import sys\nsys.exit(4)")
        assert ex.error.name == "SystemExit"
        ex = await sb.run_python("import os\nos._exit(1)")
        assert ex.error.name == "ContextDied" and not ex.restarted
        # the calls' directories are removed once they end
        for _ in range(100):
            r = await sb.run(["sh", "-c", f"test -e {cwd} && echo there || echo gone"])
            if r.stdout == b"gone\n":
                break
            await anyio.sleep(0.05)
        assert r.stdout == b"gone\n"


async def test_values_cross_as_json_only():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.set_vars({"rows": [{"a": 1, "b": [1.5, None, True, "s"]}], "n": 3})
        ex = await ctx.run("type(rows).__name__, rows[0]['b'], n + 1")
        assert ex.result == "('list', [1.5, None, True, 's'], 4)"
        assert await ctx.get_var("rows") == [{"a": 1, "b": [1.5, None, True, "s"]}]
        for bad in ((1, 2), {1, 2}, b"x", float("nan"), {1: 2}, object()):
            with pytest.raises(TypeError):
                await ctx.set_vars({"v": bad})
        for name in ("__builtins__", "a b", "", 3):
            with pytest.raises(ValueError, match="variable name"):
                await ctx.set_vars({name: 1})
        await ctx.run("import math\nf = lambda: 1\nnan = math.nan\nt = (1, 2)")
        with pytest.raises(TypeError, match="not a JSON value"):
            await ctx.get_var("f")
        with pytest.raises(TypeError):
            await ctx.get_var("nan")
        assert await ctx.get_var("t") == [1, 2]  # a tuple reads back as a list, as in JSON
        with pytest.raises(KeyError):
            await ctx.get_var("missing")


async def test_contexts_leave_nothing_behind(snapshot):
    snap = snapshot()
    async with zviz.open_sandbox(Policy.python()) as sb:
        a = await sb.create_code_context()
        b = await a.fork()
        await a.run("import subprocess; subprocess.Popen(['sleep', '1000'])")
        await b.run("x = 1")
        await sb.run_python("1")
        c = await sb.create_code_context()
        await c.aclose()
        with pytest.raises(CodeContextError, match="closed"):
            await c.run("1")
    await snap.assert_released()
    with pytest.raises(zviz.SandboxClosedError):
        await sb.create_code_context()


async def test_contexts_work_in_the_workspace_and_keep_caches_in_home():
    async with zviz.open_sandbox(policy()) as sb, sb.code_context() as ctx:
        assert sb.workspace == "/workspace"
        ex = await ctx.run("import os\n(os.getcwd(), os.environ['HOME'], os.environ['MPLCONFIGDIR'])")
        assert ex.result == "('/workspace', '/home/sandbox', '/home/sandbox/.cache/matplotlib')"
        assert (await ctx.run("open('made-here', 'w').write('x')")).ok
        assert await sb.files.read("made-here") == b"x"
        ex = await sb.run_python("import os\nos.getcwd()")
        assert ex.ok and ex.result.startswith("'/tmp/zviz-run-")  # a fresh directory, not the workspace
        if HAVE_VENV:
            async with sb.code_context(python=VENV_PY, preload=("matplotlib.pyplot",)) as mpl:
                ex = await mpl.run("import matplotlib, matplotlib.pyplot as plt\nplt.plot([1, 2])\n"
                                   "plt.savefig('fig.png')\nmatplotlib.get_cachedir()")
                assert ex.ok, ex.error
                assert ex.result == "'/home/sandbox/.cache/matplotlib'"
        names = sorted(i.name for i in await sb.files.list("/workspace"))
        assert names == (["fig.png", "made-here"] if HAVE_VENV else ["made-here"])  # no cache in the workspace


async def test_contexts_of_a_created_sandbox_closed_from_another_task(snapshot):
    snap = snapshot()
    sb = await zviz.Sandbox.create(Policy.python())
    ctx = await sb.create_code_context()
    twin = await ctx.fork()
    await ctx.run("x = 1")
    pids = [ctx.pid, twin.pid]
    async with anyio.create_task_group() as tg:  # aclose from a task other than the creator
        tg.start_soon(sb.aclose)
    assert not any(alive(p) for p in pids)
    for c in (ctx, twin):
        with pytest.raises(CodeContextError, match="closed"):
            await c.run("x")
    await ctx.aclose()  # idempotent after the sandbox's teardown
    await snap.assert_released()


async def test_a_collected_sandbox_closes_its_contexts(snapshot):
    snap = snapshot()
    sb = await zviz.Sandbox.create(Policy.python())
    ctx = await sb.create_code_context()  # kept: it must not keep the sandbox alive
    await ctx.run("x = 1")
    pid, workdir = ctx.pid, sb.workdir
    del sb
    with pytest.warns(ResourceWarning, match="unclosed"):
        gc.collect()
    for _ in range(200):
        if ctx.closed and not alive(pid) and not os.path.exists(workdir):
            break
        await anyio.sleep(0.02)
    assert ctx.closed and not alive(pid) and not os.path.exists(workdir)
    await snap.assert_released()


LOOP_END = """
import sys, anyio, zviz
async def main():
    global sb, ctx
    sb = await zviz.Sandbox.create(zviz.Policy.python())
    ctx = await sb.create_code_context()
    await ctx.run("x = 1")
    print(sb.workdir, ctx.pid, flush=True)
anyio.run(main, backend=sys.argv[1])
print("loop ended", ctx.closed, flush=True)
"""


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_contexts_end_with_the_loop_of_an_unclosed_sandbox(backend, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", LOOP_END, backend],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    workdir, pid = r.stdout.split()[:2]
    assert "loop ended True" in r.stdout and "unclosed" in r.stderr
    assert not os.path.exists(workdir) and not alive(int(pid))
    assert zviz_tempdirs(str(tmp_path)) == set()  # (the caller's private parent stays, empty)
    assert [n for n in os.listdir(tmp_path) if not n.startswith("zviz-")] == []


async def test_bad_arguments():
    async with zviz.open_sandbox(Policy.python()) as sb:
        with pytest.raises(TypeError):
            await sb.create_code_context(preload="numpy")
        with pytest.raises(ValueError, match="module name"):
            await sb.create_code_context(preload=("os; import x",))
        with pytest.raises(CodeContextError, match=r"did not start|preload"):
            await sb.create_code_context(preload=("no_such_module_zviz",))
        async with sb.code_context() as ctx:
            with pytest.raises(TypeError):
                await ctx.run(b"1")
            with pytest.raises(ValueError, match="timeout"):
                await ctx.run("1", timeout=0)


def test_contexts_for_root_and_an_unprivileged_caller(identity):
    import trio

    async def scenario():
        async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
            await ctx.run("x = 1")
            killed = await ctx.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
                                   timeout=0.3)
            twin = await ctx.fork()
            await ctx.run("x = 2")
            once = await sb.run_python("print(7)")
            return killed.restarted, killed.error.name, (await twin.run("1 + 1")).result, once.stdout

    assert run_as(identity, trio.run, scenario) == (True, "ContextKilled", "2", "7\n")


async def test_calls_from_several_tasks_take_turns_and_restart_or_close_any_time():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("n = 0")
        results = []

        async def bump(i):
            results.append((await ctx.run(f"import time\nk = n\ntime.sleep(0.02)\nn = k + 1\n{i}")).result)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(bump, i)
        assert sorted(results) == ["0", "1", "2", "3", "4"] and await ctx.get_var("n") == 5  # no interleaving
        # restart() from another task while a cell runs: the cell reports the restart
        got = []

        async def long_cell():
            got.append(await ctx.run("import time\ntime.sleep(30)", timeout=60))

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_cell)
            await anyio.sleep(0.3)
            await ctx.restart()
        assert got[0].restarted and got[0].error.name == "ContextDied"
        with pytest.raises(KeyError):
            await ctx.get_var("n")
        # aclose() from another task while a cell runs: the cell's caller gets CodeContextError
        other = await sb.create_code_context()
        errors = []

        async def closed_under_it():
            try:
                await other.run("import time\ntime.sleep(30)")
            except CodeContextError as e:
                errors.append(str(e))

        async with anyio.create_task_group() as tg:
            tg.start_soon(closed_under_it)
            await anyio.sleep(0.3)
            await other.aclose()
        assert errors == ["the code context was closed while its cell ran"]


async def test_a_context_that_dies_between_calls_or_kills_its_template():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("x = 1")
        os.kill(ctx.pid, 9)  # from outside, between calls
        await anyio.sleep(0.1)
        with pytest.raises(CodeContextError, match="had died"):
            await ctx.get_var("x")
        assert (await ctx.run("1 + 1")).result == "2"
        os.kill(ctx.pid, 9)
        await anyio.sleep(0.1)
        ex = await ctx.run("2 + 2")
        assert ex.restarted and ex.error.name == "ContextDied"
        # a cell that kills the template (its parent) takes every context of it;
        # the next calls start a new template
        ex = await ctx.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)")
        assert ex.restarted, ex
        assert (await ctx.run("3 + 3")).result == "6"
        assert (await sb.run_python("4 + 4")).result == "8"


async def test_large_results_are_shrunk_to_fit_not_a_broken_context():
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        ex = await ctx.run("big = list(range(2_000_000))\nbig")  # a 16 MB repr
        assert ex.ok and len(ex.result) < 1024**2 and ex.result.endswith("more characters not shown]")
        ex = await ctx.run("display({'text/html': 'x' * 10_000_000}, raw=True)\nraise ValueError('y' * 10_000_000)")
        assert ex.error.name == "ValueError" and len(ex.error.value) < 1024**2
        assert len(ex.display) == 1 and len(ex.display[0]["text/html"]) < 1024**2
        with pytest.raises(ValueError, match="over"):
            await ctx.get_var("big")
        assert (await ctx.run("len(big)")).result == "2000000"  # the context is fine


async def test_a_failed_fork_keeps_the_template_and_its_contexts():
    async with zviz.open_sandbox(Policy.python(limits=zviz.Limits(processes=8))) as sb:
        made = []
        with pytest.raises(CodeContextError, match="could not fork"):
            for _ in range(10):
                made.append(await sb.create_code_context())
        assert made
        await made[0].run("x = 1")
        with pytest.raises(CodeContextError, match="fork failed"):  # a context's own fork, refused the same way
            await made[0].fork()
        await made[-1].aclose()
        assert (await made[0].run("x + 1")).result == "2"  # the template, and what it forked, live on
        assert (await (await sb.create_code_context()).run("3")).result == "3"
