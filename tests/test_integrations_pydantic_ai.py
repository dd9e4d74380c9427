"""zviz.integrations.pydantic_ai end to end: an Agent driven by a scripted
FunctionModel (no LLM service) calls the toolset's tools in a sandbox."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("pydantic_ai", reason="the pydantic-ai extra (pip install 'zviz[pydantic-ai]')")

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from zviz.integrations.pydantic_ai import ZvizToolset

from .test_mcp import processes_with

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"  # pydantic-ai's agent runs on asyncio only (asyncio.create_task)


def scripted(marker: str):
    """A model that calls the tools in a fixed order, then answers with what it read back."""
    plan = [
        ToolCallPart("run_python", {"code": "import subprocess\nx = 6 * 7\nprint('hello')\n"
                                            f"p = subprocess.Popen(['sleep', '{marker}'])"}),
        ToolCallPart("run_python", {"code": "x + 1"}),  # the interpreter persists
        ToolCallPart("write_file", {"path": "out/a.txt", "content": "from the agent"}),
        ToolCallPart("run_command", {"command": ["cat", "out/a.txt"]}),
        ToolCallPart("list_files", {"path": "out"}),
        ToolCallPart("read_file", {"path": "missing.txt"}),  # a zviz error: the model sees it
    ]
    seen: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert {t.name for t in info.function_tools} == {"run_python", "run_command", "write_file", "read_file",
                                                         "list_files"}
        for part in messages[-1].parts:
            if isinstance(part, ToolReturnPart) or part.part_kind == "retry-prompt":
                seen.append(part.model_response_str())
        step = sum(isinstance(p, ToolCallPart) for m in messages for p in m.parts)
        if step < len(plan):
            return ModelResponse(parts=[plan[step]])
        return ModelResponse(parts=[TextPart(" | ".join(seen))])

    return model, seen


async def test_agent_runs_tools_in_one_sandbox_per_run():
    marker = f"{8000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    toolset = ZvizToolset()
    model, seen = scripted(marker)
    agent = Agent(FunctionModel(model), toolsets=[toolset])
    result = await agent.run("use the sandbox")
    assert "stdout:\nhello" in seen[0]
    assert "result: 43" in seen[1]
    assert "wrote 14 bytes to out/a.txt" in seen[2]
    assert "exit status 0" in seen[3] and "from the agent" in seen[3]
    assert "a.txt" in seen[4]
    assert "FileNotFoundError" in seen[5] and "missing.txt" in seen[5]
    assert result.output.count("|") == 5
    # the run ended: its sandbox (and the process started in it) is gone
    assert not processes_with(f"sleep {marker}")
    # a second run: a sandbox of its own (no variable x, no file)
    model2, seen2 = scripted(marker)
    agent2 = Agent(FunctionModel(lambda m, i: model2(m, i) if len(m) > 1 else ModelResponse(
        parts=[ToolCallPart("run_python", {"code": "import os\n('x' in dir(), os.path.exists('out'))"})])),
        toolsets=[toolset])
    await agent2.run("again")
    assert "result: (False, False)" in seen2[0]
