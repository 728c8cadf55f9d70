"""Files from the network: whether downloads are allowed, and one download into a file with a progress bar
that tells a whole file from one cut short. No torch.

    VLPCACHE_OFFLINE=1 (or HF_HUB_OFFLINE=1)   never touch the network
    VLPCACHE_TEST_DOWNLOADS=http://127.0.0.1:PORT   for tests only: every URL is fetched from this server
                                                    instead, by its file name (a stand-in for the sources)
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from vlpcache import __version__
from vlpcache.report import progress_bar

OFFLINE_VARIABLES = ("VLPCACHE_OFFLINE", "HF_HUB_OFFLINE")
TEST_SERVER_VARIABLE = "VLPCACHE_TEST_DOWNLOADS"
TIMEOUT_S = 30  # to connect, and between two blocks of a download
BLOCK = 1 << 16


class Unavailable(Exception):
    """The file cannot be had from this source here and now (offline, no network, not published there)."""


class Damaged(Exception):
    """What arrived is not the whole file (cut short, interrupted, or failing its checks): worth a retry."""


def offline_variable() -> str | None:
    """The variable that turns downloads off, if one is set to a true value."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def source_url(url: str) -> str:
    """`url`, or its stand-in on the test server (tests only: VLPCACHE_TEST_DOWNLOADS)."""
    server = os.environ.get(TEST_SERVER_VARIABLE)
    return f"{server.rstrip('/')}/{url.rsplit('/', 1)[-1]}" if server else url


def download(url: str, out: Path, label: str, progress: bool | None = None) -> None:
    """Write the file at `url` into `out` (a temporary the caller renames once it is verified).

    Unavailable: it cannot be had (no network, HTTP 4xx). Damaged: it arrived cut short or the transfer
    broke off (a retry may do better). OSError: `out` cannot be written (the caller names the folder)."""
    request = urllib.request.Request(source_url(url), headers={"User-Agent": f"vlpcache/{__version__}"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        failure = Damaged if err.code >= 500 else Unavailable
        raise failure(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError) as err:
        raise Unavailable(str(getattr(err, "reason", err)).strip() or type(err).__name__) from None
    expected = int(response.headers.get("Content-Length") or 0) or None
    received = 0
    show = sys.stderr.isatty() if progress is None else progress
    with response, open(out, "wb") as file, progress_bar(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                                          desc=label, disable=not show, leave=False) as bar:
        while True:
            try:
                block = response.read(BLOCK)
            except (http.client.HTTPException, socket.timeout, ConnectionError) as err:
                raise Damaged(f"the transfer broke off after {received:,} bytes ({type(err).__name__})") from None
            if not block:
                break
            file.write(block)
            received += len(block)
            bar.update(len(block))
    if expected is not None and received != expected:
        raise Damaged(f"cut short: {received:,} of {expected:,} bytes")
