"""pydantic-ai: an agent with a sandbox (zviz.integrations.pydantic_ai).

The model here is a script (pydantic-ai's FunctionModel), so the example runs
without an LLM service; with a real one, pass e.g. "openai:gpt-4o" instead.

    pip install 'zviz[pydantic-ai]'
"""

from __future__ import annotations

import asyncio

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import zviz
from zviz.integrations.pydantic_ai import ZvizToolset

PLAN = [
    ToolCallPart("run_python", {"code": "data = [3, 1, 2]\nsorted(data)"}),
    ToolCallPart("run_python", {"code": "sum(data)"}),  # the interpreter persists for the run
    ToolCallPart("run_command", {"command": "uname -s"}),
]


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    done = sum(isinstance(p, ToolCallPart) for m in messages for p in m.parts)
    if done < len(PLAN):
        return ModelResponse(parts=[PLAN[done]])
    results = [p.model_response_str().replace("\n", " ") for m in messages for p in m.parts
               if isinstance(p, ToolReturnPart)]
    return ModelResponse(parts=[TextPart(" | ".join(results))])


async def main() -> None:
    agent = Agent(FunctionModel(scripted), toolsets=[ZvizToolset(zviz.Policy.shell())])
    result = await agent.run("Sort the data, add it up, and say which OS runs the code.")
    print("answer:", result.output)


if __name__ == "__main__":
    asyncio.run(main())
