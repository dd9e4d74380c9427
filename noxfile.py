"""nox sessions: `nox -s lint typecheck tests` (what CI's scripts/test.sh runs
without nox), and `nox -s bench` (the quick benchmarks). Arguments after `--`
go to pytest (tests) or benchmarks/run.py (bench), never to ruff or mypy:
`nox -s lint typecheck tests -- -x -q`.

Tool versions come from pyproject.toml (the `test` extra), so nox and the
test script cannot drift apart. The tests need what scripts/setup.sh gives
(a C compiler; root for the tests that must run, not skip; bcc for the eBPF
monitor's: ./scripts/setup-ebpf.sh).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"

PYPROJECT = nox.project.load_toml("pyproject.toml")
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# the integrations' extras (mcp, smolagents, pydantic-ai, deepagents, ray): their
# modules are type-checked and tested like the rest, as scripts/test.sh does
INTEGRATIONS = sorted(k for k in EXTRAS if k not in ("test", "bench"))
# the editable install type checkers can follow (a path entry, not an import hook)
EDITABLE = ("-e", f".[{','.join(['test', *INTEGRATIONS])}]", "--config-settings", "editable_mode=compat")


def _tool(name: str) -> str:
    """The requirement for `name` as the test extra pins it."""
    for req in PYPROJECT["project"]["optional-dependencies"]["test"]:
        if req.split(">")[0].split("=")[0].split("<")[0].strip() == name:
            return str(req)
    raise LookupError(f"{name} is not in the test extra of pyproject.toml")


@nox.session
def lint(session: nox.Session) -> None:
    session.install(_tool("ruff"))
    session.run("ruff", "check", "zviz", "tests")


@nox.session
def typecheck(session: nox.Session) -> None:
    # zviz's dependencies are installed for their types; zviz itself is
    # checked from the source tree (its extension through zviz/_stage.pyi),
    # so this session needs no compiler.
    session.install(*PYPROJECT["project"]["dependencies"], *(r for k in INTEGRATIONS for r in EXTRAS[k]), _tool("mypy"))
    session.run("mypy", "zviz")


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*EDITABLE)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[bench]", "--config-settings", "editable_mode=compat")
    session.run("python", "benchmarks/run.py", "--quick", *session.posargs)
