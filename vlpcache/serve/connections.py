"""How `vlpcache serve` holds its connections, over uvicorn's h11 protocol: each must send a whole request's head
within REQUEST_HEAD_S of opening (or of its last answer), or it is closed; and at most connection_bound() are
held, those beyond answered 503 at once and closed (said in the log once in ten minutes at most).

uvicorn alone holds a connection that never completes a request for ever (its keep-alive timer starts only after
an answer): idle or half-sent ones (a client that stalled, a port scanner, a slowloris), as many as the open-file
limit, left no file for the next accept (the log grew by megabytes a second of asyncio's "Too many open files")
nor for the cache's reads (a 500 for everyone else)."""

from __future__ import annotations

import math
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlpcache.files import open_files_limit
from vlpcache.report import say

REQUEST_HEAD_S = 20.0  # from a connection's opening (or its last answer) to its request's last header line
# refused connections are said once in so long: idle ones closing and new ones refused make many episodes a second
REFUSAL_SAID_EVERY_S = 600.0
MAX_CONNECTIONS = 1000  # a lab's server: a browser opens 6 at most; more are kept from fewer open files


def connection_bound() -> int:
    """The connections held at once: a quarter of the files the process may open (its soft limit raised to its
    hard one first), MAX_CONNECTIONS at most; the cache's shard files may take half (open_shards_bound), the
    rest is for accepting, thumbnails' decoding and uploads."""
    return max(16, min(MAX_CONNECTIONS, open_files_limit() // 4))


def bounded_connections(most: int, request_head_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol holding at most `most` connections, each closed where its request's head has not
    come within request_head_s."""
    return type("BoundedConnection", (BoundedConnection,), {"most": most, "request_head_s": request_head_s})


class BoundedConnection(H11Protocol):
    """One connection (bounded_connections sets the class's bounds)."""

    most = MAX_CONNECTIONS
    request_head_s = REQUEST_HEAD_S
    refusal_said_at = -math.inf  # when the log last said that connections are refused (monotonic seconds)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_deadline = None
        if len(self.connections) > self.most:
            self._refuse()
        else:
            self._await_request_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next request's head is awaited as the first's was
            self._await_request_head()

    def connection_lost(self, exc) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
        super().connection_lost(exc)

    def _await_request_head(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
        self.head_deadline = self.loop.call_later(self.request_head_s, self._close_without_request)

    def _close_without_request(self) -> None:
        # h11 stays IDLE until a request's last header line: nothing, or part of a head, came in time
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        """A 503 written at once (its request unread), then the connection closed: its file is free again."""
        if time.monotonic() - self.refusal_said_at >= REFUSAL_SAID_EVERY_S:
            type(self).refusal_said_at = time.monotonic()
            say(f"note: {len(self.connections) - 1} connections are open, as many as this server holds (a quarter of "
                "the files it may open: `ulimit -n`); those beyond are answered 503 until some close")
        body = (b'{"error": "the server holds as many connections as it may; try again in a moment"}')
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                             b"retry-after: 5\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
