"""Servers the egress tests start on 127.0.0.1 (nothing leaves the machine):
a PEP 503 package index holding one tiny wheel built here, a minimal npm
registry, a plain HTTP echo, a TLS server with a self-signed certificate."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager


def tiny_wheel(name: str = "tinypkg", version: str = "1.0") -> tuple[str, bytes]:
    """A pure-Python wheel: `import tinypkg; tinypkg.VALUE == 42`."""
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: zviz-tests\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def npm_tarball(name: str = "tinynpm", version: str = "1.0.0") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for path, data in (("package/package.json", json.dumps({"name": name, "version": version,
                                                                "main": "index.js"}).encode()),
                           ("package/index.js", b"module.exports = 42;\n")):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    """A threaded HTTP server on 127.0.0.1; `requests` holds (method, path, Host) of each request seen."""

    def __init__(self, routes: dict[str, tuple[str, bytes]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path, self.headers.get("Host", "")))
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    body, ctype, status = f"no {self.path}; host {self.headers.get('Host')}".encode(), \
                        "text/plain", 404
                else:
                    (ctype, body), status = route, 200
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def package_index() -> Iterator[Server]:
    """`/simple/` (PEP 503) with tinypkg, `/tinynpm` (an npm registry
    document) and its tarball, `/hello`."""
    whl_name, whl = tiny_wheel()
    sha = hashlib.sha256(whl).hexdigest()
    tgz = npm_tarball()
    srv = Server({})
    base = f"http://pkgs.test:{srv.port}"
    srv.routes.update({
        "/simple/": ("text/html", b'<html><body><a href="/simple/tinypkg/">tinypkg</a></body></html>'),
        "/simple/tinypkg/": ("text/html", f'<html><body><a href="/files/{whl_name}#sha256={sha}">{whl_name}</a>'
                                          f'</body></html>'.encode()),
        f"/files/{whl_name}": ("application/octet-stream", whl),
        "/tinynpm": ("application/json", json.dumps({
            "name": "tinynpm", "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {"name": "tinynpm", "version": "1.0.0",
                                   "dist": {"tarball": f"{base}/tinynpm/-/tinynpm-1.0.0.tgz",
                                            "shasum": hashlib.sha1(tgz).hexdigest(),
                                            "integrity": "sha512-" + base64.b64encode(
                                                hashlib.sha512(tgz).digest()).decode()}}}}).encode()),
        "/tinynpm/-/tinynpm-1.0.0.tgz": ("application/octet-stream", tgz),
        "/hello": ("text/plain", b"hello from pkgs.test\n"),
    })
    try:
        yield srv
    finally:
        srv.close()


def self_signed(dirpath: str, name: str) -> tuple[str, str] | None:
    """(cert, key) for `name` made by openssl, or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = os.path.join(dirpath, "cert.pem"), os.path.join(dirpath, "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True)
    os.chmod(cert, 0o644)
    return cert, key


class TlsEcho:
    """A TLS server on 127.0.0.1 answering each connection with its SNI;
    `seen` holds the server names of the handshakes it saw."""

    def __init__(self, cert: str, key: str) -> None:
        import ssl

        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.seen: list[str | None] = []
        self.accepted = 0

        def sni(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            self.seen.append(name)

        self.ctx.sni_callback = sni  # type: ignore[assignment]
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                s.recv(100)
                s.sendall(b"tls hello " + str(self.seen[-1] if self.seen else None).encode())
        except OSError:
            conn.close()

    def close(self) -> None:
        self.sock.close()
