"""The web app of `vlpcache serve`: one page, a JSON API and frame thumbnails over a Searcher (Starlette).

    GET /                          the search page; the query lives in the URL: /?q=person+cuts+onion[&k=20][&item=ID]
    GET /page.js, /page.css        its script and style (fixed names: no path from a request is ever opened)
    GET /api/info                  {"items", "rerank", "model", "unindexed", "example", "newer"}: what is searched, by which
                                   run, what is not yet indexed (or only as it was before extracted again), a caption
                                   of the run's to suggest, and a note when the run has a newer checkpoint than the
                                   one answering ("" for most)
    GET /api/search?q=&k=&rerank=  {"query", "results"}: the fields of `vlpcache search --json`
    GET /api/search?like=ID&k=     {"like", "results"}: the items most like an indexed one (`search --like ID --json`)
    GET /api/item?id=              one indexed item: its sampled frames and every cached region on them
    GET /media/frame?id=&t=        JPEG of sampled frame t of an indexed item (a placeholder when the source is gone)
    POST /api/like?k=              {"like", "outside", "results"}: the items most like a clip, photo of the user's (the
                                   request's body; its name in x-vlpcache-filename), extracted on its own as
                                   `search --like FILE` does; by a server bound to loopback, or one given
                                   --uploads (make_app's uploads)

Safe by default: media only for ids in the index, found by lookup (thumbnails.py names the files);
queries bounded in length and k; a Host header check against DNS rebinding when bound to loopback (the names of
a proxy of the user's, --allow-host, answered too); uploads only where bound to loopback and reached by this machine's
names (this machine's user's own files) unless asked for, from its own page (no other site's form: the file's name in
a header of its own, the Origin's host this server's, by whichever scheme a proxy hands it on), at most MAX_UPLOAD_BYTES, MAX_HELD_UPLOADS
at once (received side by side, compared one at a time; one of which nothing comes for UPLOAD_STALL_S dropped with
a 408), into a temporary folder removed after; every error is a 4xx (or 500) with one line of JSON, {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlpcache.cache.labels import RegionNames, region_names
from vlpcache.errors import UserError, WriteFailed
from vlpcache.extract import extract_outside
from vlpcache.files import FULL_ERRNOS, failure_errno, system_reason
from vlpcache.index.search import Searcher, hits_json, like_json, like_outside, liked_note
from vlpcache.locks import own_temporary_folder
from vlpcache.report import frame_time, printable, say
from vlpcache.serve.thumbnails import ThumbnailStore

MAX_QUERY_CHARS = 200  # longer than any text the query model reads (it truncates at max_words tokens)
MAX_K = 100
MAX_FRAMES = 512  # the most frames per item extract samples (--frames)
DEFAULT_K = 12
MAX_UPLOAD_BYTES = 2 << 30  # a clip to compare: a phone's few minutes of 4K (only its sampled frames are read)
UPLOAD_NAME_CHARS = 200
MAX_HELD_UPLOADS = 4  # received side by side (each may take minutes over a network, and 2 GiB of TMPDIR), then compared
COMPARE_WAIT_S = 120.0  # one at a time: how long a received upload waits for those before it
UPLOAD_STALL_S = 60.0  # an upload of which nothing comes for this long is dropped (408): its slot and file freed
DRAIN_BYTES = 64 << 20  # an upload refused before it is read is read this far, so that its sender hears why
REFUSED_HOSTS_SAID = 20  # Host names a server's log names as refused (a page rebinding names would fill it)
# threads of their own for /media/frame: a request waiting for a decode (a core's turn, another's decode of the same
# frame) holds one, and 80 cold thumbnails held all of the 40 that the page, info and search share (a page took 18 s)
THUMBNAIL_THREADS = 32
PAGE_DIR = Path(__file__).parent / "page"
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/page.js": ("page.js", "text/javascript; charset=utf-8"),
              "/page.css": ("page.css", "text/css; charset=utf-8")}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self'; frame-ancestors 'none'"),
]


class ApiError(HTTPException):
    """A bad request, answered with its status and one line of JSON."""


def make_app(searcher: Searcher, thumbnails: ThumbnailStore, allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS,
             device: str = "cpu", uploads: bool | None = None, proxy_hosts: frozenset[str] = frozenset()):
    """The ASGI app; allowed_hosts: Host header names accepted (None: any, for a server bound to all interfaces);
    device: where an upload's detector and encoder run; uploads: whether it takes clips to compare (None: only
    where bound to loopback and reached by this machine's names, this machine's own users); proxy_hosts: the names
    of a proxy of the user's that the server is reached through too (--allow-host: JupyterHub, nginx)."""
    pages = {route: ((PAGE_DIR / name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}
    uploads, why_not = _uploads_taken(allowed_hosts, uploads, proxy_hosts)
    if allowed_hosts is not None:
        allowed_hosts = allowed_hosts | proxy_hosts
    slots = UploadSlots()
    thumbnail_threads = ThreadPoolExecutor(THUMBNAIL_THREADS, thread_name_prefix="vlpcache-thumbnail")

    async def page(request: Request) -> Response:  # on the event loop: no thread to wait for
        body, media = pages[request.url.path]
        return Response(body, media_type=media, headers={"cache-control": "no-cache"})

    told = set()

    def info(request: Request) -> Response:
        searcher.refresh()  # the page's "Search N videos": those `vlpcache index` added since the server started too
        if (newer := searcher.newer_checkpoint()) and newer not in told:  # said once in the server's log too
            told.add(newer)
            say(f"note: {newer}")
        # the indexed items the cache can show: those a search may answer (as `serving N items` counts them)
        return JSONResponse({"items": len(searcher) - searcher.unshown, "rerank": searcher.can_rerank,
                             "model": searcher.model_label, "unindexed": searcher.unindexed,
                             "example": searcher.example_query, "kinds": searcher.kinds(), "newer": newer,
                             "uploads": uploads, "max_upload_bytes": MAX_UPLOAD_BYTES})

    def search(request: Request) -> Response:
        if (like := _param(request, "like")) is not None:
            return _search_like(searcher, request, like)
        query = _query_text(request)
        k = _int_param(request, "k", DEFAULT_K, 1, MAX_K)
        rerank = _flag_param(request, "rerank", True)
        started = time.perf_counter()
        try:
            hits = searcher.search(query, k, rerank=rerank)
        except UserError as err:
            raise ApiError(400, str(err)) from None
        took = 1e3 * (time.perf_counter() - started)
        unknown, known = searcher.unknown_and_known(query)
        return JSONResponse(hits_json(query, hits, searcher.unread(query), unknown, searcher.weak(hits), known,
                                      searcher.model_label),
                            headers={"server-timing": f"search;dur={took:.1f}"})

    def item(request: Request) -> Response:
        cached = _indexed_item(searcher, request)
        return JSONResponse(item_frames(cached, region_names(searcher.cache.settings.detector)))

    async def frame(request: Request) -> Response:  # those waiting meanwhile queue without holding a thread
        work = partial(_frame, searcher, thumbnails, request)
        return await asyncio.get_running_loop().run_in_executor(thumbnail_threads, work)

    async def like_upload(request: Request) -> Response:
        return await _like_upload(request, searcher, None if uploads else why_not, slots, device)

    routes = [Route(path, page) for path in PAGE_FILES] + [
        Route("/api/info", info),
        Route("/api/search", search),
        Route("/api/like", like_upload, methods=["POST"]),
        Route("/api/item", item),
        Route("/media/frame", frame),
        Route("/favicon.ico", lambda request: Response(status_code=204)),  # none: no error in the browser's console
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
    return Guard(app, allowed_hosts)


def _frame(searcher: Searcher, thumbnails: ThumbnailStore, request: Request) -> Response:
    """/media/frame, in a thread of the thumbnails' own (it may wait for a decode)."""
    cached = _indexed_item(searcher, request)
    t = _int_param(request, "t", None, 0, MAX_FRAMES)
    if cached.get("unreadable"):  # its row does not read, its frames' times with it: the source's first frame
        t = 0
    elif t >= len(cached["frame_mask"]) or not cached["frame_mask"][t]:
        raise ApiError(404, f"item {cached['id']!r} has no sampled frame {t}")
    picture = thumbnails.get(cached, t)
    etag = f'"{picture.etag}"'
    # asked again each time (a 304 while the same): a frame's URL stays when its item is extracted again
    headers = {"etag": etag, "cache-control": "no-store" if picture.placeholder else "private, no-cache"}
    if picture.placeholder:
        headers["x-vlpcache-placeholder"] = picture.placeholder.encode("ascii", "replace").decode()
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(picture.jpeg, media_type="image/jpeg", headers=headers)


def _uploads_taken(allowed_hosts: frozenset[str] | None, uploads: bool | None,
                   proxy_hosts: frozenset[str]) -> tuple[bool, str]:
    """Whether a server takes uploads (as asked, else only where reached by this machine's names alone), and the
    reason it gives where it does not."""
    why_not = ("it was started with --no-uploads" if uploads is False else
               "it listens beyond this machine (--host); `vlpcache serve --uploads` takes them from anyone who can "
               "reach it" if allowed_hosts is None else
               "it answers through a proxy (--allow-host); `vlpcache serve --uploads` takes them from whoever the "
               "proxy lets in")
    if uploads is None:
        uploads = allowed_hosts is not None and not proxy_hosts
    return uploads, why_not


def item_frames(cached: dict, names: RegionNames) -> dict:
    """An item's real sampled frames with every detected region on them (not the whole-frame region)."""
    frames = []
    for t in range(len(cached["frame_mask"])):
        if not cached["frame_mask"][t]:
            continue
        regions = []
        for n in range(cached["labels"].shape[1]):
            label = int(cached["labels"][t, n])
            if cached["region_mask"][t, n] and label >= 0:
                regions.append({"label": names.of(cached, t, n), "score": round(float(cached["scores"][t, n]), 3),
                                "box": [round(float(v), 3) for v in cached["boxes"][t, n]]})
        frames.append({"frame": t, "time": frame_time(cached["timestamps"][t]), "regions": regions})
    return {"id": cached["id"], "path": cached["path"], "kind": cached["kind"], "note": cached.get("note", ""),
            "unreadable": cached.get("unreadable", ""), "frames": frames}


def _search_like(searcher: Searcher, request: Request, like: str) -> Response:
    """/api/search?like=ID: the items most like an indexed one (404 where ID names none)."""
    if _param(request, "q") is not None:
        raise ApiError(400, "give q (words to search for) or like (an item's id), not both")
    k = _int_param(request, "k", DEFAULT_K, 1, MAX_K)
    started = time.perf_counter()
    try:
        item_id = searcher.indexed_item(like)
    except UserError as err:
        raise ApiError(404, str(err)) from None
    try:
        hits = searcher.like(item_id, k)
    except UserError as err:
        raise ApiError(400, str(err)) from None
    took = 1e3 * (time.perf_counter() - started)
    return JSONResponse(like_json(item_id, hits, note=liked_note(searcher, item_id), model=searcher.model_label),
                        headers={"server-timing": f"search;dur={took:.1f}"})


# ---------------------------------------------------------------- uploads


class UploadSlots:
    """Uploads held at once (received, or waiting, or being compared: at most MAX_HELD_UPLOADS, each up to
    MAX_UPLOAD_BYTES in TMPDIR), and the lock that compares them one at a time (each starts a decoding process and
    the detector). A slow sender keeps no other upload from being received and compared meanwhile."""

    def __init__(self):
        self.held = 0  # changed on the event loop's thread only
        self.comparing = threading.Lock()

    def in_turn(self, work, *args):
        """work(*args) once the uploads received before it are compared, and the seconds it took; run in a worker
        thread, which takes and lets go of the lock itself, whatever becomes of the request meanwhile (a handler
        cancelled while the thread waits would otherwise be given a lock it never lets go). A 503 where it waited
        COMPARE_WAIT_S in vain."""
        if not self.comparing.acquire(timeout=COMPARE_WAIT_S):
            raise ApiError(503, "the clips sent before this one are still being compared; try again in a moment",
                           headers={"retry-after": "5"})
        try:
            started = time.perf_counter()
            return work(*args), time.perf_counter() - started
        finally:
            self.comparing.release()


async def _like_upload(request: Request, searcher: Searcher, refused: str | None, slots: UploadSlots,
                       device: str) -> Response:
    """POST /api/like: the items most like the clip or photo in the request's body, extracted on its own;
    `refused`: why this server takes none (None: it takes them)."""
    try:
        if refused is not None:
            raise ApiError(403, f"this server takes no uploads: {refused}; or run `vlpcache search --like FILE` where "
                                "the collection is")
        _check_own_page(request)
        k = _int_param(request, "k", DEFAULT_K, 1, MAX_K)
        name = _upload_name(request)
        if slots.held >= MAX_HELD_UPLOADS:
            raise ApiError(503, f"{slots.held} uploads are being received or compared; try again in a moment",
                           headers={"retry-after": "5"})
    except ApiError:
        await _drain(request)
        raise
    slots.held += 1
    try:
        with own_temporary_folder("vlpcache-upload-") as folder:
            path = Path(folder) / ("upload" + _upload_suffix(name))
            size = await _receive_upload(request, path, name)
            try:
                hits, took = await run_in_threadpool(slots.in_turn, like_outside, searcher, str(path), k,
                                                     extract_outside, device, lambda line: None)
            except WriteFailed as err:  # the server's temporary folder: its user's to mend, not the sender's
                raise _server_side(507 if err.full else 500, str(err).replace(str(path), name)) from None
            except UserError as err:
                raise ApiError(400, str(err).replace(str(path), name)) from None
    finally:
        slots.held -= 1
    say(f"compared {printable(name)} ({size / 2**20:.1f} MB) with the collection in {took:.1f} s")
    return JSONResponse(like_json(name, hits, outside=True, model=searcher.model_label), headers={"server-timing": f"like;dur={1e3 * took:.1f}"})


async def _drain(request: Request) -> None:
    """Read and drop an upload refused before it was read, up to DRAIN_BYTES: a connection closed with a body
    still arriving is reset, and the sender sees that (a proxy's 502, the page's "does not answer"), not why."""
    read = 0
    try:
        async for chunk in _arriving(request):
            read += len(chunk)
            if read > DRAIN_BYTES:
                return
    except (ClientDisconnect, ApiError):  # gone, or stalled: nothing more to tell it
        pass


async def _arriving(request: Request):
    """The request's body, chunk by chunk as it comes; a 408 where nothing comes for UPLOAD_STALL_S (a sender
    whose network went, a laptop closed: its connection stays, no bytes come), which would otherwise hold an upload
    slot and its file for ever."""
    stall_s = seconds_setting("VLPCACHE_UPLOAD_STALL_S", UPLOAD_STALL_S)
    chunks = request.stream()
    while True:
        try:
            yield await asyncio.wait_for(anext(chunks), stall_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(408, f"nothing of the file came for {stall_s:g} s; send it again") from None


def _check_own_page(request: Request) -> None:
    """Refuse an upload another site's page sends through the user's browser (a form posted to localhost): it
    lacks the x-vlpcache-filename header (a header of its own makes a browser ask first, and this server answers
    no such asking), or its Origin is another site's."""
    if "x-vlpcache-filename" not in request.headers:
        raise ApiError(400, "name the file in the x-vlpcache-filename header (percent-encoded UTF-8), as the page does")
    origin = request.headers.get("origin")
    if origin is not None and _authority(origin) not in _own_names(request):  # (another site's page is stopped
        # by its browser before: it asks first to send the header; a proxy passing on a Host of its own is not)
        raise ApiError(403, f"uploads come from this server's own page, not from {printable(origin[:100])} (where "
                            "that is the address of a proxy of yours, have it pass on the browser's Host: in "
                            "X-Forwarded-Host, or as Host with --allow-host)")


def _authority(origin: str) -> str:
    """An Origin's host[:port], lower case ("https://Hub.example.org" -> "hub.example.org"): the scheme is left
    out, since a proxy that ends HTTPS (JupyterHub, nginx) hands the page's https:// requests on as http://."""
    return origin.partition("://")[2].lower()


def _own_names(request: Request) -> set[str]:
    """The host[:port] the browser opened this server by: the Host header, or the one a proxy says it was sent to
    (X-Forwarded-Host, where it passes on a Host of its own: nginx's default). Either is the browser's own for a
    page of this server: another site's page cannot send the upload's header without asking first."""
    names = {request.headers.get("host", "").lower()}
    if forwarded := request.headers.get("x-forwarded-host"):
        names.add(forwarded.split(",")[0].strip().lower())
    return names - {""}  # (an Origin of "null", a sandboxed page's, names no host)


def _server_side(status: int, line: str) -> ApiError:
    """An upload that failed on the server's side (its temporary folder full, or not writable: not the sender's to
    mend): said in its log too."""
    say(f"error: an upload: {line}")
    return ApiError(status, line)


def _upload_name(request: Request) -> str:
    """The uploaded file's name as the page sends it (percent-encoded UTF-8 in x-vlpcache-filename), shown and used
    for its extension only, never as a path."""
    raw = request.headers["x-vlpcache-filename"]
    name = Path(urllib.parse.unquote(raw, errors="replace").replace("\\", "/")).name.strip() or "upload"
    return printable(name[-UPLOAD_NAME_CHARS:])


def _upload_suffix(name: str) -> str:
    """The name's extension where it is a plain one (`.mp4`, `.HEIC`); none otherwise: the first bytes tell."""
    suffix = Path(name).suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""


async def _receive_upload(request: Request, path: Path, name: str) -> int:
    """Write the request's body to `path`, at most MAX_UPLOAD_BYTES (said before reading it where its length is
    given); its size. A sender gone before the end (a page closed) is one line in the log."""
    given = request.headers.get("content-length")
    if given is not None and given.isdigit() and int(given) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the file is {int(given) / 2**20:.0f} MB; at most {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
    size = 0
    try:
        with open(path, "wb") as out:
            async for chunk in _arriving(request):
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise ApiError(413, f"the file is over {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
                out.write(chunk)
    except ClientDisconnect:  # nobody is left to answer: the log says it, the folder is removed
        say(f"note: the upload of {name} stopped after {size / 2**20:.1f} MB: its sender went away (a page closed?)")
        raise ApiError(400, "the upload did not arrive whole") from None
    except ApiError as err:
        if err.status_code == 408:  # the sender stalled: the log says it, the slot and the folder are freed
            say(f"note: the upload of {name} stopped after {size / 2**20:.1f} MB: nothing more came for "
                f"{seconds_setting('VLPCACHE_UPLOAD_STALL_S', UPLOAD_STALL_S):g} s (its sender stalled?); dropped")
        raise
    except OSError as err:  # the server's temporary folder is full (or not writable)
        raise _server_side(507 if failure_errno(err) in FULL_ERRNOS else 500,
                           f"the server could not keep the file while comparing it: a write to its temporary folder "
                           f"{printable(str(path.parent.parent))} failed ({system_reason(err, path)}) after "
                           f"{size / 2**20:.1f} MB of it; make room there, or serve with TMPDIR set to another folder") from None
    if not size:
        raise ApiError(400, "no file: send the clip or photo as the request's body")
    return size


def seconds_setting(variable: str, default: float) -> float:
    """A time limit of the server's: `default`, or the seconds the environment variable gives (a test's short one,
    or a slow network's longer one)."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"{variable}={text!r}: give seconds, a number above 0 (unset: {default:g})")
    return seconds


# ---------------------------------------------------------------- request parameters


def _param(request: Request, name: str) -> str | None:
    """A parameter given once (None when absent); one given twice is refused rather than one of them
    silently chosen (`q=dog&q=cat`)."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"{name} given {len(values)} times; give it once")
    return values[0] if values else None


def _query_text(request: Request) -> str:
    query = (_param(request, "q") or "").strip()
    if not query:
        raise ApiError(400, "missing query: add ?q=words to search for")
    if "\ufffd" in query and (typed := _not_utf8(request, "q")):  # Starlette writes U+FFFD for such a byte
        byte = re.search(r"%[0-9A-F]{2}", typed)[0]
        raise ApiError(400, f'the query "{typed}" is not UTF-8 text (the byte {byte}: a page or link in another '
                            "encoding, e.g. Latin-1); percent-encode it as UTF-8 (é is %C3%A9)")
    if len(query) > MAX_QUERY_CHARS:
        raise ApiError(400, f"query of {len(query)} characters; at most {MAX_QUERY_CHARS}")
    return query


def _not_utf8(request: Request, name: str) -> str:
    """A parameter as the address gives it, its bytes that are not UTF-8 as %XX ("caf%E9"); "" when all are."""
    query_string = request.scope["query_string"].decode("latin-1")
    for key, value in urllib.parse.parse_qsl(query_string, keep_blank_values=True, errors="surrogateescape"):
        if key == name and re.search("[\udc80-\udcff]", value):
            return printable(re.sub("[\udc80-\udcff]", lambda byte: f"%{ord(byte[0]) - 0xDC00:02X}", value.strip()))
    return ""


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int:
    text = _param(request, name)
    if text is None and default is not None:
        return default
    if text is None:
        raise ApiError(400, f"missing {name}: add {name}=N, a whole number from {low} to {high}")
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} = {value}: must be from {low} to {high}")
    return value


def _flag_param(request: Request, name: str, default: bool) -> bool:
    text = _param(request, name)
    if text is None:
        return default
    if text.lower() in ("1", "true", "yes", "0", "false", "no"):
        return text.lower() in ("1", "true", "yes")
    raise ApiError(400, f"{name} must be 1 or 0 (true or false), not {text[:20]!r}")


def _indexed_item(searcher: Searcher, request: Request) -> dict:
    item_id = _param(request, "id")
    if not item_id:
        raise ApiError(400, "missing id: add ?id=ITEM (an id from the search results)")
    try:
        # as `search --like` and /api/search?like= name one: the id in another Unicode form (a macOS file name's
        # NFD), or a file name ending in it; looked up among the index's ids, a path never reaches the filesystem
        return searcher.item(searcher.indexed_item(item_id))
    except KeyError:  # an index rebuilt without it in between
        raise ApiError(404, "no such item in the index") from None
    except UserError as err:  # none of the index's, or dropped from the cache since it was indexed: why, as like= says
        raise ApiError(404, str(err)) from None


# ---------------------------------------------------------------- errors and guard


async def _http_error(request: Request, err: HTTPException) -> Response:
    message = err.detail if isinstance(err, ApiError) else {404: "not found", 405: "method not allowed"}.get(
        err.status_code, err.detail)
    return JSONResponse({"error": _one_line(str(message))}, status_code=err.status_code, headers=err.headers)


async def _server_error(request: Request, err: Exception) -> Response:
    return JSONResponse({"error": f"internal error ({type(err).__name__}); see the server's log"}, status_code=500)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Guard:
    """ASGI wrapper: refuses Host headers other than the allowed (DNS rebinding would otherwise let any
    web page read a loopback server), and adds the security headers to every response."""

    def __init__(self, app, allowed_hosts: frozenset[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts
        self.refused = set()  # Host names said in the log (once each, REFUSED_HOSTS_SAID at most)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed_hosts is not None and (host := _host_name(scope)) not in self.allowed_hosts:
            return await JSONResponse({"error": self.refuse(host)}, status_code=400)(scope, receive, send)

        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:  # the server stops (Ctrl+C, SIGTERM) and this request outlasted its grace
            if started:  # (uvicorn cancels it; its traceback in the log would say nothing more)
                raise
            await JSONResponse({"error": "the server is stopping; try again once it is started again"},
                               status_code=503)(scope, receive, send)

    def refuse(self, host: str) -> str:
        """The line a request for another Host name gets; said in the server's log too, once a name: the page a
        proxy of the user's shows (JupyterHub's jupyter-server-proxy passes on the browser's Host) is only this."""
        if not host:  # an HTTP/1.0 client's request: no name to allow
            return "no Host header: open the server by the address it printed"
        shown = printable(host[:100])
        line = (f"unexpected Host header {shown}: open the server by the address it printed, or, where {shown} is "
                f"a proxy of yours (JupyterHub, nginx), start it with --allow-host {shown}")
        if host not in self.refused and len(self.refused) < REFUSED_HOSTS_SAID:
            self.refused.add(host)
            say(f"note: refused a request for Host {shown} (this server answers {_names(self.allowed_hosts)});"
                f" where {shown} is a proxy of yours, restart with --allow-host {shown}")
        return line


def _names(hosts: frozenset[str]) -> str:
    """Host names as a browser's address has them (::1 in brackets only)."""
    return ", ".join(sorted(name for name in hosts if ":" not in name or name.startswith("[")))


def _host_name(scope) -> str:
    return _without_port(next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "").lower())


def _without_port(host: str) -> str:
    """A Host's name without its port: [::1]:8000 -> [::1], hub.example.org:8443 -> hub.example.org (a bare IPv6
    address, ::1, as it is)."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts_for(bind_host: str) -> frozenset[str] | None:
    """Host names a server bound to bind_host answers: the loopback names when bound to loopback, else any."""
    if bind_host in LOOPBACK_HOSTS or bind_host.startswith("127."):
        return LOOPBACK_HOSTS | {bind_host}
    return None


def proxy_host_names(names) -> frozenset[str]:
    """--allow-host's names as Host headers carry them (lower case, no port; an IPv6 address in brackets), or one
    line saying which is no host name."""
    hosts = set()
    for name in names or ():
        host = _without_port(name.strip().lower())  # Host names are compared without their port
        if "://" in name or "/" in name or not host or " " in host:  # (":8443" and "[x" name no host either)
            raise UserError(f"--allow-host {name!r}: give the proxy's host name as the browser's address has it "
                            "(hub.example.org, not https://hub.example.org/user/...)")
        hosts.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return frozenset(hosts)

