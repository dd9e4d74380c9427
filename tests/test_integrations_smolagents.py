"""zviz.integrations.smolagents end to end: a CodeAgent with a scripted model
(canned code, no LLM service) runs its steps in a zviz sandbox."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("smolagents", reason="the smolagents extra (pip install 'zviz[smolagents]')")

from smolagents import CodeAgent, tool
from smolagents.models import ChatMessage, MessageRole, Model
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.utils import AgentError

import zviz
from zviz.integrations.smolagents import ZvizExecutor

from .test_mcp import processes_with


@tool
def add_one(n: int) -> int:
    """Adds one.

    Args:
        n: the number.
    """
    return n + 1


class Scripted(Model):
    """Answers each step with the next canned code block."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.steps = steps
        self.seen: list[str] = []

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        self.seen.append(str(messages[-1].content if hasattr(messages[-1], "content") else messages[-1]))
        code = self.steps.pop(0)
        return ChatMessage(role=MessageRole.ASSISTANT, content=f"Thought: next step.\n<code>\n{code}\n</code>")


def test_code_agent_runs_in_the_sandbox():
    marker = f"{9000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    model = Scripted([
        # a tool sent with send_tools, a variable sent with send_variables, the host is not here
        f"import os, subprocess\np = subprocess.Popen(['sleep', '{marker}'])\n"
        "x = add_one(41)\nprint('x is', x, 'greeting', greeting, 'cwd', os.getcwd())",
        "1 / 0",  # an error: the agent sees it and goes on
        f"final_answer({{'x': x, 'sees_host_file': os.path.exists({__file__!r}), 'pair': (1, 2)}})",
    ])
    executor = ZvizExecutor(policy=zviz.Policy.python(), logger=AgentLogger(level=LogLevel.OFF))
    agent = CodeAgent(tools=[add_one], model=model, executor=executor, verbosity_level=LogLevel.OFF)
    try:
        out = agent.run("compute", additional_args={"greeting": "hello"})
        assert processes_with(f"sleep {marker}")  # the agent's code ran in the sandbox, which is still open
    finally:
        agent.cleanup()
    assert out == {"x": 42, "sees_host_file": False, "pair": (1, 2)}  # decoded from JSON, tuples kept
    assert os.path.exists(__file__)
    steps = [s for s in agent.memory.steps if getattr(s, "observations", None) or getattr(s, "error", None)]
    assert "x is 42 greeting hello cwd /workspace" in steps[0].observations
    assert "ZeroDivisionError" in str(steps[1].error)
    assert not processes_with(f"sleep {marker}")  # cleanup closed the sandbox


def test_packages_are_probed_not_installed():
    logger = AgentLogger(level=LogLevel.OFF)
    ex = ZvizExecutor(["json", "collections.*"], logger=logger)  # the stdlib: present
    try:
        assert ex.installed_packages == ["collections", "json"]
    finally:
        ex.cleanup()
    with pytest.raises(AgentError, match=r"cannot import zviz_no_such_module.*no network access"):
        ZvizExecutor(["zviz_no_such_module", "json"], logger=logger)
