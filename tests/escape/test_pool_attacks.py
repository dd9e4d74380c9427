"""A pooled sandbox is made before anyone asks for it (zviz/_pool.py), and so
reads the host earlier than a fresh one would: the directories its policy
lists (the stage binds the inode a path resolves to when it is made), and in
`allow` mode the addresses of the allowed names. When the host changes
between then and the take, the sandbox handed out must be what a fresh one
would be, not a view of the host as it was. Evidence: what the sandbox reads
and which host listener it reaches."""

from __future__ import annotations

import os
import socket

import anyio
import pytest

import zviz
from zviz import _pool

from ..test_pool import _filled

pytestmark = [pytest.mark.filterwarnings("ignore::zviz.ZvizWarning"), pytest.mark.trio]


@pytest.fixture
def pool_size():
    yield zviz.set_pool_size
    zviz.set_pool_size(None)


async def test_a_listed_path_repointed_after_the_pool_made_its_sandbox(pool_size, tmp_path):
    """The caller lists `data` (a link to `v1`, which holds a secret), then
    re-points it to `v2` (the secret's directory is no longer meant to be
    shown) and opens a sandbox of the same policy. Before: the pooled
    sandbox, bound while `data` was `v1`, read the secret. Now it is not
    handed out (it is closed) and the caller gets a sandbox of `v2`."""
    pool_size(1)
    for v, text in (("v1", "OLD-SECRET"), ("v2", "new")):
        (tmp_path / v).mkdir()
        (tmp_path / v / "f.txt").write_text(text)
    os.chmod(tmp_path, 0o755)
    for v in ("v1", "v2"):
        os.chmod(tmp_path / v, 0o755)
        os.chmod(tmp_path / v / "f.txt", 0o644)
    data = tmp_path / "data"
    data.symlink_to(tmp_path / "v1")
    policy = zviz.Policy.shell().with_paths(read_only=[str(data)])
    async with zviz.open_sandbox(policy) as sb:
        assert (await sb.run(["cat", f"{data}/f.txt"])).stdout == b"OLD-SECRET"
    (pooled,) = await _filled(policy, 1)
    tmp = tmp_path / "data.new"
    tmp.symlink_to(tmp_path / "v2")
    os.replace(tmp, data)
    async with zviz.open_sandbox(policy) as sb:
        r = await sb.run(["cat", f"{data}/f.txt"])
        was_pooled = sb is pooled
    assert r.stdout == b"new", r  # (before: b"OLD-SECRET")
    assert not was_pooled
    # and the same directory replaced in place (renamed away, a new one made)
    (refill,) = await _filled(policy, 1)
    os.rename(tmp_path / "v2", tmp_path / "v2.old")
    (tmp_path / "v2").mkdir(mode=0o755)
    (tmp_path / "v2" / "f.txt").write_text("newer")
    os.chmod(tmp_path / "v2" / "f.txt", 0o644)
    async with zviz.open_sandbox(policy) as sb:
        assert sb is not refill
        assert (await sb.run(["cat", f"{data}/f.txt"])).stdout == b"newer"
    # unchanged host: the pool serves (the check costs no hit)
    (again,) = await _filled(policy, 1)
    async with zviz.open_sandbox(policy) as sb:
        assert sb is again


async def test_an_allowed_name_resolved_again_for_the_caller(pool_size, monkeypatch):
    """`net.mode = "allow"` with a name: resolved once when a sandbox is
    made. The name moves from 127.0.0.2 to 127.0.0.3 after a first sandbox
    of the policy, while the pool has had time to make the next one. Before:
    the pooled sandbox still reached the old address and was refused the
    new one (a fresh sandbox does the opposite). Now such a policy is never
    pre-started (a take would have to look the name up again, on the loop)."""
    pool_size(1)
    addr = {"now": "127.0.0.2"}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kw):
        if host == "pool-name.zviz.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr["now"], port))]
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    listeners = {}
    for ip in ("127.0.0.2", "127.0.0.3"):
        s = socket.socket()
        s.bind((ip, 0))
        s.listen(8)
        listeners[ip] = s
    port2, port3 = listeners["127.0.0.2"].getsockname()[1], listeners["127.0.0.3"].getsockname()[1]
    if port2 != port3:  # one port for both, so one allowlist entry names either
        listeners["127.0.0.3"].close()
        s = socket.socket()
        try:
            s.bind(("127.0.0.3", port2))
        except OSError:
            pytest.skip("no common free port on 127.0.0.2 and .3")
        s.listen(8)
        listeners["127.0.0.3"] = s
    port = port2
    policy = zviz.Policy.python(net=zviz.Network(mode="allow", allow=[zviz.Endpoint(host="pool-name.zviz.test",
                                                                                    port=port)]))
    probe = ("import socket\nfor ip in ('127.0.0.2', '127.0.0.3'):\n    s = socket.socket()\n    try:\n"
             f"        s.connect((ip, {port})); print(ip, 'ok')\n    except OSError as e: print(ip, e.errno)\n")
    try:
        async with zviz.open_sandbox(policy):
            pass
        pool = _pool.current()
        assert pool is not None
        made = pool.made
        await anyio.sleep(0.5)  # (idle: time enough to pre-start one)
        assert pool.made == made and not pool.ready.get(policy)
        addr["now"] = "127.0.0.3"
        async with zviz.open_sandbox(policy) as sb:
            r = await sb.run(["python3", "-c", probe])
        out = r.stdout.decode()
        assert "127.0.0.3 ok" in out and "127.0.0.2 ok" not in out, out
    finally:
        for s in listeners.values():
            s.close()
