"""smolagents: a code executor that runs a CodeAgent's code in a zviz sandbox.

    from smolagents import CodeAgent
    from zviz.integrations.smolagents import ZvizExecutor
    agent = CodeAgent(tools=[...], model=model, executor=ZvizExecutor(policy=zviz.Policy.python()))

A `RemotePythonExecutor`: the agent's tools are sent with `send_tools` (their
source runs in the sandbox, as with E2B or Docker), its variables with
`send_variables`, and the code runs in one persistent interpreter (a zviz
code context) whose variables persist between steps. A `final_answer(...)`
call ends the run: the FinalAnswerException of smolagents' patched tool is a
cell error here, recognised by name and decoded with JSON only (never pickle,
unless `allow_pickle=True`). Packages the agent may import are checked with
an import probe in the sandbox, not pip-installed: a missing one is an error
naming the fix, unless the policy allows network access (then pip installs
it into the sandbox's user site, as the other executors do).

smolagents is synchronous: the executor runs its sandbox on an event-loop
thread of its own. `cleanup()` (or `CodeAgent.cleanup()`) closes it.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.tools import get_tools_definition_code
from smolagents.utils import AgentError

from .._policy import Policy
from .._tools import SessionConfig
from ._loop import Loop

__all__ = ["ZvizExecutor"]


def _guard_imports(code: str, missing: set[str]) -> str:
    """The tools' source with its top-level imports of missing modules made
    optional (smolagents hoists a tool's imports, even those it makes inside
    a try, e.g. final_answer's numpy and PIL, to the top of the source)."""
    out = []
    for line in code.splitlines():
        words = line.split()
        if line.startswith(("import ", "from ")) and len(words) > 1 and words[1].split(".")[0] in missing:
            out += ["try:", f"    {line}", "except ImportError:", "    pass"]
        else:
            out.append(line)
    return "\n".join(out) + "\n"


_PIP_TO_MODULE = {"pillow": "PIL", "scikit-learn": "sklearn", "beautifulsoup4": "bs4", "pyyaml": "yaml"}


class ZvizExecutor(RemotePythonExecutor):  # type: ignore[misc]  # (smolagents ships no type information)
    """Runs a CodeAgent's code in a zviz sandbox (a persistent interpreter)."""

    def __init__(self, additional_imports: list[str] | None = None, logger: Any = None, *,
                 policy: Policy | None = None, python: str = "python3", timeout: float | None = None,
                 allow_pickle: bool = False) -> None:
        super().__init__(list(additional_imports or ()), logger or AgentLogger(level=LogLevel.INFO),
                         allow_pickle=allow_pickle)
        self.policy = policy or Policy.python()
        self.timeout = timeout
        self._loop = Loop(SessionConfig(policy=self.policy, python=python))
        self._finalizer = weakref.finalize(self, self._loop.close)
        try:
            self.installed_packages = self.install_packages(self.additional_imports)
        except BaseException:
            self._finalizer()  # nothing outlives a failed construction
            raise

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        ex = self._loop.call(self._loop.session.run_python, code, self.timeout)
        logs = ex.stdout + (ex.stderr if ex.stderr else "")
        if ex.error is not None:
            if ex.error.name == self.FINAL_ANSWER_EXCEPTION:
                value = self._deserialize_final_answer(ex.error.value, self.allow_pickle)
                return CodeOutput(output=value, logs=logs, is_final_answer=True)
            raise AgentError(f"{logs}\nExecuting code yielded an error:\n{ex.error.name}\n{ex.error.value}\n"
                             f"{''.join(ex.error.traceback)}", self.logger)
        return CodeOutput(output=ex.result, logs=logs, is_final_answer=False)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Check that the modules import in the sandbox (an import probe);
        pip-install the missing ones only if the policy allows network access.
        A module still missing is an AgentError naming the fix."""
        modules = sorted({m.split(".")[0] for m in additional_imports if m.split(".")[0] not in ("", "*")})
        missing = self._ensure(modules)
        if missing:
            raise AgentError(
                f"the sandbox's Python cannot import {', '.join(missing)} (the agent's additional_imports) and its "
                "policy allows no network access to install them: give the executor an interpreter that has "
                "them (ZvizExecutor(python=f'{venv}/bin/python', policy=Policy.python().with_paths("
                "read_only=[venv]))), or drop them from additional_authorized_imports", self.logger)
        return modules

    def send_tools(self, tools: dict[str, Any]) -> None:
        """As RemotePythonExecutor.send_tools, but the tools' requirements are
        probed, not installed: a missing one is logged (a tool may import it
        lazily, inside a try), and using it is the agent's ImportError."""
        if "final_answer" in tools:
            self._patch_final_answer_with_exception(tools["final_answer"])
        wanted = {_PIP_TO_MODULE.get(p, p) for t in tools.values() for p in t.to_dict()["requirements"]}
        wanted -= {"smolagents", *self.installed_packages}
        missing = self._ensure(sorted(wanted))
        self.installed_packages += sorted(wanted - set(missing))
        if missing:
            self.logger.log(f"zviz: the sandbox cannot import {', '.join(missing)} (tool requirements)",
                            level=LogLevel.INFO)
        code = _guard_imports(get_tools_definition_code(tools), set(missing))
        if code:
            self.logger.log(self.run_code_raise_errors(code).logs)

    def _ensure(self, modules: list[str]) -> list[str]:
        """The modules the sandbox cannot import, after a pip install if the policy allows the network."""
        if not modules:
            return []
        missing = self._probe(modules)
        if missing and self.policy.net.mode in ("allow", "domains"):  # egress (docs/network.md)
            r = self._loop.call(self._loop.session.run_command,
                                [self._loop.session.config.python, "-m", "pip", "install", "--user", "-q", *missing],
                                None, None)
            if r.status != 0:
                self.logger.log(f"zviz: pip install {' '.join(missing)} failed in the sandbox (status {r.status}): "
                                f"{r.stderr.decode(errors='replace')[-2000:]}", level=LogLevel.INFO)
            missing = self._probe(missing)
        return missing

    def _probe(self, modules: list[str]) -> list[str]:
        ex = self._loop.call(self._loop.session.run_python, "import importlib.util, json\nprint(json.dumps(["
                             f"m for m in {modules!r} if importlib.util.find_spec(m) is None]))", None)
        if ex.error is not None:
            raise AgentError(f"the import probe failed in the sandbox: {ex.error.name}: {ex.error.value}", self.logger)
        missing: list[str] = json.loads(ex.stdout)
        return missing

    def cleanup(self) -> None:
        """Close the sandbox and its event-loop thread."""
        self._finalizer()

    def delete(self) -> None:
        self.cleanup()
