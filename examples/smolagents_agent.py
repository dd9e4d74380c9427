"""smolagents: a CodeAgent whose code runs in a zviz sandbox
(zviz.integrations.smolagents.ZvizExecutor).

The model here is a script (canned code for each step), so the example runs
without an LLM service; with a real one, pass e.g. InferenceClientModel().

    pip install 'zviz[smolagents]'
"""

from __future__ import annotations

from typing import Any, ClassVar

from smolagents import CodeAgent, tool
from smolagents.models import ChatMessage, MessageRole, Model
from smolagents.monitoring import AgentLogger, LogLevel

import zviz
from zviz.integrations.smolagents import ZvizExecutor


@tool
def celsius(fahrenheit: float) -> float:
    """Converts Fahrenheit to Celsius.

    Args:
        fahrenheit: the temperature in degrees Fahrenheit.
    """
    return round((fahrenheit - 32) * 5 / 9, 1)


class Scripted(Model):
    STEPS: ClassVar[list[str]] = [
        "import os\nc = celsius(temp_f)\nprint('cwd', os.getcwd(), 'celsius', c)",  # a tool, a variable
        "final_answer({'celsius': c})",
    ]

    def generate(self, messages: Any, stop_sequences: Any = None, response_format: Any = None,
                 tools_to_call_from: Any = None, **kwargs: Any) -> ChatMessage:
        code = self.STEPS.pop(0)
        return ChatMessage(role=MessageRole.ASSISTANT, content=f"Thought: next.\n<code>\n{code}\n</code>")


def main() -> None:
    executor = ZvizExecutor(policy=zviz.Policy.python(), logger=AgentLogger(level=LogLevel.OFF))
    agent = CodeAgent(tools=[celsius], model=Scripted(model_id="scripted"), executor=executor,
                      verbosity_level=LogLevel.OFF)
    try:
        answer = agent.run("What is 98.6 F in Celsius?", additional_args={"temp_f": 98.6})
        print("logs:", agent.memory.steps[1].observations.splitlines()[1])
        print("answer:", answer)
    finally:
        agent.cleanup()  # closes the sandbox


if __name__ == "__main__":
    main()
