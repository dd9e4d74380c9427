"""A hostile code context: the cell takes the driver's control socket and
writes garbage, a huge frame, an endless stream of frames, forged replies, or
closes it. The host must mark the context broken (CodeContextError) within
bounded time and memory, kill its process, and never raise anything else nor
hang; a restart() gives a working context again.

Host-side evidence: the exception and its message, the elapsed time, the
host's peak memory growth (ru_maxrss), and the context's process gone from
the host's /proc."""

import resource
import struct
import time

import anyio
import pytest

import zviz
from zviz import CodeContextError, Policy

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


# The cell finds the channel the way any code in the process could.
SOCK = "import os, struct, json\nS = display.__globals__['S'].ctrl\nseq = display.__globals__['S'].seq\n"


def frame(obj, blob=b""):
    import json

    js = json.dumps(obj).encode()
    return struct.pack(">II", len(js), len(blob)) + js + blob


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # gone between the open and the read
        return True


ATTACKS = {
    "garbage": "S.sendall(b'\\x00\\x00\\x00\\x08\\x00\\x00\\x00\\x00not json')\nimport time; time.sleep(30)",
    "huge-header": "S.sendall(struct.pack('>II', 0xFFFFFFF0, 0xFFFFFFF0))\nimport time; time.sleep(30)",
    "huge-json": "S.sendall(struct.pack('>II', 64 * 1024**2, 0) + b'[' * 65536)\nimport time; time.sleep(30)",
    "deep-json": ("body = b'{\"t\":\"display\",\"seq\":%d,\"data\":{\"application/json\":' % seq"
                  " + b'[' * 5000 + b']' * 5000 + b'}}'\n"
                  "S.sendall(struct.pack('>II', len(body), 0) + body)\nimport time; time.sleep(30)"),
    "not-an-object": "S.sendall(struct.pack('>II', 2, 0) + b'[]')\nimport time; time.sleep(30)",
    "unknown-type": "body = json.dumps({'t': 'pickle', 'seq': seq}).encode()\n"
                    "S.sendall(struct.pack('>II', len(body), 0) + body)\nimport time; time.sleep(30)",
    "bad-done": "body = json.dumps({'t': 'done', 'seq': seq, 'result': 5, 'error': None,"
                " 'interrupted': False}).encode()\n"
                "S.sendall(struct.pack('>II', len(body), 0) + body)\nimport time; time.sleep(30)",
    "blob-as-text": "body = json.dumps({'t': 'display', 'seq': seq, 'data': {'image/png': 'AAAA'}}).encode()\n"
                    "S.sendall(struct.pack('>II', len(body), 0) + body)\nimport time; time.sleep(30)",
    "blob-mismatch": "body = json.dumps({'t': 'display', 'seq': seq, 'data': {},"
                     " 'blobs': [['image/png', 10]]}).encode()\n"
                     "S.sendall(struct.pack('>II', len(body), 3) + body + b'abc')\nimport time; time.sleep(30)",
    "endless-frames": "body = json.dumps({'t': 'display', 'seq': seq, 'data': {'text/plain': 'x'}}).encode()\n"
                      "f = struct.pack('>II', len(body), 0) + body\nwhile True: S.sendall(f * 100)",
    "closed-channel": "import socket\nS.shutdown(socket.SHUT_RDWR)\nimport time; time.sleep(30)",
    # half a frame, then silence: the cell's timeout interrupts it, and its
    # "done" lands inside the half frame
    "partial-frame": "S.sendall(struct.pack('>II', 100, 0) + b'{\"t\"')\nimport time; time.sleep(30)",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_a_hostile_driver_breaks_only_its_context(attack):
    async with (zviz.open_sandbox(Policy.python()) as sb, sb.code_context(timeout=20) as ctx,
                sb.code_context() as bystander):
        await bystander.run("kept = 1")
        await ctx.run("x = 1")
        pid = ctx.pid
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.monotonic()
        with pytest.raises(CodeContextError, match=r"broken|bad frame|closed|frames") as info:
            await ctx.run(SOCK + ATTACKS[attack], timeout=2 if attack == "partial-frame" else None)
        took = time.monotonic() - t
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert took < 10, took
        assert grew_mb < 64, grew_mb
        assert "restart()" in str(info.value)
        assert ctx.broken
        for _ in range(100):
            if gone(pid):
                break
            await anyio.sleep(0.02)
        assert gone(pid)
        with pytest.raises(CodeContextError, match="broken"):
            await ctx.run("1")
        assert await bystander.get_var("kept") == 1  # other contexts are not affected
        await ctx.restart()
        assert (await ctx.run("1 + 1")).result == "2"


async def test_a_forged_done_is_the_cells_own_business():
    # A cell may forge its own cell's end (it could print anything anyway);
    # the host neither breaks nor mixes that into another cell's result.
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        ex = await ctx.run(SOCK + "body = json.dumps({'t': 'done', 'seq': seq, 'result': {'text/plain': 'forged'},"
                           " 'error': None, 'interrupted': False}).encode()\n"
                           "S.sendall(struct.pack('>II', len(body), 0) + body)\nimport time; time.sleep(0.2)")
        assert ex.result == "forged"
        # the real "done" of that cell arrives late: it is not taken for the next cell's
        ex = await ctx.run("41 + 1")
        assert ex.result == "42"
        ex = await ctx.run(SOCK + "body = json.dumps({'t': 'done', 'seq': seq + 5,"
                           " 'result': {'text/plain': 'early'},"
                           " 'error': None, 'interrupted': False}).encode()\n"
                           "S.sendall(struct.pack('>II', len(body), 0) + body)\n'mine'")
        assert ex.result == "'mine'"


async def test_fds_sent_to_the_host_are_not_received(snapshot):
    async with zviz.open_sandbox(Policy.python()) as sb, sb.code_context() as ctx:
        await ctx.run("1")
        before = snapshot().fds
        ex = await ctx.run(SOCK + "import socket, array\n"
                           "body = json.dumps({'t': 'display', 'seq': seq, 'data': {'text/plain': 'hi'}}).encode()\n"
                           "S.sendmsg([struct.pack('>II', len(body), 0) + body],"
                           " [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [0, 1, 2] * 10))])\n'ok'")
        assert ex.result == "'ok'" and ex.display == ({"text/plain": "hi"},)
        assert snapshot().fds == before  # the kernel discarded them: nothing of theirs is open here
