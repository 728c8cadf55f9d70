"""A reverse proxy that ends HTTPS and serves another server under a path prefix, as JupyterHub's
jupyter-server-proxy does (https://HUB/user/NAME/proxy/PORT/...): the prefix stripped from the path, every
header of the browser's passed on as it came (its Host and Origin too), X-Forwarded-Prefix added, the request
made over plain HTTP to 127.0.0.1:PORT. A test's own, in a thread; its certificate made by openssl for the name."""

from __future__ import annotations

import http.client
import http.server
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}


def certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for `name` (the browser is told to take it), or a skip saying why."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl on this machine to make the proxy's certificate (apt-get install openssl)")
    cert, key = folder / "proxy-cert.pem", folder / "proxy-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class PrefixProxy:
    """https://127.0.0.1:<port>/user/ann/proxy/<upstream>/PATH -> http://127.0.0.1:<upstream>/PATH."""

    def __init__(self, upstream: int, cert: Path, key: Path):
        self.upstream = upstream
        self.prefix = f"/user/ann/proxy/{upstream}"
        self.forwarded = []  # (method, path as the server got it, Host, Origin) of each request passed on
        self.missed = []  # paths asked outside the prefix (the browser's own /favicon.ico aside)
        handler = type("Handler", (_Handler,), {"proxy": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    proxy: PrefixProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the test reads `forwarded`
        pass

    def do_GET(self) -> None:
        self._pass_on()

    def do_POST(self) -> None:
        self._pass_on()

    def _pass_on(self) -> None:
        prefix = self.proxy.prefix
        where, _, query = self.path.partition("?")
        if where != prefix and not where.startswith(prefix + "/"):
            if where != "/favicon.ico":
                self.proxy.missed.append(self.path)
            return self._answer(404, [("content-type", "text/plain")], b"not proxied here")
        if where == prefix:  # as jupyter-server-proxy, the prefix alone gains its slash (the query kept)
            return self._answer(301, [("location", prefix + "/" + ("?" + query if query else ""))], b"")
        path = self.path[len(prefix):]
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-Prefix"] = headers["X-Forwarded-Context"] = prefix
        self.proxy.forwarded.append((self.command, path, self.headers.get("host"), self.headers.get("origin")))
        upstream = http.client.HTTPConnection("127.0.0.1", self.proxy.upstream, timeout=120)
        try:
            upstream.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            answer = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
            self._answer(response.status, kept, answer)
        finally:
            upstream.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
