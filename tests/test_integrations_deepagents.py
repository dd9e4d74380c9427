"""zviz.integrations.deepagents: the sandbox backend through deepagents' own
protocol methods, and a deep agent driven by a scripted chat model."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("deepagents", reason="the deepagents extra (pip install 'zviz[deepagents]')")

from deepagents.backends.protocol import SandboxBackendProtocol

from zviz.integrations.deepagents import ZvizSandbox


def test_backend_protocol_methods():
    with ZvizSandbox() as be:
        assert isinstance(be, SandboxBackendProtocol) and be.id.startswith("zviz-")
        r = be.execute("echo out; echo err >&2; pwd; exit 3")
        assert r.exit_code == 3 and r.output == "out\n/workspace\nerr\n"
        r = be.execute("sleep 5", timeout=1)
        assert r.exit_code == 124 and "timeout" in r.output
        assert be.write("/workspace/src/a.py", "x = 1\nprint('hi')\n").error is None
        assert be.read("/workspace/src/a.py").file_data["content"].splitlines() == ["x = 1", "print('hi')"]
        assert be.edit("/workspace/src/a.py", "x = 1", "x = 2").error is None
        assert be.execute("python3 /workspace/src/a.py && cat src/a.py").output == "hi\nx = 2\nprint('hi')\n"
        assert [e["path"] for e in be.ls("/workspace").entries] == ["/workspace/src"]
        assert [m["path"] for m in be.grep("print", "/workspace").matches] == ["/workspace/src/a.py"]
        assert [e["path"] for e in be.glob("**/*.py", "/workspace").matches] == ["/workspace/src/a.py"]
        up = be.upload_files([("/workspace/b.bin", b"\x00\xff"), ("/etc/zviz-no", b"x")])
        assert up[0].error is None and up[1].error == "permission_denied"
        down = be.download_files(["/workspace/b.bin", "/workspace/none", "/workspace/src"])
        assert down[0].content == b"\x00\xff"
        assert [d.error for d in down[1:]] == ["file_not_found", "is_directory"]
        # the host's files are not the sandbox's
        assert be.execute(f"cat {__file__}").exit_code != 0
        workdir = be._loop.call(be._loop.session.sandbox).workdir  # its host path
        assert os.path.isdir(workdir)
    assert not os.path.exists(workdir)  # close() closed the sandbox
    with pytest.raises(RuntimeError):  # and its event-loop thread
        be._loop.call(be._loop.session.sandbox)


def test_deep_agent_with_a_scripted_model():
    from deepagents import create_deep_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, ToolMessage

    class Scripted(GenericFakeChatModel):
        def bind_tools(self, tools, **kwargs):  # the agent binds its tools; the script knows them
            return self

    steps = iter([
        AIMessage(content="", tool_calls=[{"name": "write_file", "id": "1",
                                           "args": {"file_path": "/workspace/hello.py", "content": "print(6 * 7)\n"}}]),
        AIMessage(content="", tool_calls=[{"name": "execute", "id": "2", "args": {"command": "python3 hello.py"}}]),
        AIMessage(content="", tool_calls=[{"name": "read_file", "id": "3", "args": {"file_path": "/etc/shadow"}}]),
        AIMessage(content="done"),
    ])
    with ZvizSandbox() as backend:
        agent = create_deep_agent(model=Scripted(messages=steps), backend=backend)
        out = agent.invoke({"messages": [{"role": "user", "content": "run it"}]})
        tool_out = [m.content for m in out["messages"] if isinstance(m, ToolMessage)]
        assert "hello.py" in str(tool_out[0])
        assert "42" in str(tool_out[1])
        assert "Permission denied" in str(tool_out[2]) or "permission" in str(tool_out[2]).lower()
        assert out["messages"][-1].content == "done"
        assert backend.execute("cat hello.py").output == "print(6 * 7)\n"
