"""A stand-in for the places weights are published: an HTTP server on 127.0.0.1 that serves files by name
(VLPCACHE_TEST_DOWNLOADS points downloads at it), counts the requests, and can spoil its next answers
(wrong bytes, or cut short) or send slowly."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOCK = 1 << 16


class WeightsServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests = 0
        self.corrupt = 0  # the next N answers have wrong bytes in the middle
        self.truncate = 0  # the next N answers stop halfway (the declared length stays whole)
        self.delay = 0.0  # seconds between blocks of 64 KiB
        self.sent_some = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> WeightsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.delay = 0.0
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, name: str) -> tuple[bytes, int] | None:
        """(bytes to send, declared length) of the next answer for `name`, spoilt as asked."""
        if name not in self.files:
            return None
        data = self.files[name]
        self.requests += 1
        if self.corrupt:
            self.corrupt -= 1
            middle = len(data) // 2
            return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:], len(data)
        if self.truncate:
            self.truncate -= 1
            return data[: len(data) // 2], len(data)
        return data, len(data)

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = owner._answer(self.path.lstrip("/"))
                if answer is None:
                    self.send_error(404)
                    return
                data, length = answer
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    for start in range(0, len(data), BLOCK):
                        self.wfile.write(data[start:start + BLOCK])
                        self.wfile.flush()
                        owner.sent_some.set()
                        time.sleep(owner.delay)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-download
                    pass
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        return Handler
