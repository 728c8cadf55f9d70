"""`vlpcache serve`: the search page and JSON API for a run, a cache and its index, under uvicorn."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
from typing import Iterator
from urllib.parse import quote_plus

from vlpcache.devices import DEFAULT_DEVICE
from vlpcache.errors import UserError
from vlpcache.index.layout import THUMBNAIL_DIR
from vlpcache.report import printable, say

ACCEPT_BACKLOG = 128  # connections waiting to be accepted, and accepted at once (each a file until refused)
GRACEFUL_STOP_S = 3  # Ctrl+C or SIGTERM: how long requests in flight may go on (a slow upload is then dropped)


def run_serve(run_dir=None, cache_dir=None, index_dir=None, host="127.0.0.1", port=8000, device=DEFAULT_DEVICE,
              uploads: bool | None = None, allow_host=(), thumbnails_max: float | None = None) -> None:
    """The `vlpcache serve` command: load once (building the index on first use), then serve until Ctrl+C.
    uploads: whether the page takes clips to compare (None: only where bound to loopback, no proxy named);
    allow_host: host names of a proxy of the user's the server is reached through (JupyterHub, nginx);
    thumbnails_max: GB the kept thumbnails may take (None: THUMBNAILS_MAX_BYTES)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("vlpcache serve needs starlette and uvicorn: pip install starlette uvicorn") from None
    from vlpcache.index.search import Searcher
    from vlpcache.serve.app import allowed_hosts_for, make_app, proxy_host_names, seconds_setting
    from vlpcache.serve.connections import REQUEST_HEAD_S, bounded_connections, connection_bound
    from vlpcache.serve.thumbnails import THUMBNAILS_MAX_BYTES, ThumbnailStore

    proxies = proxy_host_names(allow_host)
    searcher = Searcher(run_dir, cache_dir, index_dir, device=device)
    max_bytes = round(thumbnails_max * 1e9) if thumbnails_max is not None else THUMBNAILS_MAX_BYTES
    thumbnails = ThumbnailStore(searcher.index_dir / THUMBNAIL_DIR, max_bytes=max_bytes)
    protocol = bounded_connections(connection_bound(), seconds_setting("VLPCACHE_REQUEST_HEAD_S", REQUEST_HEAD_S))
    listener = bind(host, port)
    address = _url_host(host)
    url = f"http://{address}:{listener.getsockname()[1]}/"
    say_who_reaches(host, listener.getsockname()[1], proxies, uploads)
    model = f" with {printable(searcher.model_label)}" if searcher.model_label else ""
    print(f"serving {len(searcher) - searcher.unshown} items{model} at {url}  (Ctrl+C to stop)", flush=True)
    print(f"try {url}?q={quote_plus(searcher.example_query)}", flush=True)
    config = uvicorn.Config(make_app(searcher, thumbnails, allowed_hosts_for(host), device, uploads, proxies), log_level="warning",
                            access_log=False, lifespan="off", server_header=False, http=protocol,
                            backlog=ACCEPT_BACKLOG, timeout_graceful_shutdown=GRACEFUL_STOP_S)
    server = uvicorn.Server(config)
    try:
        with hangup_stops(server):
            server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn stops on Ctrl+C, then raises it again: stopping is what the user asked for
        pass
    print("stopped", flush=True)


@contextlib.contextmanager
def hangup_stops(server) -> Iterator[None]:
    """Within: SIGHUP (the terminal it runs in closed) stops the uvicorn `server` as Ctrl-C and SIGTERM do, by
    uvicorn's own exit. uvicorn takes those two only: the KeyboardInterrupt of vlpcache's stop handler landed
    anywhere in its event loop, and now and then the server then hung at its end (1 stop in 3 or 4 under load).
    Left alone where SIGHUP is ignored (nohup) or where signals are not this thread's to take."""
    hangup = getattr(signal, "SIGHUP", None)
    if (hangup is None or signal.getsignal(hangup) is signal.SIG_IGN
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    previous = signal.signal(hangup, lambda signum, frame: server.handle_exit(signal.SIGTERM, frame))
    try:
        yield
    finally:
        signal.signal(hangup, previous)


def say_who_reaches(host: str, port: int, proxies: frozenset[str], uploads: bool | None) -> None:
    """A note where others than this machine's user reach the server: listening beyond this machine (the address
    they open), or through a proxy named by --allow-host (JupyterHub's address for it, where run in JupyterHub)."""
    from vlpcache.serve.app import allowed_hosts_for

    sent = ("and send it clips and photos to compare (--uploads)" if uploads else
            "(it takes no clips to compare unless given --uploads)")
    hub = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "")  # "/user/ann/": set in a JupyterHub user's server
    if allowed_hosts_for(host) is None:  # the address others open: this machine's name (the url is for this one)
        say(f"note: listening on {host}: anyone who can reach this machine can search the collection and see its frames "
            f"{sent}; others open http://{socket.gethostname()}:{port}/")
    elif proxies:  # reached through the user's proxy, whose address only the user knows
        where = (f"https://{sorted(proxies)[0]}{hub.rstrip('/')}/proxy/{port}/" if hub.startswith("/") else
                 f"the proxy's address for port {port} (JupyterHub: https://HUB/user/NAME/proxy/{port}/)")
        say(f"note: answering requests for {', '.join(sorted(proxies))} too (--allow-host): whoever that proxy lets in "
            f"can search the collection and see its frames {sent}; open {where}")
    elif hub.startswith("/"):  # JupyterHub's proxy passes on its own Host, refused until named
        say(f"note: in JupyterHub, open https://HUB{hub.rstrip('/')}/proxy/{port}/ (HUB: your hub's address) with "
            "--allow-host HUB given here (the page names it if not)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as err:
        listener.close()
        if err.errno == errno.EADDRNOTAVAIL:  # the address is none of this machine's
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): --host {host} is not an address of this "
                            "machine; pass one of its addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (all)") from None
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port, or stop what uses it") from None
    listener.listen(ACCEPT_BACKLOG)
    return listener


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
