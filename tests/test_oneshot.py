"""run_python's two paths give the same results: a fork of the sandbox's
template (`fork=True`) and the driver's once role, one interpreter
started for the call (`fork=False`, the default of a sandbox's first call)."""

import re
import resource
import time

import anyio
import pytest

import zviz
from zviz import CodeContextError, Policy

from .escape.test_context_driver import ATTACKS, SOCK

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "trio"  # the driver does not care; test_context.py runs both event loops

CASES = {
    "value": ("x = 40\nx + 2", None),
    "no value": ("x = 1", None),
    "error with traceback": ("def f():\n    return 1 / 0\n\nf()", None),
    "syntax error": ("def (:", None),
    "null byte": ("x = 1\x00", None),
    "recursion": ("def f(n):\n    return f(n + 1)\nf(0)", None),
    "sys.exit(3)": ("import sys\nprint('before')\nsys.exit(3)", None),
    "sys.exit('message')": ("import sys\nsys.exit('bye')", None),
    "os._exit": ("import os, sys\nprint('out')\nsys.stdout.flush()\nos._exit(3)", None),
    "KeyboardInterrupt": ("raise KeyboardInterrupt", None),
    "interleaved output": ("import sys\nfor i in range(50):\n    print(i)\n    print(-i, file=sys.stderr)\n"
                           "sys.stdout.write('no newline')", None),
    "unicode": ("print('h\\u00e9llo \\u2603 \\U0001f600')\nprint('\\udc80 lone surrogate')\n'\\u2603' * 3", None),
    "raw bytes": ("import os\nos.write(1, b'\\xff\\xfe bad utf-8\\n')\nos.write(2, b'\\x00')", None),
    "large output capped": ("import sys\nsys.stdout.write('x' * 3_000_000)\nsys.stderr.write('y' * 1_500_000)", None),
    "large result shrunk": ("'z' * 3_000_000", None),
    "sys.argv as python -c": ("import sys\nsys.argv", None),
    "stdin is empty": ("import sys\nsys.stdin.read()", None),
    "fds 0-2 closed": ("import os\nprint('first', flush=True)\nos.close(0)\nos.close(1)\nos.close(2)\n7", None),
    "fds 0-2 dup'd": ("import os, sys\nos.dup2(2, 1)\nprint('to stderr', flush=True)\nos.dup2(1, 0)\n8", None),
    "forks a daemon and exits": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n"
        "    os._exit(0)\ntime.sleep(0.05)\nprint('parent')\n9", None),
    "a child keeps stdout open": ("import subprocess\nsubprocess.Popen(['sleep', '30'])\nprint('started')", None),
    "a warning shows its line": ("import warnings\nwarnings.warn('careful')\n1", None),
    "inspect sees the cell": ("import inspect\ndef f():\n    return 1\nprint(inspect.getsource(f))", None),
    "display": ("class H:\n    def _repr_html_(self):\n        return '<b>x</b>'\n    def _repr_json_(self):\n"
                "        return {'nan': float('nan')}\ndisplay(H())\nH()", None),
    "display of raw JSON": ("display({'application/json': {'a': [1, 2.5, None, 'x']}, 'text/plain': 'j'}, raw=True)",
                            None),
    "atexit and open files": ("import atexit\nf = open('/tmp/zz-left', 'w')\nf.write('data')\n"
                              "atexit.register(lambda: print('atexit ran'))\nNone", None),
    "timeout": ("import time\nprint('start', flush=True)\ntime.sleep(30)", 0.3),
    "ignores the interrupt: killed": (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)", 0.3),
}


def normal(ex: zviz.Execution) -> str:
    """Its fields, but for the time it took (and objects' addresses in reprs)."""
    d = {k: getattr(ex, k) for k in ("stdout", "stderr", "result", "result_data", "error", "display",
                                     "interrupted", "restarted", "output_dropped", "display_dropped")}
    return re.sub(r" at 0x[0-9a-f]+", " at 0x?", repr(d))


async def both(code: str, timeout: float | None, **kw) -> tuple[str, str]:
    out = []
    for fork in (True, False):
        async with zviz.open_sandbox(Policy.python()) as sb:
            ex = await sb.run_python(code, timeout=timeout, fork=fork, **kw)
            out.append(normal(ex))
    return out[0], out[1]


@pytest.mark.parametrize("name", sorted(CASES))
async def test_same_result_both_ways(name):
    code, timeout = CASES[name]
    forked, once = await both(code, timeout)
    assert forked == once
    if name == "ignores the interrupt: killed":
        assert "name='ContextKilled'" in once and "'interrupted': True" in once
    if name == "large output capped":
        assert "'output_dropped': 2402848" in once


async def test_a_cell_that_writes_garbage_to_the_control_channel_breaks_both_ways():
    # the control socket is the driver's fd >= 100: the cell finds it and writes a bad frame
    code = ("import os, socket\nfor fd in range(100, 120):\n    try:\n"
            "        s = socket.socket(fileno=os.dup(fd))\n    except OSError:\n        continue\n"
            "    s.sendall(b'\\x00\\x00\\x00\\x05\\x00\\x00\\x00\\x00{\"t\":1')\n"
            "import time\ntime.sleep(5)")
    messages = []
    for fork in (True, False):
        async with zviz.open_sandbox(Policy.python()) as sb:
            with pytest.raises(CodeContextError) as info:
                await sb.run_python(code, fork=fork, timeout=10)
            messages.append(str(info.value))
            assert (await sb.run(["true"])).exit_code == 0  # the sandbox is fine
    assert messages[0] == messages[1] and "bad frame" in messages[0]


async def test_preload_both_ways():
    forked, once = await both("import sys\n('json' in sys.modules, 'decimal' in sys.modules)",
                              None, preload=("json", "decimal"))
    assert forked == once and "'result': '(True, True)'" in once
    for fork in (True, False):
        async with zviz.open_sandbox(Policy.python()) as sb:
            with pytest.raises(CodeContextError, match="could not import its preload"):
                await sb.run_python("1", preload=("no_such_module_zviz",), fork=fork)
            assert (await sb.run_python("5", fork=fork)).result == "5"


async def test_the_first_call_of_a_sandbox_runs_without_a_template_later_ones_fork_it():
    async with zviz.open_sandbox(Policy.python()) as sb:
        first = await sb.run_python("import os\nos.getpid()")
        assert first.ok and not sb._contexts._templates  # one interpreter, no template
        second = await sb.run_python("import os\nos.getpid()")
        assert second.ok and len(sb._contexts._templates) == 1  # it runs many: the template now
        third = await sb.run_python("import os\nos.getpid()")
        assert third.ok and len(sb._contexts._templates) == 1
    async with zviz.open_sandbox(Policy.python()) as sb:
        async with sb.code_context() as ctx:  # a code context's template serves run_python at once
            await ctx.run("1")
        assert (await sb.run_python("2")).result == "2" and len(sb._contexts._templates) == 1
        with pytest.raises(TypeError, match="fork must be"):
            await sb.run_python("1", fork="yes")


async def test_a_one_shot_run_leaves_nothing_behind():
    async with zviz.open_sandbox(Policy.python()) as sb:
        ex = await sb.run_python(
            "import os, subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n"
            "open('mine', 'w').write('x')\nos.getcwd()", fork=False)
        cwd = ex.result.strip("'")
        assert ex.ok and cwd.startswith("/tmp/zviz-run-")
        # its directory is gone when the call returns, and so is every process it started
        r = await sb.run(["sh", "-c", f"test -e {cwd} && echo there || echo gone"])
        assert r.stdout == b"gone\n"
        r = await sb.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        assert b"sleep 60" not in r.stdout


async def test_a_one_shot_run_cancelled_leaves_the_sandbox_usable():
    async with zviz.open_sandbox(Policy.python()) as sb:
        with anyio.move_on_after(0.5):
            await sb.run_python("import time\ntime.sleep(60)", fork=False)
        r = await sb.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        assert b"time.sleep(60)" not in r.stdout
        assert (await sb.run_python("3", fork=False)).result == "3"


async def test_an_interpreter_of_another_version_compiles_the_source(monkeypatch):
    # the driver goes as bytecode when the interpreter's magic number is ours, else as source
    from zviz import _driverboot

    _magic, code, source = _driverboot.code()
    monkeypatch.setattr(_driverboot, "code", lambda: ("00000000", code, source))
    forked, once = await both("import sys\n(sys.argv, 6 * 7)", None)
    assert forked == once and "'result': \"(['-c'], 42)\"" in once


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_a_hostile_one_shot_run_is_a_clear_error_and_leaves_nothing(attack):
    # tests/escape/test_context_driver.py's attacks on the driver's channel, made by a
    # one-shot run's cell: an error within bounded time and host memory, its command
    # reaped, the sandbox fine
    async with zviz.open_sandbox(Policy.python()) as sb:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.monotonic()
        if attack == "partial-frame":  # its "done" lands in the half frame, then it exits (as a forked one)
            ex = await sb.run_python(SOCK + ATTACKS[attack], fork=False, timeout=2)
            assert ex.error.name == "ContextDied" and ex.interrupted
        else:
            with pytest.raises(CodeContextError, match=r"broken|bad frame|closed|frames"):
                await sb.run_python(SOCK + ATTACKS[attack], fork=False, timeout=20)
        assert time.monotonic() - t < 10
        assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024 < 64
        r = await sb.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        assert b"once" not in r.stdout  # the one-shot interpreter is gone
        assert (await sb.run_python("1 + 1", fork=False)).result == "2"
