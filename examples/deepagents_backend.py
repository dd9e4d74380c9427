"""LangChain deep agents: a zviz sandbox as the agent's backend
(zviz.integrations.deepagents.ZvizSandbox): its execute tool and its file
tools run in the sandbox.

The model here is a script (langchain_core's fake chat model), so the example
runs without an LLM service; with a real one, pass e.g. "anthropic:claude-sonnet-4-5".

    pip install 'zviz[deepagents]'
"""

from __future__ import annotations

from typing import Any

from deepagents import create_deep_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage

import zviz
from zviz.integrations.deepagents import ZvizSandbox


class Scripted(GenericFakeChatModel):
    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:  # the script already knows the tools
        return self


def main() -> None:
    fib = "a, b = 0, 1\nfor _ in range(10):\n    a, b = b, a + b\nprint(a)\n"
    steps = iter([
        AIMessage(content="", tool_calls=[{"name": "write_file", "id": "1",
                                           "args": {"file_path": "/workspace/fib.py", "content": fib}}]),
        AIMessage(content="", tool_calls=[{"name": "execute", "id": "2", "args": {"command": "python3 fib.py"}}]),
        AIMessage(content="The 10th Fibonacci number is 55."),
    ])
    with ZvizSandbox(zviz.Policy.shell()) as backend:
        agent = create_deep_agent(model=Scripted(messages=steps), backend=backend)
        out = agent.invoke({"messages": [{"role": "user", "content": "Compute the 10th Fibonacci number."}]})
        for m in out["messages"]:
            if isinstance(m, ToolMessage):
                print(f"tool {m.name}:", str(m.content).strip().replace("\n", " "))
        print("answer:", out["messages"][-1].content)


if __name__ == "__main__":
    main()
