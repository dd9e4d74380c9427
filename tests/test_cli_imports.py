"""What the command line loads (its start-up is paid on every `zviz run`): which
modules a fresh `zviz` process imports, not how long that takes (timing is
benchmarks/cli.py's). Each test runs the CLI in a new interpreter and lists
sys.modules at its exit."""

import os
import subprocess
import sys
import textwrap

import pytest

# Loaded by `zviz run` only if something regressed: trio (~60 ms; the CLI runs
# on asyncio), libseccomp's binding (the filter comes from the start-up cache),
# the code contexts' machinery (made on a sandbox's first code context), the
# blocking facade, trace/OCI/policy generation, the MCP server, the egress proxy
# and its rules and parsers (without --allow-domain: ~6 ms of class building),
# TOML and JSON without --policy or --json.
NEVER_FOR_RUN = {"trio", "pyseccomp", "tomllib", "json", "zviz.sync", "zviz._trace", "zviz._oci", "zviz._generate",
                 "zviz._context", "zviz._execution", "zviz._cell", "zviz._template", "mcp", "zviz._mcp",
                 "zviz._egress", "zviz._egressproto", "zviz._snapshot"}
# `zviz --help` builds the parser and nothing else of zviz
HEAVY = {"trio", "anyio", "asyncio", "attrs", "attr", "pyseccomp", "typing", "mcp", "zviz._mcp"}

LIST_MODULES = textwrap.dedent("""
    import atexit, sys
    out = sys.argv.pop(1)
    def dump():
        with open(out, "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
    atexit.register(dump)
    sys.argv[0] = "zviz"
    from zviz._cli import main
    sys.exit(main())
""")


def _modules(tmp_path, *args, env=None):
    out = tmp_path / "modules.txt"
    p = subprocess.run([sys.executable, "-c", LIST_MODULES, str(out), *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=60)
    return p, set(out.read_text().split())


def test_help_imports_nearly_nothing(tmp_path):
    p, mods = _modules(tmp_path, "--help")
    assert p.returncode == 0 and "zviz run" not in p.stderr and "usage: zviz" in p.stdout
    assert not mods & HEAVY, mods & HEAVY
    assert {m for m in mods if m.startswith("zviz")} == {"zviz", "zviz._cli", "zviz._errors", "zviz._version"}


@pytest.mark.parametrize("sub", ["run", "gc", "check", "trace", "mcp"])
def test_subcommand_help_imports_nearly_nothing(tmp_path, sub):
    p, mods = _modules(tmp_path, sub, "--help")
    assert p.returncode == 0 and f"usage: zviz {sub}" in p.stdout
    assert not mods & HEAVY, mods & HEAVY


def test_run_does_not_import_trio_nor_libseccomp_on_a_cache_hit(tmp_path):
    env = {"ZVIZ_CACHE_DIR": str(tmp_path / "cache")}
    p, first = _modules(tmp_path, "run", "--", "/bin/sh", "-c", "echo hi", env=env)
    assert (p.returncode, p.stdout) == (0, "hi\n"), p.stderr
    assert "trio" not in first and "pyseccomp" in first  # a miss: compiled (and stored)
    p, mods = _modules(tmp_path, "run", "--", "/bin/sh", "-c", "echo hi", env=env)
    assert (p.returncode, p.stdout) == (0, "hi\n"), p.stderr
    assert not mods & NEVER_FOR_RUN, mods & NEVER_FOR_RUN
    assert "anyio._backends._asyncio" in mods and "anyio._backends._trio" not in mods


def test_run_reports_a_denial_on_asyncio(tmp_path):
    """The supervisor runs on the CLI's asyncio loop: a denied call is still reported."""
    p, mods = _modules(tmp_path, "run", "--", "/bin/sh", "-c", "unshare -U true; echo rc=$?")
    assert p.returncode == 0 and "rc=" in p.stdout and "rc=0" not in p.stdout, (p.stdout, p.stderr)
    assert "zviz: denied unshare" in p.stderr, p.stderr
    assert "trio" not in mods


def test_importing_zviz_imports_no_submodule():
    prog = "import sys, zviz; print(sorted(m for m in sys.modules if m.startswith(('zviz', 'trio', 'attr', 'anyio'))))"
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['zviz', 'zviz._version']"


def test_a_trio_caller_gets_trio_streams_when_zviz_came_first():
    """zviz no longer imports trio: its streams become trio streams when a
    sandbox is opened on trio, even if trio was imported after zviz."""
    prog = textwrap.dedent("""
        import zviz, sys
        assert "trio" not in sys.modules
        import trio
        async def main():
            async with zviz.open_sandbox(zviz.Policy.shell()) as sb:
                async with await sb.start(["cat"]) as p:
                    ok = isinstance(p.stdout, trio.abc.ReceiveStream) and isinstance(p.stdin, trio.abc.SendStream)
                    await p.stdin.send_all(b"x")
                    await p.stdin.aclose()
                    data = await p.stdout.receive_some()
                    await p.wait()
            print(ok, data)
        trio.run(main)
    """)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "b'x'"], out.stderr


def test_python_dash_m_zviz_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "zviz", "run", "--", "/bin/sh", "-c", "echo hi"], capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    out = subprocess.run([sys.executable, "-m", "zviz", "bogus"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr
