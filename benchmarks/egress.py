#!/usr/bin/env python3
"""Egress by name (net.mode = "domains") against a direct connection, on
loopback, ratios from one run; both ways (net.way "proxy" and "direct") by
default, one after the other (`--way`). For the direct way the sandbox's
client connects by name: each connection's figure includes its DNS lookup
(zviz's DNS in the sandbox), which the host's direct client does not make.

    .venv/bin/python benchmarks/egress.py [--connects N] [--gigabytes G] [--idle N] [--supervised]

- set-up: N sequential (connect, one small HTTP request, response, close)
  cycles from one Python client, run bare on the host straight to the server
  ("direct") and inside a sandbox through the proxy ("proxied"); the figure
  is the median per-connection time, and the overhead their difference (the
  proxy's accept, parse, name check and upstream connect; with the proxy
  supervised rather than inside the sandbox's namespace, the seccomp
  notification of the connect too), with the host process's CPU per proxied connection
  (less sensitive to a loaded machine than the latency);
- bulk: one G GB response (default 1), read by the same client with a 1 MiB
  buffer, direct and proxied (os.splice through a pipe in the proxy), and
  the host process's CPU for it;
- TLS bulk: the same response over HTTPS (a self-signed certificate for
  bench.test made by `openssl` for the run), straight to the server and
  through the proxy's CONNECT tunnel (whose ClientHello the proxy checks),
  both clients run by the sandbox's own python3 (one OpenSSL);
- idle: the host process's CPU over 2 s while N domains-mode sandboxes sit
  open, each with one idle tunnel, per sandbox.
The server is a separate process (its CPU is not the proxy's), answering any
request head with a fixed body (or G GB for `/bulk`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import trio

import zviz

SERVER = textwrap.dedent(r'''
    import socket, ssl, sys, threading
    big = int(sys.argv[1])
    lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0)); lst.listen(1024)
    tls = socket.socket(); tls.bind(("127.0.0.1", 0)); tls.listen(64)  # the same answers over TLS
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    print(lst.getsockname()[1], tls.getsockname()[1], flush=True)
    chunk = b"x" * (1 << 20)
    def one(c, wrap=False):
        if wrap:
            try:
                c = ctx.wrap_socket(c, server_side=True)
            except (OSError, ssl.SSLError):
                c.close()
                return
        with c:
            head = b""
            while b"\r\n\r\n" not in head:
                d = c.recv(4096)
                if not d:
                    return
                head += d
            if b" /bulk" in head.split(b"\r\n", 1)[0]:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % big)
                left = big
                while left:
                    n = c.send(chunk[:min(len(chunk), left)])
                    left -= n
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    def tls_loop():
        while True:
            c, _ = tls.accept()
            threading.Thread(target=one, args=(c, True), daemon=True).start()
    threading.Thread(target=tls_loop, daemon=True).start()
    while True:
        c, _ = lst.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()
''')

CLIENT = textwrap.dedent(r'''
    import json, socket, ssl, sys, time
    mode, host, port, n, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    buf = bytearray(1 << 20)
    def once():
        if mode.startswith("tls-"):  # HTTPS: through the proxy's CONNECT tunnel (SNI checked) or straight
            if mode == "tls-proxy":
                s = socket.create_connection(("127.0.0.1", 3128))
                s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1)
                assert head.startswith(b"HTTP/1.1 200"), head
            elif mode == "tls-name":  # net.way = "direct": by name, through the sandbox's DNS, SNI checked
                s = socket.create_connection((host, port))
            else:
                s = socket.create_connection(("127.0.0.1", port))
            ctx = ssl.create_default_context(cafile=sys.argv[6])
            s = ctx.wrap_socket(s, server_hostname=host)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        elif mode == "proxy":
            s = socket.create_connection(("127.0.0.1", 3128))
            s.sendall(f"GET http://{host}:{port}{path} HTTP/1.1\r\n\r\n".encode())
        elif mode == "name":  # net.way = "direct": a lookup through the sandbox's DNS, then straight to it
            s = socket.create_connection((host, port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        else:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = 0
        while True:
            try:
                k = s.recv_into(buf)
            except ssl.SSLEOFError:  # (the server closes without close_notify)
                break
            if not k:
                break
            got += k
        s.close()
        return got
    times, total = [], 0
    for _ in range(n):
        t = time.perf_counter()
        total += once()
        times.append(time.perf_counter() - t)
    print(json.dumps({"times": times, "bytes": total}))
''')


def _policy(*ports: int, way: str = "proxy") -> zviz.Policy:
    net = zviz.Network.domains(["bench.test"], ports=ports, hosts={"bench.test": "127.0.0.1"}, way=way)
    return zviz.Policy.python(net=net, limits=zviz.Limits(wall_s=600))


async def _measure(a: argparse.Namespace, way: str, port: int, tls_port: int, cert: str,
                   big: int) -> dict[str, object]:
    """One way's figures (net.way): set-up, bulk, TLS bulk, idle."""
    out: dict[str, object] = {}
    async with zviz.open_sandbox(_policy(port, tls_port, way=way)) as sb:
        await sb.write_file("client.py", CLIENT)
        await sb.write_file("ca.pem", await trio.Path(cert).read_bytes())
        # the TLS rows run the sandbox's own python3 on both sides (one OpenSSL for both)
        inner = (await sb.run(["python3", "-c", "import sys; print(sys.executable)"])).stdout.decode().strip()
        host_python = inner if await trio.Path(inner).exists() else sys.executable

        async def proxied(n: int, path: str) -> dict:
            mode = "proxy" if way == "proxy" else "name"
            r = await sb.run(["python3", "client.py", mode, "bench.test", str(port), str(n), path], timeout=600)
            assert r.status == 0, r.stderr.decode()
            return json.loads(r.stdout)

        async def direct(n: int, path: str) -> dict:
            r = await trio.run_process([sys.executable, "-c", CLIENT, "direct", "bench.test", str(port), str(n),
                                        path], capture_stdout=True)
            return json.loads(r.stdout)

        # set-up, interleaved in blocks
        d_times: list[float] = []
        p_times: list[float] = []
        p_cpu = 0.0
        for _ in range(3):
            d_times += (await direct(a.connects // 3, "/small"))["times"][5:]
            c0 = time.process_time()
            p_times += (await proxied(a.connects // 3, "/small"))["times"][5:]
            p_cpu += time.process_time() - c0
        # the host process's CPU per proxied connection (supervisor + proxy; the run's own spawn included)
        out["setup_host_cpu_ms_per_connection"] = round(p_cpu / (3 * (a.connects // 3)) * 1e3, 3)
        d, p = statistics.median(d_times), statistics.median(p_times)
        out["setup_direct_ms"] = round(d * 1e3, 3)
        out["setup_proxied_ms"] = round(p * 1e3, 3)
        out["setup_overhead_ms"] = round((p - d) * 1e3, 3)
        # bulk
        bulk = {}
        bulk_cpu = 0.0
        for name, fn in (("direct", direct), ("proxied", proxied), ("direct2", direct), ("proxied2", proxied)):
            c0 = time.process_time()
            res = await fn(1, "/bulk")
            if name.startswith("proxied"):
                bulk_cpu += time.process_time() - c0
            assert res["bytes"] >= big, res["bytes"]
            bulk[name] = res["bytes"] / res["times"][0] / 1e6
        out["bulk_host_cpu_s_per_GB"] = round(bulk_cpu / 2 / (big / 1e9), 3)
        out["bulk_direct_MBps"] = round(max(bulk["direct"], bulk["direct2"]), 1)
        out["bulk_proxied_MBps"] = round(max(bulk["proxied"], bulk["proxied2"]), 1)
        out["bulk_ratio"] = round(out["bulk_proxied_MBps"] / out["bulk_direct_MBps"], 3)  # type: ignore[operator]
        # the same over HTTPS (CONNECT, the ClientHello's SNI checked), as pip and npm download
        tls = {}
        for name in ("direct", "proxied", "direct2", "proxied2"):
            if name.startswith("proxied"):
                r = await sb.run(["python3", "client.py", "tls-proxy", "bench.test", str(tls_port), "1", "/bulk",
                                  "ca.pem"], timeout=600)
                assert r.status == 0, r.stderr.decode()
                res = json.loads(r.stdout)
            else:
                done = await trio.run_process([host_python, "-c", CLIENT, "tls-direct", "bench.test",
                                               str(tls_port), "1", "/bulk", cert], capture_stdout=True)
                res = json.loads(done.stdout)
            assert res["bytes"] >= big, res["bytes"]
            tls[name] = res["bytes"] / res["times"][0] / 1e6
        out["tls_bulk_direct_MBps"] = round(max(tls["direct"], tls["direct2"]), 1)
        out["tls_bulk_proxied_MBps"] = round(max(tls["proxied"], tls["proxied2"]), 1)
        out["tls_bulk_ratio"] = round(out["tls_bulk_proxied_MBps"] / out["tls_bulk_direct_MBps"], 3)  # type: ignore[operator]
        st = sb.statistics().egress
        out["proxied_bytes_down"] = st.bytes_down if st is not None else None
        out["proxy_way"] = way if way == "direct" else "supervised" if sb.statistics().connects else "inside"
    # idle: N sandboxes, each holding one idle tunnel
    hold = ("import socket, time\ns = socket.create_connection(('127.0.0.1', 3128))\n"
            f"s.sendall(b'GET http://bench.test:{port}/small HTTP/1.1\\r\\n\\r\\n')\nprint('up', flush=True)\n"
            "time.sleep(60)\n")
    async with trio.open_nursery() as n:
        sbs = []
        procs = []
        for _ in range(a.idle):
            s = await zviz.Sandbox.create(_policy(port, way=way))
            sbs.append(s)
            proc = await s.start(["python3", "-c", hold])
            procs.append(proc)
            assert await proc.stdout.receive_some() == b"up\n"
        await trio.sleep(0.5)
        t0, c0 = time.perf_counter(), time.process_time()
        await trio.sleep(2.0)
        cpu = time.process_time() - c0
        wall = time.perf_counter() - t0
        out["idle_sandboxes"] = a.idle
        out["idle_cpu_ms_per_s_per_sandbox"] = round(cpu / wall * 1e3 / a.idle, 4)
        for s in sbs:
            await s.aclose()
        n.cancel_scope.cancel()

    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=300)
    ap.add_argument("--gigabytes", type=float, default=1.0)
    ap.add_argument("--idle", type=int, default=20)
    ap.add_argument("--supervised", action="store_true",
                    help="every connect supervised (the way without root), not the proxy inside the sandbox")
    ap.add_argument("--way", choices=("proxy", "direct", "both"), default="both",
                    help="net.way: zviz's proxy (the programs' proxy variables), direct (the sandbox's DNS and the "
                    "host's sockets, first flights checked: root), or both, one after the other (default)")
    a = ap.parse_args()
    if a.supervised:
        from zviz import _egressproto

        _egressproto.LISTEN_INSIDE = False
    big = int(a.gigabytes * (1 << 30))
    keys = tempfile.TemporaryDirectory()
    cert, key = os.path.join(keys.name, "cert.pem"), os.path.join(keys.name, "key.pem")
    await trio.run_process(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-days", "1", "-subj", "/CN=bench.test", "-addext",
                            "subjectAltName=DNS:bench.test", "-keyout", key, "-out", cert], capture_stdout=True,
                           capture_stderr=True)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(big), cert, key],  # noqa: ASYNC220
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port, tls_port = map(int, server.stdout.readline().split())
        everything: dict[str, object] = {}
        for way in (("proxy", "direct") if a.way == "both" else (a.way,)):
            everything[way] = await _measure(a, way, port, tls_port, cert, big)
        print(json.dumps(everything, indent=1))
    finally:
        server.kill()
        server.wait()
        keys.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("TMPDIR", "/tmp")
    trio.run(main)
