"""Network escapes: host listeners (TCP, UDP, unix, abstract unix) must see
nothing; raw and packet sockets are refused."""

import os
import socket

import pytest


@pytest.fixture
def listeners(target):
    d, _ = target
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    path = os.path.join(d, "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    os.chmod(path, 0o777)
    unix.listen()
    abstract_name = "zviz-escape-" + os.path.basename(d)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    abstract.listen()
    socks = {"tcp": tcp, "udp": udp, "unix": unix, "abstract": abstract}
    for s in socks.values():
        s.setblocking(False)
    yield socks, path, abstract_name
    for s in socks.values():
        s.close()


def _saw_something(sock):
    try:
        if sock.type == socket.SOCK_DGRAM:
            sock.recv(100)
        else:
            sock.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_no_network_reaches_host_listeners(attack, listeners):
    socks, path, abstract_name = listeners
    port_tcp = socks["tcp"].getsockname()[1]
    port_udp = socks["udp"].getsockname()[1]
    r = attack("tcp", "127.0.0.1", str(port_tcp))
    assert "FAILED" in r["stdout"]
    attack("udp", "127.0.0.1", str(port_udp))
    r = attack("unix", path)
    assert "unix: FAILED" in r["stdout"]  # the path does not exist in the sandbox's root
    r = attack("abstract", abstract_name)
    assert "abstract: FAILED" in r["stdout"]  # Landlock scope (ABI 6+)
    for kind, s in socks.items():
        assert not _saw_something(s), f"host {kind} listener was reached"


def test_raw_and_packet_sockets_refused(attack):
    r = attack("raw")
    assert r["stdout"].count("FAILED") == 2
    r = attack("packet")
    assert r["stdout"].count("FAILED") == 2
    assert r["denials"].get("socket") == 2


def test_loopback_mode_is_a_private_loopback(attack, listeners):
    import zviz

    socks, _, _ = listeners
    port = socks["tcp"].getsockname()[1]
    r = attack("tcp", "127.0.0.1", str(port), policy=zviz.Policy.python(net=zviz.Network(mode="loopback")))
    assert "tcp connect: FAILED Connection refused" in r["stdout"]
    assert not _saw_something(socks["tcp"])


def test_allowlist_permits_only_listed_endpoints(attack, listeners):
    import zviz

    socks, _, _ = listeners
    port = socks["tcp"].getsockname()[1]
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    other.setblocking(False)
    try:
        pol = zviz.Policy.python(net=zviz.Network(mode="allow", allow=[f"127.0.0.1:{port}"]))
        r = attack("tcp", "127.0.0.1", str(port), policy=pol)
        assert "tcp connect: OK 0" in r["stdout"], r
        assert "tcp fastopen: FAILED" in r["stdout"]  # sendto(MSG_FASTOPEN) would connect unseen
        assert _saw_something(socks["tcp"])
        r = attack("tcp", "127.0.0.1", str(other.getsockname()[1]), policy=pol)
        assert "tcp connect: FAILED" in r["stdout"]
        assert not _saw_something(other)
        r = attack("udp", "127.0.0.1", str(socks["udp"].getsockname()[1]), policy=pol)
        assert not _saw_something(socks["udp"])
    finally:
        other.close()
