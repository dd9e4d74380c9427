"""net.mode = "domains": real clients in a sandbox reach allowed names through
the egress proxy (pip, npm, curl, git, urllib, pip's vendored requests), and
the proxy's events, statistics and run-time rules. Every server is on
127.0.0.1, reached by a name pinned with `hosts=` (nothing leaves the machine)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import trio

import zviz

from .conftest import record_loop_gaps
from .egress_servers import TlsEcho, package_index, self_signed

SYS_PY = "/usr/bin/python3"



def _policy(port: int, names=("pkgs.test",), **kw) -> zviz.Policy:
    net = zviz.Network.domains(list(names), ports=(80, 443, port), hosts={"pkgs.test": "127.0.0.1"}, **kw)
    return zviz.Policy.shell(net=net, limits=zviz.Limits(wall_s=60))


def _egress(sb, allowed=None):
    return [e for e in sb.events_so_far() if isinstance(e, zviz.EgressEvent)
            and (allowed is None or e.allowed == allowed)]


@pytest.fixture
def index():
    with package_index() as srv:
        yield srv


VENV_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-sandbox", "bin",
                       "python")


def _pip_python() -> str | None:
    """An interpreter with pip the sandbox can run: the system's, else .venv-sandbox's
    (scripts/setup-testvenv.sh; a venv always has pip)."""
    for py in (SYS_PY, VENV_PY):
        if os.path.exists(py) and subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return py
    return None


@pytest.mark.trio
@pytest.mark.skipif(_pip_python() is None, reason="no python with pip: apt-get install python3-pip, or run "
                    "scripts/setup-testvenv.sh")
async def test_pip_install_from_an_allowed_index(index):
    py = _pip_python()
    assert py is not None
    pol = _policy(index.port)
    if py == VENV_PY:
        pol = pol.with_paths(read_only=[os.path.dirname(os.path.dirname(VENV_PY))])
    async with zviz.open_sandbox(pol) as sb:
        r = await sb.run([py, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                          "--target", "site", "--trusted-host", "pkgs.test",
                          "--index-url", f"http://pkgs.test:{index.port}/simple", "tinypkg"])
        assert r.status == 0, r.stderr.decode()[-2000:]
        r2 = await sb.run([py, "-c", "import sys; sys.path.insert(0, 'site'); import tinypkg; "
                           "print(tinypkg.VALUE)"])
        assert r2.stdout == b"42\n"
        ok = _egress(sb, allowed=True)
        assert ok and all(e.domain == "pkgs.test" and e.port == index.port for e in ok)
        stats = sb.statistics().egress
        assert stats.allowed == len(ok) and stats.denied == 0
        assert stats.domains["pkgs.test"].bytes_down > 500  # the index pages and the wheel
    assert any(p.startswith("/files/tinypkg") for _, p, _ in index.requests)


@pytest.mark.trio
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (apt-get install npm)")
async def test_npm_install_from_an_allowed_registry(index):
    await npm_install(_policy(index.port).net, index)


async def npm_install(net: zviz.Network, index) -> None:
    """npm install tinynpm from the test registry, in a sandbox with `net` (either way)."""
    pol = zviz.Policy.shell(net=net, limits=zviz.Limits(wall_s=90, memory=None))
    async with zviz.open_sandbox(pol) as sb:
        await sb.write_file("package.json", b'{"name": "app", "version": "1.0.0"}')
        r = await sb.run(["npm", "install", "--no-audit", "--no-fund", "--no-update-notifier",
                          f"--registry=http://pkgs.test:{index.port}/", "tinynpm"], timeout=90)
        assert r.status == 0, (r.stdout + r.stderr).decode()[-2000:]
        r2 = await sb.run(["node", "-e", "console.log(require('tinynpm'))"])
        assert r2.stdout == b"42\n", r2.stderr
    assert ("GET", "/tinynpm/-/tinynpm-1.0.0.tgz") in {(m, p) for m, p, _ in index.requests}


@pytest.mark.trio
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_allowed_and_refused(index):
    async with zviz.open_sandbox(_policy(index.port)) as sb:
        r = await sb.run(["curl", "-sS", "-m", "10", f"http://pkgs.test:{index.port}/hello"])
        assert r.stdout == b"hello from pkgs.test\n", r.stderr
        r = await sb.run(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://elsewhere.test:{index.port}/hello"])
        assert r.stdout == b"403"
        denied = _egress(sb, allowed=False)
        assert [(e.domain, e.code) for e in denied] == [("elsewhere.test", "not-allowed")]
        assert "--allow-domain elsewhere.test" in denied[0].reason
    assert [h for _, _, h in index.requests] == [f"pkgs.test:{index.port}"]


@pytest.mark.trio
async def test_urllib_and_requests_style_clients(index):
    code = (f"import urllib.request; print(urllib.request.urlopen('http://pkgs.test:{index.port}/hello', "
            "timeout=10).read().decode(), end='')\n"
            "try:\n    from pip._vendor import requests\nexcept ImportError:\n    print('no requests')\n"
            f"else:\n    print(requests.get('http://pkgs.test:{index.port}/hello', timeout=10).text, end='')\n")
    async with zviz.open_sandbox(_policy(index.port)) as sb:
        r = await sb.run([SYS_PY, "-c", code])
        assert r.status == 0, r.stderr.decode()
        assert r.stdout.startswith(b"hello from pkgs.test\n")
        if b"no requests" not in r.stdout:
            assert r.stdout == b"hello from pkgs.test\n" * 2


@pytest.mark.trio
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_git_clone_over_https(tmp_path):
    """git clone https://pkgs.test:PORT/repo.git through CONNECT: a dumb-HTTP
    git repository behind a TLS server the test made (cert by openssl)."""
    await git_clone(tmp_path, "proxy", {"connect"})


async def git_clone(tmp_path, way: str, protocols: set[str]) -> None:
    """Clone a repository the test serves over HTTPS in a sandbox of `way`;
    the connections' events have `protocols`."""
    pair = self_signed(str(tmp_path), "pkgs.test")
    if pair is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    repo = tmp_path / "src"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README").write_text("cloned through zviz\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(repo), "add", "README"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "one"], check=True, env=env)
    bare = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    import http.server
    import ssl
    import threading

    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pair)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        net = zviz.Network.domains(["pkgs.test"], ports=[port], hosts={"pkgs.test": "127.0.0.1"}, way=way)
        pol = zviz.Policy.shell(net=net, limits=zviz.Limits(wall_s=60)).with_paths(read_only=[pair[0]])
        async with zviz.open_sandbox(pol) as sb:
            r = await sb.run(["git", "-c", f"http.sslCAInfo={pair[0]}", "clone", "-q",
                              f"https://pkgs.test:{port}/repo.git", "out"])
            assert r.status == 0, r.stderr.decode()
            assert await sb.read_file("out/README") == b"cloned through zviz\n"
            for _ in range(100):  # (a direct connection's event comes when the kernel frees its socket)
                if _egress(sb, allowed=True):
                    break
                await trio.sleep(0.02)
            assert {e.protocol for e in _egress(sb, allowed=True)} == protocols
            assert not _egress(sb, allowed=False)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.trio
async def test_tls_through_connect_with_matching_sni(tmp_path):
    pair = self_signed(str(tmp_path), "pkgs.test")
    if pair is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    srv = TlsEcho(*pair)
    code = f"""
import socket, ssl
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"CONNECT pkgs.test:{srv.port} HTTP/1.1\\r\\nHost: pkgs.test:{srv.port}\\r\\n\\r\\n")
assert s.recv(100).startswith(b"HTTP/1.1 200")
ctx = ssl.create_default_context(cafile={pair[0]!r})
t = ctx.wrap_socket(s, server_hostname="pkgs.test")
t.sendall(b"hi")
print(t.recv(100).decode())
"""
    try:
        pol = zviz.Policy.python(net=zviz.Network.domains(["pkgs.test"], ports=[srv.port],
                                                          hosts={"pkgs.test": "127.0.0.1"})).with_paths(
            read_only=[pair[0]])
        async with zviz.open_sandbox(pol) as sb:
            r = await sb.run(["python3", "-c", code])
            assert r.stdout == b"tls hello pkgs.test\n", r.stderr.decode()
    finally:
        srv.close()
    assert srv.seen == ["pkgs.test"]


@pytest.mark.trio
async def test_set_network_changes_the_rules_of_a_running_sandbox(index):
    url = f"http://pkgs.test:{index.port}/hello"
    get = [SYS_PY, "-c", f"import urllib.request as u\ntry:\n print(u.urlopen({url!r}, timeout=10).status)\n"
           "except Exception as e:\n print(getattr(e, 'code', e))"]
    async with zviz.open_sandbox(_policy(index.port)) as sb:
        assert (await sb.run(get)).stdout == b"200\n"
        await sb.set_network(zviz.Network.domains(["other.test"], ports=[index.port],
                                                  hosts={"pkgs.test": "127.0.0.1"}))
        assert (await sb.run(get)).stdout == b"403\n"
        assert sb.policy.net.allow_domains == ("other.test",)
        await sb.set_network(zviz.Network.domains(["*.test"], deny=["pkgs.test"], ports=[index.port],
                                                  hosts={"pkgs.test": "127.0.0.1"}))
        assert (await sb.run(get)).stdout == b"403\n"
        assert _egress(sb)[-1].code == "denied"
        await sb.set_network(zviz.Network.domains(["*.test", "pkgs.test"], ports=[index.port],
                                                  hosts={"pkgs.test": "127.0.0.1"}))
        assert (await sb.run(get)).stdout == b"200\n"
        with pytest.raises(zviz.PolicyError, match="mode"):
            await sb.set_network(zviz.Network(mode="none"))
        with pytest.raises(TypeError):
            await sb.set_network("pkgs.test")  # type: ignore[arg-type]
    assert len(index.requests) == 2


@pytest.mark.trio
async def test_program_that_ignores_the_proxy_gets_a_fast_denial_with_the_fix(proxy_way):
    """A raw connect fails at once (supervised: EACCES; inside: ECONNREFUSED,
    every destination is the sandbox's own loopback) and is an event naming
    the fix either way. A program's own DNS lookup (a UDP socket) is refused
    with that event either way."""
    code = ("import socket, time\nt = time.monotonic()\ns = socket.socket()\ns.settimeout(30)\n"
            "try:\n    s.connect(('93.184.216.34', 443))\nexcept OSError as e:\n"
            "    print(e.errno, round(time.monotonic() - t, 3))\n"
            "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nexcept OSError as e:\n    print(e.errno)\n")
    async with zviz.open_sandbox(zviz.Policy.python(net=zviz.Network.domains(["example.com"]))) as sb:
        r = await sb.run(["python3", "-c", code], timeout=20)
        err, took, udp = r.stdout.split()
        assert int(err) == (13 if proxy_way == "supervised" else 111) and float(took) < 2.0 and int(udp) == 13
        with trio.fail_after(5):  # (inside, the host reads the refused SYN in the proxy's task)
            while not [e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent) and e.syscall == "connect"]:
                await trio.sleep(0.01)
        denials = [e for e in sb.events_so_far() if isinstance(e, zviz.DenialEvent)]
        (sock,) = [e for e in denials if e.syscall == "socket"]
        assert "type=2" in sock.detail and "HTTPS_PROXY" in sock.detail and "--allow-domain" in sock.detail
        connects = [e for e in denials if e.syscall == "connect"]
        (ev,) = connects
        assert "93.184.216.34:443" in ev.detail and "HTTPS_PROXY" in ev.detail and "--allow-domain" in ev.detail
        assert sb.statistics().denials["connect"] == 1
        r = await sb.run(["python3", "-c", "import os; print(os.environ['HTTPS_PROXY'], os.environ['NO_PROXY'])"])
        assert r.stdout == b"http://127.0.0.1:3128 localhost,127.0.0.1,::1\n"


@pytest.mark.trio
async def test_toml_and_statistics_shape():
    pol = zviz.Policy.from_toml('preset = "python"\n[net]\nmode = "domains"\nallow_domains = ["PyPI.org.", '
                                '"*.files.example"]\ndeny_domains = ["bad.files.example"]\nports = [443]\n'
                                '[net.hosts]\n"pkgs.test" = "127.0.0.1"\n')
    assert pol.net.allow_domains == ("pypi.org", "*.files.example")
    assert zviz.Policy.from_toml(pol.to_toml()) == pol
    async with zviz.open_sandbox(pol) as sb:
        st = sb.statistics().egress
        assert st.connections == 0 and st.active == 0
    async with zviz.open_sandbox(zviz.Policy.python()) as sb:
        assert sb.statistics().egress is None


def test_cli_domain_flags(index, tmp_path):
    """zviz run --allow-domain NAME[:PORT] --deny-domain NAME --add-host NAME:IP (on asyncio, as the CLI runs)."""
    import sys

    def zviz(*args):
        return subprocess.run([sys.executable, "-m", "zviz._cli", "run", *args], capture_output=True, timeout=60)

    url = f"http://pkgs.test:{index.port}/hello"
    get = ["--", "python3", "-c", f"import urllib.request as u\ntry:\n print(u.urlopen({url!r}, timeout=10).read())\n"
           "except Exception as e:\n print(getattr(e, 'code', e))"]
    r = zviz("--allow-domain", f"pkgs.test:{index.port}", "--add-host", "pkgs.test:127.0.0.1", *get)
    assert r.stdout == b"b'hello from pkgs.test\\n'\n", r.stderr
    assert b"egress http pkgs.test" in r.stderr and b"allowed" in r.stderr
    r = zviz("--allow-domain", "*.test", "--allow-domain", f"pkgs.test:{index.port}", "--deny-domain", "pkgs.test",
             "--add-host", "pkgs.test:127.0.0.1", *get)
    assert r.stdout == b"403\n" and b"matches the deny rule" in r.stderr
    local = ["--", "python3", "-c", "import urllib.request as u\ntry:\n u.urlopen("
             f"'http://localhost:{index.port}/hello', timeout=10)\nexcept Exception as e:\n print(e.code)"]
    r = zviz("--allow-domain", f"localhost:{index.port}", "--env", "NO_PROXY=", "--env", "no_proxy=", *local)
    assert r.stdout == b"403\n" and b"private-address" in r.stderr  # no pin: a loopback address is refused
    for bad in (["--add-host", "pkgs.test"], ["--add-host", "pkgs.test:nope", "--allow-domain", "pkgs.test"],
                ["--allow-domain", "1.2.3.4"], ["--allow-domain", "a.test", "--net", "loopback"]):
        r = zviz(*bad, "--", "true")
        assert r.returncode == 125 and b"Traceback" not in r.stderr, (bad, r.stderr)
    assert len(index.requests) == 1


@pytest.mark.trio
async def test_the_proxy_answers_on_ipv6_loopback_and_nonblocking_connects(index):
    code = f"""
import socket, select
for fam, host in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
    s = socket.socket(fam)
    s.setblocking(False)
    err = s.connect_ex((host, 3128))
    select.select([], [s], [], 10)
    s.setblocking(True)
    s.sendall(b"GET http://pkgs.test:{index.port}/hello HTTP/1.1\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(err, data.split(b"\\r\\n\\r\\n", 1)[1].decode(), end="")
"""
    async with zviz.open_sandbox(_policy(index.port)) as sb:
        r = await sb.run([SYS_PY, "-c", code])
        assert r.stdout == b"115 hello from pkgs.test\n115 hello from pkgs.test\n", r.stderr  # EINPROGRESS
        assert sb.statistics().egress.allowed == 2


@pytest.mark.trio
async def test_set_network_in_allow_mode_changes_the_endpoints(index):
    import socket as _socket

    other = _socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(4)
    port2 = other.getsockname()[1]
    code = ("import socket, sys\nfor p in sys.argv[1:]:\n    s = socket.socket()\n"
            "    print(s.connect_ex(('127.0.0.1', int(p))))\n")
    pol = zviz.Policy.python(net=zviz.Network(mode="allow", allow=[f"127.0.0.1:{index.port}"]))
    try:
        async with zviz.open_sandbox(pol) as sb:
            r = await sb.run(["python3", "-c", code, str(index.port), str(port2)])
            assert r.stdout == b"0\n13\n"
            await sb.set_network(zviz.Network(mode="allow", allow=[f"127.0.0.1:{port2}"]))
            r = await sb.run(["python3", "-c", code, str(index.port), str(port2)])
            assert r.stdout == b"13\n0\n"
            with pytest.raises(zviz.PolicyError):
                await sb.set_network(zviz.Network.domains(["a.test"]))
    finally:
        other.close()


def _slow_lookup(monkeypatch, seconds: float) -> None:
    """The host's resolver takes `seconds` for slow.test (then answers 127.0.0.1)."""
    import socket as _socket
    import time

    real = _socket.getaddrinfo

    def slow(host, *args, **kwargs):
        if host == "slow.test":
            time.sleep(seconds)
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(_socket, "getaddrinfo", slow)


@pytest.mark.trio
async def test_a_slow_name_lookup_stalls_no_other_sandbox(monkeypatch):
    """allow mode resolves its names when a sandbox opens and at set_network:
    a resolver that takes a second (or times out) holds up that call, in a
    worker thread, never the event loop that every other sandbox runs on."""
    _slow_lookup(monkeypatch, 1.0)
    gaps: list[float] = []

    pol = zviz.Policy.python(net=zviz.Network(mode="allow", allow=["slow.test:80"]))
    async with trio.open_nursery() as n:
        n.start_soon(record_loop_gaps, gaps, 0.01)
        await trio.sleep(0.05)
        t0 = trio.current_time()
        async with zviz.open_sandbox(pol) as sb:
            assert trio.current_time() - t0 >= 1.0  # (it did wait for the name)
            await sb.set_network(zviz.Network(mode="allow", allow=["slow.test:81"]))
            assert sb.statistics() is not None
        n.cancel_scope.cancel()
    assert max(gaps) < 0.5, max(gaps)  # the loop ran on (it stopped for 1 s per lookup before)


@pytest.mark.trio
async def test_the_last_set_network_stands_whichever_lookup_ends_first(monkeypatch):
    """Two set_network calls in allow mode, the first one's name slow to
    resolve: the second call's rules are the sandbox's when both are done
    (the first one's lookup ending last must not put its rules back)."""
    import socket as _socket

    _slow_lookup(monkeypatch, 0.5)
    listeners = []
    for _ in range(2):
        ls = _socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        listeners.append(ls)
    p1, p2 = (ls.getsockname()[1] for ls in listeners)
    code = ("import socket, sys\nfor p in sys.argv[1:]:\n    s = socket.socket()\n"
            "    print(s.connect_ex(('127.0.0.1', int(p))))\n")
    pol = zviz.Policy.python(net=zviz.Network(mode="allow", allow=["127.0.0.1:1"]))
    first = zviz.Network(mode="allow", allow=[f"slow.test:{p1}"])
    second = zviz.Network(mode="allow", allow=[f"127.0.0.1:{p2}"])
    try:
        async with zviz.open_sandbox(pol) as sb:
            async with trio.open_nursery() as n:
                n.start_soon(sb.set_network, first)
                await trio.sleep(0.05)  # (the first is in its lookup)
                await sb.set_network(second)
            assert sb.policy.net == second
            r = await sb.run(["python3", "-c", code, str(p1), str(p2)])
            assert r.stdout == b"13\n0\n", r.stdout  # the second call's rules: p2 only
    finally:
        for ls in listeners:
            ls.close()


def test_the_blocking_facade(index):
    """zviz.sync: the proxy runs on the sandbox's own loop thread; set_network blocks."""
    import zviz.sync

    get = [SYS_PY, "-c", "import urllib.request as u\ntry:\n print(u.urlopen("
           f"'http://pkgs.test:{index.port}/hello', timeout=10).status)\nexcept Exception as e:\n print(e.code)"]
    with zviz.sync.open_sandbox(_policy(index.port)) as sb:
        assert sb.run(get).stdout == b"200\n"
        sb.set_network(zviz.Network.domains(["other.test"], ports=[index.port]))
        assert sb.run(get).stdout == b"403\n"
        assert sb.statistics().egress.denied_by_code == {"not-allowed": 1}
