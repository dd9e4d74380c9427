"""Every example runs and says what it should."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECT = {
    "trio_snippet.py": ['stdout: {"mean": 3.875, "max": 9}', "exit: 0"],
    "asyncio_snippet.py": ["['0', '1', '4']"],
    "code_interpreter.py": ["stdout: rows 3 | result: [1, 2, 3]", "error: ZeroDivisionError - division by zero",
                            "interrupted: True | state kept, total = 6", "display: [['text/html', 'text/plain']]",
                            "fork: parent 6 | twin -1", "streamed: tick 0", "run_python: 'first' (False, False)"],
    "custom_policy.py": ["sum 4950", "write refused: Permission denied", "denials: {'ptrace': 1}"],
    "streaming_repl.py": ["answer 42", "repl exited with 0"],
    "mcp_tool_server.py": ["tools: list_files, read_file, reset, run_command, run_python, write_file",
                           "run_python: result: 42", "state kept: result: 43",
                           "run_command: exit status 0 stdout: hello from the client /workspace",
                           "error: True FileNotFoundError: No such file or directory: /workspace/nope.txt",
                           "after a cancellation: result: 42"],
    "pydantic_ai_agent.py": ["answer: result: [1, 2, 3] | result: 6 | exit status 0 stdout: Linux"],
    "smolagents_agent.py": ["logs: cwd /workspace celsius 37.0", "answer: {'celsius': 37.0}"],
    "deepagents_backend.py": ["tool execute: 55", "answer: The 10th Fibonacci number is 55."],
    "sync_executor.py": ["executor: 3", "threads: [0, 1, 4, 9]", "cwd: /"],
    "trace_and_tighten.py": ["same snippet, tight policy: {\"median\": 3}", "greedy snippet denied:", "'socket': 1"],
}


# examples of the optional integrations: the extra they need (CI installs them all)
NEEDS = {"mcp_tool_server.py": "mcp", "pydantic_ai_agent.py": "pydantic_ai", "smolagents_agent.py": "smolagents",
         "deepagents_backend.py": "deepagents"}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"the {NEEDS[name]} extra (docs/integrations.md)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for line in EXPECT[name]:
        assert line in r.stdout, r.stdout


# examples that need more than zviz, tested where that is set up
ELSEWHERE = {"jupyter_kernel.py": "tests/test_programs.py (builds the test venv)",
             "ray_farm.py": "tests/test_ray.py (the ray extra)"}


def test_every_example_is_tested():
    assert set(EXPECT) | set(ELSEWHERE) == {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
