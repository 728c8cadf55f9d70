"""`vlpcache serve`: the JSON API, its limits and errors, traversal attempts, thumbnails decoded from real
sources and kept beside the index, and the page driven in a real headless Chromium.

The workspace is the tiny run of test_search on a cache whose items point at real sources: MSR-VTT
frame folders, two real videos and one file that does not exist (a placeholder)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import os
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import selenium.webdriver as webdriver
import starlette.testclient as starlette_testclient  # needs httpx, of the test extra
from PIL import Image

from as_a_shell import as_a_shell_starts_it
from broken_media import frame_number, make_video_after_audio
from conftest import SHARED
from test_model import build_tiny_text_model
from test_pretrain import WORDS, write_cache, write_captions
from test_search import vlpcache, ws  # noqa: F401  ws: a private copy of this module's template
from vlpcache.cli import main
from vlpcache.extract.sampling import read_frames_at
from vlpcache.extract.sources import Item
from vlpcache.model.train import run_pretrain
from waiting import HANG_GUARD_S, wait_until


ITEMS = 24
MISSING = 23  # the item whose source does not exist
VIDEO = 20  # an item whose source is a real video
TRUNCATED = "video data ends at 1.9 s of 8.1 s (truncated file?)"
DAMAGED = {i: TRUNCATED for i in range(1, ITEMS, 3)}  # items kept despite a decoding problem, as extract notes them


def real_sources(root: Path) -> list[tuple[Path, str]]:
    folders = sorted((SHARED / "data" / "msrvtt" / "frames" / "val").iterdir())[:VIDEO]
    videos = SHARED / "data" / "videos"
    return ([(f, "frames") for f in folders] + [(videos / "bikes.mp4", "video"), (videos / "cup.mp4", "video"),
            (videos / "vtest.avi", "video"), (root / "gone.mp4", "video")])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    if not (SHARED / "data" / "msrvtt").is_dir() or not (SHARED / "data" / "videos").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set VLPCACHE_SHARED to the shared/ folder)")
    root = tmp_path_factory.mktemp("serve")
    ws = root / "ws"
    ids = write_cache(ws / "cache", ITEMS, sources=real_sources(root), notes=DAMAGED)
    write_captions(root / "train.jsonl", ids[:16])
    write_captions(root / "val.jsonl", ids[16:])
    run_pretrain(cache_dirs=[ws / "cache"], captions=[root / "train.jsonl"], val_captions=root / "val.jsonl",
                 run_dir=ws / "runs" / "run-001", text_model=str(build_tiny_text_model(root / "tiny-bert")),
                 width=16, layers=1, batch_size=8, epochs=1, workers=0, quiet=True, device="cpu")
    with pytest.MonkeyPatch.context() as monkeypatch:
        index_workspace(monkeypatch, ws)
    return ws


def index_workspace(monkeypatch, ws: Path) -> None:
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(ws))
    monkeypatch.setattr(sys, "argv", ["vlpcache", "index", "--quiet"])
    try:
        main()
    except SystemExit as exit:
        assert not exit.code


def client_for(ws: Path, thumbnails: Path | None = None):
    from vlpcache.index.search import Searcher
    from vlpcache.serve.app import make_app
    from vlpcache.serve.thumbnails import ThumbnailStore

    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache", index=ws / "index")
    store = ThumbnailStore(thumbnails or ws / "index" / "thumbnails")
    return starlette_testclient.TestClient(make_app(searcher, store), base_url="http://127.0.0.1:8000"), searcher


@pytest.fixture(scope="module")
def api(template, tmp_path_factory):
    """A client for requests that change nothing (its thumbnails go to a folder of their own)."""
    client, _ = client_for(template, tmp_path_factory.mktemp("thumbnails"))
    return client


@pytest.fixture
def own_api(ws):
    client, _ = client_for(ws)
    return client


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "\n" not in response.text and list(response.json()) == ["error"]
    return response.json()["error"]


# ---------------------------------------------------------------- the JSON API


LONG_QUERY = ("a man in a red shirt walks his brown dog along the beach at sunset while children play football on "
              "the sand and a woman reads a book under an umbrella")  # 31 words: one past the 30 a query keeps


# 30 words read, and an end of an HTML character reference and tags, which the model reads as "& umbrella"
TAGGED_LONG_QUERY = " ".join(LONG_QUERY.split()[:30]) + " &amp; <b>umbrella</b>"


@pytest.mark.parametrize("query, unread", [("a dog on the street", ""), (LONG_QUERY, "umbrella"),
                                           (TAGGED_LONG_QUERY, "&amp; <b>umbrella</b>")], ids=["short", "long", "tagged"])
def test_search_api_gives_the_fields_of_search_json(ws, api, monkeypatch, capsys, query, unread):
    response = api.get("/api/search", params={"q": query, "k": 5})
    assert response.status_code == 200 and response.headers["server-timing"].startswith("search;dur=")
    code, out, err = vlpcache(monkeypatch, capsys, "search", query, "-k", "5", "--json")
    assert code == 0, err
    assert response.json() == json.loads(out) and response.json()["unread"] == unread


def test_the_unread_end_and_the_unknown_parts_of_a_query_are_given_as_typed_with_its_tags_and_references(api):
    # the page strikes out the query's end that `unread` names, and underlines the `unknown` parts where they stand
    body = api.get("/api/search", params={"q": TAGGED_LONG_QUERY}).json()
    assert body["unread"] == "&amp; <b>umbrella</b>" and body["query"].endswith(body["unread"])
    body = api.get("/api/search", params={"q": "a dog and a &#x732B; <b>猫</b>"}).json()
    assert body["unknown"] == ["&#x732B;", "猫"] and not body["reads_nothing"]  # (U+732B is 猫)


def test_item_api_lists_the_sampled_frames_and_their_detected_regions(api):
    item = api.get("/api/item", params={"id": f"v{VIDEO}"}).json()
    assert item["path"].endswith("bikes.mp4") and item["kind"] == "video" and item["note"] == ""
    assert api.get("/api/item", params={"id": f"v{VIDEO + 2}"}).json()["note"] == DAMAGED[VIDEO + 2]
    assert [f["time"] for f in item["frames"]] == [0.0, 1.0]
    assert all(len(f["regions"]) == 4 and all(0 <= v <= 1 for r in f["regions"] for v in r["box"]) for f in item["frames"])


def test_search_api_like_an_item_gives_the_fields_of_search_like_json(ws, api, monkeypatch, capsys):
    response = api.get("/api/search", params={"like": f"v{VIDEO}", "k": 5})
    assert response.status_code == 200 and response.headers["server-timing"].startswith("search;dur=")
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", f"v{VIDEO}", "-k", "5", "--json")
    assert code == 0, err
    assert response.json() == json.loads(out) and len(response.json()["results"]) == 5
    assert f"v{VIDEO}" not in [hit["id"] for hit in response.json()["results"]]
    assert api.get("/api/search", params={"like": f"somewhere/v{VIDEO}.mp4", "k": 5}).json() == response.json()
    # a file on the server's disk is no item like any other: what files the server has is not the caller's to learn
    answer = one_line_error(api.get("/api/search", params={"like": __file__}), 404)
    assert answer.startswith(f'"{__file__}" names no item of the index') and "not in the cache" not in answer


def test_hits_and_info_say_what_each_item_was_extracted_from(api):
    hits = api.get("/api/search", params={"q": "a dog on the street", "k": ITEMS}).json()["results"]
    assert {h["id"]: h["kind"] for h in hits} == {f"v{i}": "frames" if i < VIDEO else "video" for i in range(ITEMS)}
    assert api.get("/api/info").json()["kinds"] == {"frames": VIDEO, "video": ITEMS - VIDEO}


@pytest.mark.parametrize("params, status, message", [
    ({}, 400, "missing query"),
    ({"q": "   "}, 400, "missing query"),
    ({"q": "\u200b\x00"}, 400, "holds no words the text model reads (only zero-width or control characters, "),
    ({"q": "<b></b>"}, 400, '"<b></b>" holds no words the text model reads (only HTML formatting tags, which it reads as '
                            "nothing)"),  # what it holds: not "characters it drops: zero-width or control ones"
    ({"q": "&nbsp;"}, 400, "(only HTML character references, which it reads as nothing)"),
    ({"q": "&lt;br&gt;"}, 400, "(only HTML formatting tags and HTML character references, which it reads as nothing)"),
    ({"q": "dog " * 60}, 400, "at most 200"),
    ({"q": "a dog", "k": "0"}, 400, "k = 0"),
    ({"q": "a dog", "k": "101"}, 400, "k = 101"),
    ({"q": "a dog", "k": "ten"}, 400, "whole number"),
    ({"q": "a dog", "k": "1e9"}, 400, "whole number"),
    ({"q": "a dog", "rerank": "maybe"}, 400, "rerank must be 1 or 0 (true or false), not 'maybe'"),
    ([("q", "a dog"), ("q", "a cat")], 400, "q given 2 times; give it once"),
    ([("q", "a dog"), ("k", "5"), ("k", "50")], 400, "k given 2 times"),
    ({"like": "v3", "q": "a dog"}, 400, "give q (words to search for) or like (an item's id), not both"),
    ({"like": "v3", "k": "0"}, 400, "k = 0"),
    ({"like": "v3x"}, 404, '"v3x" names no item of the index; did you mean "v3"?'),
    ({"like": ""}, 404, '"" names no item of the index'),
])
def test_bad_search_requests_get_a_4xx_with_one_line_of_json(api, params, status, message):
    assert message in one_line_error(api.get("/api/search", params=params), status)


def test_a_query_whose_bytes_are_not_utf8_is_refused_naming_them_as_typed_not_as_u_fffd(api):
    # a Latin-1 page's link to "café", and a byte alone: Starlette reads each such byte as U+FFFD, which the text
    # model drops: "caf" was searched, and "%FF" refused as holding only "\ufffd", a character nobody typed
    assert one_line_error(api.get("/api/search?q=caf%E9&k=3"), 400) == (
        'the query "caf%E9" is not UTF-8 text (the byte %E9: a page or link in another encoding, e.g. Latin-1); '
        "percent-encode it as UTF-8 (é is %C3%A9)")
    assert one_line_error(api.get("/api/search?q=+%FF+"), 400).startswith('the query "%FF" is not UTF-8 text')
    assert api.get("/api/search?q=caf%C3%A9&k=3").status_code == 200


def test_unknown_routes_and_methods_get_one_line_json_errors(api):
    assert one_line_error(api.get("/api/nothing"), 404) == "not found"
    assert one_line_error(api.post("/api/search", params={"q": "a dog"}), 405) == "method not allowed"
    assert api.get("/favicon.ico").status_code == 204  # the browser asks for it on every page: no error in its console
    assert one_line_error(api.get("/media/frame", params={"id": "v0"}), 400) == (
        "missing t: add t=N, a whole number from 0 to 512")


def test_frame_of_an_item_not_in_the_index_is_refused_even_if_cached(ws):
    write_cache(ws / "cache", 2, prefix="w", seed=3, sources=[(SHARED / "data" / "videos" / "cup.mp4", "video")])
    client, searcher = client_for(ws)  # opened after the cache grew: w0 is cached, not indexed
    assert "w0" in searcher.cache and "w0" not in searcher.index
    said = '"w0" is cached but not in the index yet; run `vlpcache index` to add it'  # as /api/search?like=w0 says
    assert one_line_error(client.get("/media/frame", params={"id": "w0", "t": 0}), 404) == said
    assert one_line_error(client.get("/api/item", params={"id": "w0"}), 404) == said
    assert one_line_error(client.get("/api/item", params={"id": "nothing"}), 404).startswith(
        '"nothing" names no item of the index')


def test_item_and_frame_take_an_id_in_another_unicode_form_as_search_like_does(ws, monkeypatch, capsys):
    # /api/item?id= of "café-0" typed in NFD (e + a combining accent: a macOS file name pasted) was a 404, where
    # `search --like` and /api/search?like= take it
    import unicodedata

    write_cache(ws / "cache", 1, prefix="café-", seed=3, sources=[(SHARED / "data" / "videos" / "cup.mp4", "video")])
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    decomposed = unicodedata.normalize("NFD", "café-0")
    assert decomposed != "café-0" and vlpcache(monkeypatch, capsys, "search", "--like", decomposed, "-k", "2")[0] == 0
    client, _ = client_for(ws)
    assert client.get("/api/search", params={"like": decomposed, "k": 2}).json()["like"] == "café-0"
    item = client.get("/api/item", params={"id": decomposed})
    assert item.status_code == 200, item.text
    assert item.json()["id"] == "café-0" and item.json() == client.get("/api/item", params={"id": "café-0"}).json()
    frame = client.get("/media/frame", params={"id": decomposed, "t": 0})
    assert frame.status_code == 200 and frame.content == client.get("/media/frame", params={"id": "café-0", "t": 0}).content


def test_an_item_dropped_from_the_cache_since_it_was_indexed_is_refused_with_its_reason(ws):
    from vlpcache.cache.reader import RegionCache
    from vlpcache.cache.writer import ShardWriter

    client, searcher = client_for(ws)
    cache = RegionCache(ws / "cache")
    with ShardWriter(ws / "cache", cache.settings, writer_name="pruner") as writer:  # as extract --prune records it
        writer.record_removals([("v3", cache.row_of("v3"), "/data/v3.mp4", "gone")])
    for route, params in (("/api/item", {"id": "v3"}), ("/media/frame", {"id": "v3", "t": 0}),
                          ("/api/search", {"like": "v3"})):  # it said "no such item in the index" of an indexed item
        said = one_line_error(client.get(route, params=params), 404)
        assert said.startswith("'v3' was dropped from the cache ") and ": /data/v3.mp4 was gone; " in said, route
    assert client.get("/api/item", params={"id": "v4"}).status_code == 200


@pytest.mark.parametrize("params, status", [
    ({"id": "v0", "t": "2"}, 404),  # T = 2: frames 0 and 1
    ({"id": "v0", "t": "-1"}, 400),
    ({"id": "v0", "t": "one"}, 400),
    ({"id": "v0"}, 400),
    ({"t": "0"}, 400),
])
def test_frame_requests_outside_the_sampled_frames_are_refused(api, params, status):
    one_line_error(api.get("/media/frame", params=params), status)


def test_requests_for_another_host_name_are_refused(api, capsys):
    response = api.get("/api/info", headers={"host": "attacker.example:8000"})
    assert one_line_error(response, 400) == (
        "unexpected Host header attacker.example: open the server by the address it printed, or, where "
        "attacker.example is a proxy of yours (JupyterHub, nginx), start it with --allow-host attacker.example")
    assert one_line_error(api.get("/api/info", headers={"host": ""}), 400) == (
        "no Host header: open the server by the address it printed")
    api.get("/", headers={"host": "Attacker.Example"})  # said in the server's log once a name
    api.get("/", headers={"host": "other.example"})
    assert capsys.readouterr().err.splitlines() == [
        f"note: refused a request for Host {name} (this server answers 127.0.0.1, [::1], localhost); where "
        f"{name} is a proxy of yours, restart with --allow-host {name}" for name in ("attacker.example", "other.example")]
    assert api.get("/api/info", headers={"host": "localhost:8000"}).json() == {
        "items": ITEMS, "rerank": True, "model": "run-001, epoch 1", "unindexed": 0,
        "example": "the " + WORDS[0] + " here", "kinds": {"frames": VIDEO, "video": ITEMS - VIDEO}, "newer": "", "uploads": True,
        "max_upload_bytes": 2 << 30}  # the first caption of 3 to 6 words in the run's training captions


def test_a_proxy_named_by_allow_host_is_answered_and_uploads_wait_for_uploads(ws):
    """JupyterHub's jupyter-server-proxy passes on the browser's Host; nginx by default a Host of its own, the
    browser's in X-Forwarded-Host. Either way an upload's Origin is the browser's address, https:// where the
    proxy ends HTTPS and hands the request on as http://."""
    from vlpcache.index.search import Searcher
    from vlpcache.serve.app import LOOPBACK_HOSTS, make_app, proxy_host_names
    from vlpcache.serve.thumbnails import ThumbnailStore

    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache", index=ws / "index")
    assert proxy_host_names(["[2001:db8::1]:8443", "2001:db8::2", "[2001:db8::3]"]) == {
        "[2001:db8::1]", "[2001:db8::2]", "[2001:db8::3]"}  # as a Host header carries them, less the port
    hosts = proxy_host_names(["Hub.Example.org:8443"])
    assert hosts == {"hub.example.org"}
    for uploads in (None, True):
        client = starlette_testclient.TestClient(make_app(searcher, ThumbnailStore(ws / "thumbs"), LOOPBACK_HOSTS,
                                                          uploads=uploads, proxy_hosts=hosts),
                                                 base_url="http://hub.example.org:8443")
        assert client.get("/api/info").json()["uploads"] is bool(uploads)
        assert client.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
        assert client.get("/api/info", headers={"host": "attacker.example"}).status_code == 400
        answer = client.post("/api/like", content=b"not a clip",
                             headers={"x-vlpcache-filename": "x.txt", "origin": "https://hub.example.org:8443"})
        if not uploads:
            assert one_line_error(answer, 403) == (
                "this server takes no uploads: it answers through a proxy (--allow-host); `vlpcache serve --uploads` "
                "takes them from whoever the proxy lets in; or run `vlpcache search --like FILE` where the collection is")
            continue
        assert one_line_error(answer, 400).startswith("x.txt: not a video or image file")  # past the Origin: compared
        behind_nginx = {"host": "127.0.0.1:8000", "x-forwarded-host": "hub.example.org:8443"}
        answer = client.post("/api/like", content=b"not a clip", headers={
            "x-vlpcache-filename": "x.txt", "origin": "https://hub.example.org:8443", **behind_nginx})
        assert one_line_error(answer, 400).startswith("x.txt: not a video or image file")
        for origin, sent in (("https://attacker.example", {}), ("https://hub.example.org:8443", {"host": "127.0.0.1:8000"}),
                             ("https://hub.example.org", {}), ("null", {})):  # another site; a proxy that says
            # nothing; another port; a sandboxed page
            answer = client.post("/api/like", content=b"not a clip",
                                 headers={"x-vlpcache-filename": "x.txt", "origin": origin, **sent})
            assert one_line_error(answer, 403) == (
                f"uploads come from this server's own page, not from {origin} (where that is the address of a proxy "
                "of yours, have it pass on the browser's Host: in X-Forwarded-Host, or as Host with --allow-host)")


def test_who_reaches_the_server_is_said_where_others_than_its_user_may(monkeypatch, capsys):
    from vlpcache.serve.command import say_who_reaches

    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    say_who_reaches("127.0.0.1", 8000, frozenset(), None)  # this machine's user alone: nothing to say
    assert capsys.readouterr().err == ""
    say_who_reaches("127.0.0.1", 8000, frozenset({"lab.example.org"}), None)  # an nginx of the lab's
    assert capsys.readouterr().err == (
        "note: answering requests for lab.example.org too (--allow-host): whoever that proxy lets in can search the "
        "collection and see its frames (it takes no clips to compare unless given --uploads); open the proxy's "
        "address for port 8000 (JupyterHub: https://HUB/user/NAME/proxy/8000/)\n")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ann/")
    say_who_reaches("127.0.0.1", 8000, frozenset({"hub.example.org"}), True)
    assert capsys.readouterr().err.endswith("and send it clips and photos to compare (--uploads); open "
                                            "https://hub.example.org/user/ann/proxy/8000/\n")


@pytest.mark.parametrize("name", ["https://hub.example.org/user/ann/proxy/8000/", "hub.example.org/lab", "", ":8443"])
def test_allow_host_takes_a_host_name_not_an_address(ws, name):
    code, _, err = _run_cli(ws, "serve", "--port", "0", "--allow-host", name, guard_s=120)  # (a server started: a hang)
    assert code == 2 and err == (f"error: --allow-host {name!r}: give the proxy's host name as the browser's address "
                                 "has it (hub.example.org, not https://hub.example.org/user/...)\n"), err


def test_every_response_carries_the_security_headers(api):
    for response in (api.get("/"), api.get("/api/search", params={"q": "a dog"}), api.get("/nope")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in response.headers["content-security-policy"]


# ---------------------------------------------------------------- thumbnails


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float32)


@pytest.mark.parametrize("item", [0, VIDEO], ids=["frames-folder", "video"])
def test_thumbnail_is_the_frame_shown_at_its_stored_time(ws, api, item):
    from vlpcache.cache.reader import RegionCache

    cached = RegionCache(ws / "cache").get(f"v{item}")
    source = Item(cached["id"], Path(cached["path"]), cached["kind"])
    reference = read_frames_at(source, [float(t) for t in cached["timestamps"]], 480).frames  # stamped 0 s and 1 s
    for t in (0, 1):
        response = api.get("/media/frame", params={"id": f"v{item}", "t": t})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert "x-vlpcache-placeholder" not in response.headers
        picture = decoded(response.content)
        assert picture.shape == reference[t].shape
        assert np.abs(picture - reference[t]).mean() < 3  # JPEG's loss only
        assert np.abs(picture - reference[1 - t]).mean() > np.abs(picture - reference[t]).mean() + 1  # not the other


def test_thumbnails_are_kept_beside_the_index_under_hashed_names(ws, own_api):
    api = own_api
    first = api.get("/media/frame", params={"id": f"v{VIDEO + 1}", "t": 1})
    stored = list((ws / "index" / "thumbnails").glob("*/*.jpg"))
    assert len(stored) == 1 and stored[0].read_bytes() == first.content
    assert f"v{VIDEO + 1}" not in str(stored[0].relative_to(ws)) and len(stored[0].stem) == 64
    again = api.get("/media/frame", params={"id": f"v{VIDEO + 1}", "t": 1}, headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304


def test_a_thumbnail_store_of_another_format_is_emptied_and_begun_again(ws, own_api):
    from vlpcache.serve.thumbnails import STORE_FILE, STORE_FORMAT

    folder = ws / "index" / "thumbnails"
    first = own_api.get("/media/frame", params={"id": f"v{VIDEO + 1}", "t": 1})
    [stored] = folder.glob("*/*.jpg")
    stored.write_bytes(b"a thumbnail as another format keeps it")  # the same name, another content
    (folder / STORE_FILE).write_text(json.dumps({"format": STORE_FORMAT + 1}))
    client, _ = client_for(ws)  # a server started later, by another vlpcache
    again = client.get("/media/frame", params={"id": f"v{VIDEO + 1}", "t": 1})
    assert again.status_code == 200 and again.content == first.content
    assert json.loads((folder / STORE_FILE).read_text()) == {"format": STORE_FORMAT}


def test_thumbnails_are_kept_again_after_their_folder_is_removed_or_a_write_fails(ws, own_api, monkeypatch, capsys):
    # one failed write (the folder removed to free space, a moment of full disk) turned keeping off for the
    # server's life: `mkdir` of a key's subfolder without its parents, and a flag never set back
    import errno

    from vlpcache.serve import thumbnails
    from vlpcache.serve.thumbnails import STORE_FILE, STORE_FORMAT

    folder = ws / "index" / "thumbnails"
    assert own_api.get("/media/frame", params={"id": f"v{VIDEO + 1}", "t": 0}).status_code == 200
    shutil.rmtree(folder)
    assert own_api.get("/media/frame", params={"id": f"v{VIDEO + 1}", "t": 1}).status_code == 200
    assert len(list(folder.glob("*/*.jpg"))) == 1 and json.loads((folder / STORE_FILE).read_text()) == {"format": STORE_FORMAT}
    kept = thumbnails.replace_atomically

    def full(path, write, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(thumbnails, "replace_atomically", full)
    for t in (0, 1):  # two requests: one line
        assert own_api.get("/media/frame", params={"id": f"v{VIDEO + 2}", "t": t}).status_code == 200
    assert capsys.readouterr().err.count("note: cannot keep thumbnails") == 1
    monkeypatch.setattr(thumbnails, "replace_atomically", kept)  # room made
    assert own_api.get("/media/frame", params={"id": f"v{VIDEO + 2}", "t": 0}).status_code == 200
    assert len(list(folder.glob("*/*.jpg"))) == 2


def test_the_thumbnail_store_is_kept_under_its_size_by_removing_those_least_recently_shown(ws):
    # it grew without limit: the keys of items extracted again or moved, never asked for again, stayed for good
    from vlpcache.cache.reader import RegionCache
    from vlpcache.serve.thumbnails import TRIMMED_TO, ThumbnailStore

    cache, folder = RegionCache(ws / "cache"), ws / "thumbs"
    frames = [(cache.get(f"v{i}"), t) for i in range(3) for t in (0, 1)]
    jpegs = [ThumbnailStore(ws / "sizes").get(item, t).jpeg for item, t in frames]
    store = ThumbnailStore(folder, max_bytes=sum(map(len, jpegs)) - 1)  # the sixth goes over it
    kept = lambda: {p.read_bytes() for p in folder.glob("??/*.jpg")}  # noqa: E731
    for item, t in frames[:4]:
        store.get(item, t)
    os.utime(store.path_of(store.key(*frames[1])), (1, 1))  # shown long ago: the first to go
    os.utime(store.path_of(store.key(*frames[0])), (2, 2))
    assert store.get(*frames[0]).jpeg == jpegs[0]  # shown again now: among the last to go
    assert os.stat(store.path_of(store.key(*frames[0]))).st_mtime > 1e9
    store.get(*frames[4])
    assert kept() == set(jpegs[:5])  # under the size: nothing removed
    store.get(*frames[5])
    by_last_shown = [jpegs[i] for i in (1, 2, 3, 0, 4, 5)]
    assert jpegs[1] not in kept() and {jpegs[0], jpegs[4], jpegs[5]} <= kept()
    assert any(kept() == set(by_last_shown[first:]) for first in range(1, 4))  # the least recently shown went
    assert sum(map(len, kept())) <= TRIMMED_TO * store.max_bytes
    again = ThumbnailStore(folder, max_bytes=sum(map(len, kept())) + 1)  # a server started later counts what is there
    again.get(*frames[1])
    assert jpegs[1] in kept() and sum(map(len, kept())) <= again.max_bytes


def test_info_says_when_pretrain_saved_a_newer_checkpoint_than_the_one_answering(ws, capsys):
    run = ws / "runs" / "run-001"
    [meta_file] = (ws / "index").rglob("index.json")  # ws is a copy: its index names the template's run
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "run_dir": str(run)}))
    own_api, _ = client_for(ws)
    assert own_api.get("/api/info").json()["newer"] == ""
    [first] = (run / "checkpoints").iterdir()  # epoch-0001, the best
    later = run / "checkpoints" / "epoch-0002"  # as pretrain saves a better epoch while the server runs
    shutil.copytree(first, later)
    meta = json.loads((later / "meta.json").read_text())
    (later / "meta.json").write_text(json.dumps({**meta, "epoch": 2, "sha256": "0" * 64}))
    best = json.loads((run / "best.json").read_text())
    (run / "best.json").write_text(json.dumps({**best, "epoch": 2}))
    for _ in range(2):
        info = own_api.get("/api/info").json()
    assert info["model"] == "run-001, epoch 1"
    assert info["newer"] == ("run-001's checkpoint is now epoch 2, and epoch 1 answers here: restart `vlpcache serve` "
                             "(or a new Searcher) to search with it")
    assert capsys.readouterr().err.count(f"note: {info['newer']}\n") == 1  # in the server's log once


def test_two_threads_storing_one_thumbnail_at_once_both_succeed(tmp_path):
    # two requests for the same frame (a page reloaded, two colleagues) decode it and store it at once; with one
    # temporary name per process the second rename found it gone and the server stopped keeping thumbnails
    from vlpcache.files import replace_atomically

    path, both_written = tmp_path / "ab" / "thumbnail.jpg", threading.Barrier(2)
    path.parent.mkdir()
    failures = []

    def store(content: bytes) -> None:
        def write(tmp: Path) -> None:
            tmp.write_bytes(content)
            both_written.wait(timeout=HANG_GUARD_S)  # each thread has filled its temporary before either renames

        try:
            replace_atomically(path, write)
        except OSError as err:
            failures.append(err)

    threads = [threading.Thread(target=store, args=(bytes([n]) * (1000 + n),)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=HANG_GUARD_S)
    assert not failures and path.read_bytes() in (bytes([0]) * 1000, bytes([1]) * 1001)
    assert [p.name for p in path.parent.iterdir()] == ["thumbnail.jpg"]  # no temporary left behind


def test_a_thumbnail_of_an_older_cache_is_read_at_the_time_it_stored_counted_as_it_counted(tmp_path):
    # caches written before counted a video's times from its video stream's first frame, now from the file's start:
    # where the video starts after its audio, their thumbnails must still be the frames whose boxes are drawn
    import h5py

    from vlpcache.cache.reader import RegionCache
    from vlpcache.cache.schema import SHARD_DIR, TIMES_ATTR
    from vlpcache.serve.thumbnails import ThumbnailStore

    late = make_video_after_audio(tmp_path / "late.mp4", lead_ms=2000, frames=20)  # frame i from 2 + i / 10 s
    write_cache(tmp_path / "cache", 1, sources=[(late, "video")])  # its frames' stored times: 0 and 1 s

    def thumbnail(store: str) -> int:
        item = RegionCache(tmp_path / "cache").get("v0")
        return frame_number(np.asarray(Image.open(io.BytesIO(ThumbnailStore(tmp_path / store).get(item, 1).jpeg))))

    assert thumbnail("now") == 0  # 1 s into the file: before the video's first frame, which is taken
    [shard] = (tmp_path / "cache" / SHARD_DIR).glob("*.h5")
    with h5py.File(shard, "r+") as f:
        del f.attrs[TIMES_ATTR]  # as a shard written before
    assert thumbnail("before") == 10  # 1 s into the video


def test_thumbnails_of_an_index_pruned_while_serving_are_shown_without_making_its_folder_again(tmp_path):
    # the next thumbnail made <index>/thumbnails/ again in the index folder `index --prune` had removed: a folder (of up
    # to 2 GB) without index.json, which later prunes never removed
    from vlpcache.cache.reader import RegionCache
    from vlpcache.serve import thumbnails

    video = make_video_after_audio(tmp_path / "clip.mp4", lead_ms=0, frames=20)
    write_cache(tmp_path / "cache", 1, sources=[(video, "video")])
    item = RegionCache(tmp_path / "cache").get("v0")
    said = []
    store = thumbnails.ThumbnailStore(tmp_path / "index" / "thumbnails", say=said.append)
    assert store.get(item, 0).placeholder is None and len(list((tmp_path / "index").glob("thumbnails/*/*.jpg"))) == 1
    shutil.rmtree(tmp_path / "index")  # `vlpcache index --prune` of the checkpoint served
    shown = [store.get(item, 1), store.get(item, 1)]
    assert [thumbnail.placeholder for thumbnail in shown] == [None, None] and not (tmp_path / "index").exists()
    assert frame_number(np.asarray(Image.open(io.BytesIO(shown[1].jpeg)))) == 10
    assert len(said) == 1 and said[0].startswith(f"note: the index folder {tmp_path / 'index'} was removed")


def test_a_thumbnail_whose_decoding_runs_out_of_time_is_a_placeholder_not_tried_again_until_restarted(tmp_path,
                                                                                                     monkeypatch):
    # decoded in the server's own process: a frame an hour into a video without keyframes (or a GIF of a huge canvas,
    # 55 s a frame before its pixel limit) held a server thread and a core for as long as it took, at each request
    from vlpcache.cache.reader import RegionCache
    from vlpcache.serve import thumbnails

    video = make_video_after_audio(tmp_path / "clip.mp4", lead_ms=0, frames=20)
    write_cache(tmp_path / "cache", 1, sources=[(video, "video")])
    item = RegionCache(tmp_path / "cache").get("v0")
    store = thumbnails.ThumbnailStore(tmp_path / "thumbnails")
    monkeypatch.setattr(thumbnails, "THUMBNAIL_DECODE_S", 0.0)  # any decoding runs out of it
    assert "decoding took more than 0 s" in store.get(item, 1).placeholder
    monkeypatch.setattr(thumbnails, "THUMBNAIL_DECODE_S", 30.0)
    assert "tried again when serve restarts" in store.get(item, 1).placeholder
    restarted = thumbnails.ThumbnailStore(tmp_path / "thumbnails").get(item, 1)
    assert restarted.placeholder is None and frame_number(np.asarray(Image.open(io.BytesIO(restarted.jpeg)))) == 10


def blocked_in_thumbnails(threads=None) -> int:
    """How many threads (of `threads`; all where None) wait on a lock or event within ThumbnailStore.get: a held
    decode, another's decode of the same frame, a core's turn."""
    from vlpcache.serve import thumbnails

    idents = None if threads is None else {thread.ident for thread in threads}
    count = 0
    for ident, frame in sys._current_frames().items():
        if (idents is not None and ident not in idents) or frame.f_code.co_name != "wait":
            continue
        while frame is not None and not (frame.f_code.co_name == "get" and frame.f_code.co_filename == thumbnails.__file__):
            frame = frame.f_back
        count += frame is not None
    return count


def held_decodes(monkeypatch) -> tuple[list, threading.Event]:
    """Decoding of thumbnails held until the event is set; the list gets one entry per decode begun."""
    from vlpcache.serve import thumbnails

    begun, go = [], threading.Event()

    def held(*args, **kwargs):
        begun.append(args[1])
        go.wait(timeout=HANG_GUARD_S)
        return read_frames_at(*args, **kwargs)

    monkeypatch.setattr(thumbnails, "read_frames_at", held)
    return begun, go


def test_one_frame_asked_by_several_at_once_is_decoded_once_and_each_gets_it(tmp_path, monkeypatch):
    # an item's view opened by 5 people at once decoded each of its frames 5 times (a 4-minute video without
    # keyframes: 41 s for all of them instead of 6)
    from vlpcache.cache.reader import RegionCache
    from vlpcache.serve import thumbnails

    video = make_video_after_audio(tmp_path / "clip.mp4", lead_ms=0, frames=20)
    write_cache(tmp_path / "cache", 1, sources=[(video, "video")])
    item = RegionCache(tmp_path / "cache").get("v0")
    store = thumbnails.ThumbnailStore(tmp_path / "thumbnails")
    begun, go = held_decodes(monkeypatch)
    shown = []
    askers = [threading.Thread(target=lambda: shown.append(store.get(item, 1))) for _ in range(5)]
    for asker in askers:
        asker.start()
    wait_until(lambda: blocked_in_thumbnails(askers) == len(askers))  # each past the store's file, none served yet
    go.set()
    for asker in askers:
        asker.join(timeout=HANG_GUARD_S)
    assert len(begun) == 1 and len(shown) == 5
    assert {thumbnail.placeholder for thumbnail in shown} == {None} and len({t.jpeg for t in shown}) == 1
    assert frame_number(np.asarray(Image.open(io.BytesIO(shown[0].jpeg)))) == 10
    assert store.get(item, 1).jpeg == shown[0].jpeg and len(begun) == 1  # kept: read, not decoded again


@contextlib.contextmanager
def served_in_thread(app):
    """The app under uvicorn in a thread of this process (so that a test can hold its decodes); its base URL."""
    import uvicorn

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive())
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=HANG_GUARD_S)
        listener.close()


def test_the_page_info_and_search_answer_while_many_thumbnails_wait_for_their_decoding(ws, monkeypatch):
    # ~80 cold thumbnails asked at once held every thread that the page, info and search share while waiting for
    # a core: the page took 18 s, a search 10 s (0.02 s alone)
    import requests

    from vlpcache.index.search import Searcher
    from vlpcache.serve import app as served
    from vlpcache.serve.thumbnails import ThumbnailStore

    shared = 40  # anyio's default thread limiter: the threads starlette's sync handlers share
    monkeypatch.setattr(served, "THUMBNAIL_THREADS", shared)  # as many: every thread a thumbnail can hold, held
    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache", index=ws / "index")
    app = served.make_app(searcher, ThumbnailStore(ws / "index" / "thumbnails"))
    begun, go = held_decodes(monkeypatch)
    answered = []

    def ask_the_rest():
        for path, params in [("/", {}), ("/api/info", {}), ("/api/search", {"q": WORDS[0]}), ("/page.js", {})]:
            answered.append(requests.get(url + path, params=params, timeout=HANG_GUARD_S).status_code)

    with served_in_thread(app) as url:
        frames = [threading.Thread(target=requests.get, args=(f"{url}/media/frame",),
                                   kwargs={"params": {"id": f"v{VIDEO + n % 3}", "t": n % 2}, "timeout": HANG_GUARD_S})
                  for n in range(shared + 8)]
        others = threading.Thread(target=ask_the_rest)
        try:
            for frame in frames:
                frame.start()
            wait_until(lambda: blocked_in_thumbnails() == shared)  # the rest wait for a thread of theirs
            others.start()
            # failing is waiting until the decodes are let go: they are not, until all answered or a minute passed
            wait_until(lambda: len(answered) == 4, guard_s=60)
            assert answered == [200] * 4 and len(begun) <= 6  # 3 items' 2 frames, each decoded once
        finally:
            go.set()
            for thread in [*frames, others] if others.ident else frames:
                thread.join(timeout=HANG_GUARD_S)


def test_thumbnail_survives_its_source_once_stored(template, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    video = tmp_path / "moved" / "cup.mp4"
    video.parent.mkdir()
    shutil.copy(SHARED / "data" / "videos" / "cup.mp4", video)
    write_cache(ws / "cache", 1, prefix="x", seed=4, sources=[(video, "video")])
    index_workspace(monkeypatch, ws)
    client, _ = client_for(ws)
    first = client.get("/media/frame", params={"id": "x0", "t": 0})
    video.unlink()
    second = client.get("/media/frame", params={"id": "x0", "t": 0})
    assert "x-vlpcache-placeholder" not in second.headers and second.content == first.content


def test_a_source_changed_since_extract_gives_a_placeholder_until_extracted_and_indexed_again(template, tmp_path,
                                                                                               monkeypatch, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    video = tmp_path / "clip.mp4"
    shutil.copy(SHARED / "data" / "videos" / "cup.mp4", video)
    write_cache(ws / "cache", 1, prefix="x", seed=4, sources=[(video, "video")])
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(ws))
    assert vlpcache(monkeypatch, capsys, "index", "--qbnorm", "--quiet")[0] == 0  # with a query bank
    shutil.copy(SHARED / "data" / "videos" / "bikes.mp4", video)  # replaced: its frames are not the cached boxes'
    client, _ = client_for(ws)
    changed = client.get("/media/frame", params={"id": "x0", "t": 1})
    assert "changed since it was extracted" in changed.headers["x-vlpcache-placeholder"]
    write_cache(ws / "cache", 1, prefix="x", seed=5, sources=[(video, "video")])  # extract redoes it
    client, _ = client_for(ws)  # until it is indexed again: found by its old vector, its old regions not drawn
    [hit] = [h for h in client.get("/api/search", params={"q": "a dog", "k": 100}).json()["results"] if h["id"] == "x0"]
    assert hit["regions"] == [] and hit["note"] == "" and "extracted again since it was indexed" in hit["outdated"]
    liked = client.get("/api/search", params={"like": "x0", "k": 3}).json()  # as the CLI's line says (it said nothing)
    assert liked["note"].startswith("x0 was extracted again since it was indexed (its source changed): these are the")
    assert "note" not in client.get("/api/search", params={"like": "v0", "k": 3}).json()
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "1 indexed item(s) were extracted again since they were indexed" in err
    assert "encoded 1 videos" in err  # that one alone: the others' vectors are kept
    client, searcher = client_for(ws)
    fresh = client.get("/media/frame", params={"id": "x0", "t": 1})
    assert fresh.status_code == 200 and "x-vlpcache-placeholder" not in fresh.headers
    assert fresh.headers["cache-control"] == "private, no-cache"  # a browser asks again: the URL is the same
    import torch

    from vlpcache.querybank import QueryBank
    from vlpcache.model.batch import video_batch
    from vlpcache.model.checkpoint import load_run

    new_row = searcher.cache.get("x0")
    run = load_run(ws / "runs" / "run-001")
    with torch.inference_mode():
        expected = run.model.encode_video(**video_batch([new_row])).global_[0].numpy()
    np.testing.assert_allclose(searcher.index.embeddings[searcher.index.row_of("x0")], expected, atol=1e-5)
    assert len(searcher.index) == ITEMS + 1
    bank = searcher.query_bank  # made again for the rows as they are now
    expected_bank = QueryBank.build(bank.bank, searcher.index.embeddings, bank.beta, bank.k)
    np.testing.assert_allclose(bank.log_norm, expected_bank.log_norm, rtol=1e-5)
    index = searcher.index  # every row's vector and regions are its own item's, after the rows moved
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([searcher.cache.get(i) for i in index.ids]))
    np.testing.assert_allclose(index.embeddings, video.global_.numpy(), atol=1e-5)
    for row in range(len(index)):
        regions, mask, _ = index.regions.gather([row])
        np.testing.assert_allclose(regions[0][mask[0]], video.regions[row][video.region_mask[row]].numpy(), atol=2e-3)


def test_a_running_searcher_takes_up_items_extracted_since_and_refuses_bad_arguments_in_one_line(ws, monkeypatch):
    # a notebook's Searcher kept "unindexed": 0 (and the old rows of items extracted again) until restarted;
    # k=2.5, a query of None and device="gpu" were internal errors or nothing at all
    from vlpcache.errors import UserError
    from vlpcache.index import search

    monkeypatch.setattr(search, "SHARDS_LOOKED_EVERY_S", 0.0)  # looked for at every query here
    client, searcher = client_for(ws)
    assert client.get("/api/info").json()["unindexed"] == 0
    write_cache(ws / "cache", 2, prefix="w", seed=9)  # extract commits a shard meanwhile
    assert client.get("/api/info").json()["unindexed"] == 2 and "w1" in searcher.cache
    for call, says in ((lambda: searcher.search(None), "a query is text (str), not NoneType"),
                       (lambda: searcher.search("a dog", k=2.5), "k = 2.5: give a whole number of results"),
                       (lambda: search.Searcher(device="gpu"), "device 'gpu': choose one of auto, cpu, cuda")):
        with pytest.raises(UserError, match=re.escape(says)):
            call()
    monkeypatch.setenv("HOME", str(ws.parent))
    assert ws.parent / "v.npy" in searcher.export("~/v.npy")  # ~ as in a shell


def test_info_counts_items_extracted_again_since_the_index_was_built_as_unindexed(ws, monkeypatch, capsys):
    # "unindexed" counted only ids the index lacks: an item extracted again (its source changed), whose index row is
    # of its old content and which `vlpcache index` indexes anew, was left out of the figure and of the page's line
    from vlpcache.index import search

    monkeypatch.setattr(search, "SHARDS_LOOKED_EVERY_S", 0.0)  # looked for at every request here
    write_cache(ws / "cache", 1, prefix="x", seed=4)
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    client, searcher = client_for(ws)
    assert client.get("/api/info").json()["unindexed"] == 0
    write_cache(ws / "cache", 1, prefix="x", seed=5)  # extract redoes x0 (its source changed)
    write_cache(ws / "cache", 1, prefix="y", seed=6)  # and caches a new item
    assert client.get("/api/info").json()["unindexed"] == 2 and searcher.extracted_again == {"x0"}
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    assert client.get("/api/info").json()["unindexed"] == 0


def test_a_move_that_extract_records_is_taken_up_by_a_running_server(ws):
    # the server re-read the cache only when `vlpcache index` wrote the index; a move writes no index
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.index.search import GONE_HIT

    client, searcher = client_for(ws)
    gone = f"v{MISSING}"

    def hit() -> dict:
        return next(h for h in client.get("/api/search", params={"q": "a dog", "k": 100}).json()["results"] if h["id"] == gone)

    assert hit()["outdated"] == GONE_HIT
    moved = ws.parent / "moved" / "gone.mp4"
    moved.parent.mkdir()
    shutil.copy(SHARED / "data" / "videos" / "cup.mp4", moved)
    with ShardWriter(ws / "cache", searcher.cache.settings, writer_name="mover") as writer:  # as extract records it
        writer.record_move(gone, searcher.cache.get(gone)["path"], str(moved))
    assert hit()["outdated"] == "" and hit()["path"] == str(moved)
    frame = client.get("/media/frame", params={"id": gone, "t": 0})
    assert frame.status_code == 200 and "x-vlpcache-placeholder" not in frame.headers


def test_a_hit_whose_cached_row_does_not_read_gets_its_reason_and_a_placeholder_not_a_broken_picture(ws):
    from broken_media import damage_chunk
    from vlpcache.index.search import UNREADABLE_HIT

    client, searcher = client_for(ws)
    shard = searcher.cache.shard_paths[0]
    damage_chunk(shard, "boxes", searcher.cache.row_of("v3")[1])
    [hit] = [h for h in client.get("/api/search", params={"q": "a dog", "k": 100}).json()["results"] if h["id"] == "v3"]
    assert hit["outdated"] == UNREADABLE_HIT and hit["regions"] == []
    item = client.get("/api/item", params={"id": "v3"}).json()
    assert item.get("unreadable") == UNREADABLE_HIT and item["frames"] == [] and item["note"] == "", item
    frame = client.get("/media/frame", params={"id": "v3", "t": hit["frame"]})  # the source's first frame
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    assert "x-vlpcache-placeholder" not in frame.headers and decoded(frame.content).std() > 10  # a picture, not grey
    # a cache this user may not write (another's): nothing is recorded, and the hit does not say it is
    shutil.rmtree(ws / "cache" / "damaged")
    (ws / "cache" / "damaged").write_text("")  # root writes any folder: a file where the records go instead
    client, _ = client_for(ws)
    [hit] = [h for h in client.get("/api/search", params={"q": "a dog", "k": 100}).json()["results"] if h["id"] == "v3"]
    assert hit["outdated"] == (UNREADABLE_HIT.split("; recorded")[0] + "; it could not be recorded in the cache (File "
                               "exists): its owner can move the damaged shard out and run `vlpcache extract` again")
    assert client.get("/api/item", params={"id": "v3"}).json()["unreadable"] == hit["outdated"]
    (ws / "cache" / "damaged").unlink()
    write_cache(ws / "cache", 2, prefix="w", seed=9)  # extracted since the index was built
    client, _ = client_for(ws)
    assert client.get("/api/info").json()["unindexed"] == 2  # the page says so, and to run `vlpcache index`


def test_missing_source_gives_a_placeholder_of_the_frames_shape_not_an_error(api):
    response = api.get("/media/frame", params={"id": f"v{MISSING}", "t": 0})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "file not found" in response.headers["x-vlpcache-placeholder"]
    assert response.headers["cache-control"] == "no-store"
    assert Image.open(io.BytesIO(response.content)).size == (480, 360)  # the cache records 320 x 240
    from vlpcache.index.search import GONE_HIT

    hits = api.get("/api/search", params={"q": "a dog", "k": 100}).json()["results"]
    assert [h["outdated"] for h in hits if h["id"] == f"v{MISSING}"] == [GONE_HIT]  # and why, in words
    assert all(h["outdated"] == "" for h in hits if h["id"] != f"v{MISSING}")


def test_serving_with_an_exported_index_never_imports_torch(ws):
    probe = ("import sys; from starlette.testclient import TestClient; from vlpcache import Searcher\n"
             "from vlpcache.serve.app import make_app; from vlpcache.serve.thumbnails import ThumbnailStore\n"
             f"s = Searcher(cache={str(ws / 'cache')!r})\n"
             f"c = TestClient(make_app(s, ThumbnailStore({str(ws / 'index' / 'thumbnails')!r})), base_url='http://localhost')\n"
             "assert c.get('/api/search', params={'q': 'a dog'}).status_code == 200\n"
             "assert c.get('/media/frame', params={'id': 'v0', 't': 0}).status_code == 200\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S,
                            env={**os.environ, "VLPCACHE_WORKSPACE": str(ws)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------- the command, as a user starts it


class Server:
    """`vlpcache serve --port 0` in its own process, as a user starts it; stopped with Ctrl+C."""

    def __init__(self, ws: Path, *args: str, env: dict | None = None, open_files: int | None = None):
        # as a shell starts it (the suite: maybe nohup), open_files its `ulimit -n` (soft and hard)
        limits = {"RLIMIT_NOFILE": (open_files, open_files)} if open_files else {}
        self.process = subprocess.Popen(
            as_a_shell_starts_it([sys.executable, "-m", "vlpcache", "serve", "--port", "0", *args],
                                 default=[signal.SIGHUP], limits=limits), cwd=ws.parent,
            env={**os.environ, "VLPCACHE_WORKSPACE": str(ws), **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.url = self._read_url()
        self.host, self.port = self.url.split("/")[2].rsplit(":", 1)

    def _read_url(self) -> str:
        """The address of the "serving ... at URL" line; no clock: the output ends if the server dies first."""
        for line in iter(self.process.stdout.readline, ""):
            if line.startswith("serving "):
                self.suggestion = self.process.stdout.readline().rstrip("\n")  # "try URL?q=..."
                return line.split(" at ")[1].split()[0]
        self.stop()
        raise AssertionError(f"vlpcache serve did not start: {self.process.stderr.read()}")

    def get(self, raw_path: str) -> tuple[int, dict, bytes]:
        """GET with the path sent exactly as written (no client-side normalisation of ../ or %2e)."""
        connection = http.client.HTTPConnection(self.host, int(self.port), timeout=HANG_GUARD_S)
        try:
            connection.putrequest("GET", raw_path, skip_accept_encoding=True)
            connection.endheaders()
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def stop(self, signum: int = signal.SIGINT) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server(ws):
    running = Server(ws, "--thumbnails-max", "0.5")  # a user's own size for the thumbnails, taken through to the store
    yield running
    running.stop()


def test_serving_on_every_address_says_so_and_answers_the_names_others_reach_it_by(ws):
    running = Server(ws, "--host", "0.0.0.0")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(running.port), timeout=HANG_GUARD_S)
        connection.putrequest("GET", "/api/info", skip_host=True)
        connection.putheader("Host", f"workstation.lan:{running.port}")  # as a browser on another machine sends it
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["items"] == ITEMS
        connection.close()
    finally:
        running.stop()
    assert running.url == f"http://127.0.0.1:{running.port}/"
    assert ("note: listening on 0.0.0.0: anyone who can reach this machine can search the collection and see its "
            f"frames (it takes no clips to compare unless given --uploads); others open "
            f"http://{socket.gethostname()}:{running.port}/") in running.process.stderr.read().splitlines()
    running = Server(ws, "--host", "0.0.0.0", "--uploads")  # a lab's server that takes its users' clips
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(running.port), timeout=HANG_GUARD_S)
        connection.putrequest("GET", "/api/info", skip_host=True)
        connection.putheader("Host", f"workstation.lan:{running.port}")
        connection.endheaders()
        assert json.loads(connection.getresponse().read())["uploads"] is True
        connection.close()
    finally:
        running.stop()
    assert ("note: listening on 0.0.0.0: anyone who can reach this machine can search the collection and see its "
            f"frames and send it clips and photos to compare (--uploads); others open "
            f"http://{socket.gethostname()}:{running.port}/") in running.process.stderr.read().splitlines()


TRAVERSALS = [
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/..%2f..%2f..%2fetc%2fpasswd",
    "/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "/page.js/../../../../etc/passwd",
    "/page.css%2f..%2f..%2f..%2fetc%2fpasswd",
    "/..%5c..%5c..%5cetc%5cpasswd",
    "/media/frame?id=../../../../etc/passwd&t=0",
    "/media/frame?id=%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd&t=0",
    "/media/frame?id=%252e%252e%252fetc%252fpasswd&t=0",
    "/media/frame?id=/etc/passwd&t=0",
    "/media/frame?id=..%5c..%5cetc%5cpasswd&t=0",
    "/media/frame?id=v0%00../../etc/passwd&t=0",
    "/media/frame?id={video_path}&t=0",
    "/media/frame/../../../../etc/passwd?id=v0&t=0",
    "/api/item?id=../../../../etc/passwd",
    "/api/item?id=%2e%2e%2f%2e%2e%2fcache%2fmanifest.json",
]


def test_traversal_attempts_reach_no_file_outside_the_indexed_media(ws, server):
    video_path = str(SHARED / "data" / "videos" / "bikes.mp4")
    for raw in TRAVERSALS:
        path = raw.replace("{video_path}", video_path)
        status, headers, body = server.get(path)
        assert status in (400, 404), (path, status, body[:200])
        assert headers["content-type"] == "application/json", path
        assert b"root:" not in body and b"schema_version" not in body and b"\n" not in body, path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],  # SIGTERM: systemd, docker
                         ids=["ctrl-c", "sigterm", "sighup"])  # SIGHUP: the terminal it was started from closed
def test_the_command_serves_the_page_and_stops_cleanly_on_ctrl_c_or_sigterm(ws, server, signum):
    status, headers, body = server.get("/?q=a+dog")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'src="page.js"' in body
    status, _, body = server.get("/api/search?q=a+dog&k=3")
    assert status == 200 and len(json.loads(body)["results"]) == 3
    server.stop(signum)
    out, err = server.process.communicate()
    assert server.process.returncode == 0 and out.splitlines()[-1] == "stopped" and not err, err
    assert server.suggestion == f"try {server.url}?q=the+{WORDS[0]}+here"  # a caption of the run's, not of cooking


def _answer(connection: socket.socket) -> bytes:
    """What the server wrote on a connection until it closed it (a guard against a server that never does)."""
    connection.settimeout(120)  # far beyond the deadlines the tests below set: it fails only a server that holds on
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


def test_connections_that_send_no_request_are_closed_and_the_server_answers_beyond_its_open_file_limit(ws):
    running = Server(ws, env={"VLPCACHE_REQUEST_HEAD_S": "1"}, open_files=256)  # holds 64 connections: a quarter
    try:
        half = socket.create_connection((running.host, int(running.port)))  # first: held, not refused unread
        half.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head never finished (a slowloris)
        idle = [socket.create_connection((running.host, int(running.port))) for _ in range(300)]  # never send a byte
        answers = [_answer(connection) for connection in [*idle, half]]
        status, _, body = running.get("/api/info")
        assert status == 200 and json.loads(body)["items"] == ITEMS
    finally:
        running.stop()
        for connection in [*idle, half]:
            connection.close()
    refused = [a for a in answers if a]  # those beyond what it holds: a 503 at once; the others closed unanswered
    assert refused and all(a.startswith(b"HTTP/1.1 503 ") for a in refused) and len(refused) < len(answers)
    err = running.process.stderr.read()
    assert err.count("connections are open, as many as this server holds") == 1 and "Too many open files" not in err


def _stalled_upload(server: Server, name: str, declared: int) -> socket.socket:
    """An upload to the page's API that declares `declared` bytes, sends 64 KB of them and then nothing."""
    connection = socket.create_connection((server.host, int(server.port)))
    connection.sendall(f"POST /api/like HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nOrigin: {server.url[:-1]}\r\n"
                       f"x-vlpcache-filename: {name}\r\nContent-Length: {declared}\r\n\r\n".encode() + bytes(65536))
    return connection


def _uploads_in(temporary: Path) -> list[Path]:
    return [path for path in temporary.iterdir() if path.name.startswith("vlpcache-upload-")]


def test_a_stalled_upload_is_dropped_with_408_freeing_its_slot_and_its_file(ws, tmp_path):
    temporary = tmp_path / "tmpdir"
    temporary.mkdir()
    running = Server(ws, env={"VLPCACHE_UPLOAD_STALL_S": "1", "TMPDIR": str(temporary)})
    try:
        stalled = [_stalled_upload(running, f"clip{i}.mp4", 50_000_000) for i in range(4)]  # every upload slot
        answers = [_answer(connection) for connection in stalled]
        later = http.client.HTTPConnection(running.host, int(running.port), timeout=HANG_GUARD_S)
        later.request("POST", "/api/like", body=b"not a clip", headers={"x-vlpcache-filename": "later.mp4"})
        status = later.getresponse().status
    finally:
        running.stop()
        for connection in stalled:
            connection.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") and b"nothing of the file came for 1 s" in a for a in answers), answers
    assert status == 400  # read, and found no clip: not a 503 for four uploads held
    assert not _uploads_in(temporary)  # their partial files removed
    err = running.process.stderr.read()
    assert err.count("stopped after 0.1 MB: nothing more came for 1 s (its sender stalled?); dropped") == 4, err


def test_sigterm_stops_the_server_while_an_upload_is_still_arriving(ws, tmp_path):
    temporary = tmp_path / "tmpdir"
    temporary.mkdir()
    running = Server(ws, env={"TMPDIR": str(temporary)})
    slow = _stalled_upload(running, "slow.mp4", 1_000_000)
    wait_until(lambda: _uploads_in(temporary), alive=running.process, guard_s=120)  # its file begun

    def trickle():  # a slow network: a few bytes at a time, until the server goes (its grace is not a stall's)
        with contextlib.suppress(OSError):
            while running.process.poll() is None:
                slow.sendall(bytes(10))
                time.sleep(0.2)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    running.process.send_signal(signal.SIGTERM)
    try:
        out, err = running.process.communicate(timeout=120)  # (uvicorn alone waited for the upload's end)
    finally:
        running.stop()
        slow.close()
    assert running.process.returncode == 0 and out.splitlines()[-1] == "stopped", err
    assert "Traceback" not in err and not _uploads_in(temporary)  # the upload's file removed


def test_a_port_in_use_is_one_line_error(ws, server):
    code, _, err = _run_cli(ws, "serve", "--port", server.port)
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and "--port" in err
    assert err.count("\n") == 1


def test_a_host_address_of_another_machine_is_one_line_about_the_host_not_the_port(ws):
    code, _, err = _run_cli(ws, "serve", "--host", "203.0.113.77", "--port", "0")  # TEST-NET-3: documentation only, no machine's
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: cannot listen on 203.0.113.77:0 (") and "--host 203.0.113.77 is not an address of this " \
        "machine; pass one of its addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (all)" in err, err


def _run_cli(ws: Path, *args, guard_s: float = HANG_GUARD_S) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "vlpcache", *map(str, args)], capture_output=True, text=True,
                            timeout=guard_s, env={**os.environ, "VLPCACHE_WORKSPACE": str(ws)})
    return result.returncode, result.stdout, result.stderr


# ---------------------------------------------------------------- the page in a real browser


def chromium_driver(tmp_path: Path, *flags: str):
    """Debian's chromium through its chromedriver (nothing downloaded), or a skip with the reason; flags: more of
    chromium's own."""
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@contextlib.contextmanager
def page_served(ws: Path, tmp_path: Path, *args: str):
    """(`vlpcache serve` of `ws`, given `args`, in its own process; headless Chromium to open it), both stopped after."""
    server, browser = Server(ws, *args), None
    try:
        browser = chromium_driver(tmp_path)
        yield server, browser
    finally:
        if browser is not None:
            browser.quit()
        server.stop()


def keep_screenshots(tmp_path: Path, *names: str) -> None:
    """The screenshots a test saved in tmp_path, copied to VLPCACHE_SCREENSHOTS=DIR where set, to look at them."""
    if folder := os.environ.get("VLPCACHE_SCREENSHOTS"):
        for name in names:
            shutil.copy(tmp_path / name, Path(folder) / name)


def test_page_in_headless_chromium_shows_result_cards_with_thumbnails_and_boxes(ws, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver(tmp_path)
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "Search 24 videos (20 as frames folders) by" in b.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").text.endswith("(model: run-001, epoch 1).")  # which run answers
        box = browser.find_element(By.ID, "q")
        wait.until(lambda b: box.get_attribute("placeholder") == f"the {WORDS[0]} here")  # a caption of the run's
        box.send_keys("a man with a dog", Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) == 12)
        assert "q=a+man+with+a+dog" in browser.current_url  # the query lives in the URL
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("12 results for “a man with a dog” · "))
        assert browser.find_element(By.ID, "status").text.endswith(" ms · run-001, epoch 1")  # beside its results too
        loaded = "return [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
        wait.until(lambda b: b.execute_script(loaded))
        boxes = browser.execute_script(
            "return [...document.querySelectorAll('.card .box')].map(b => b.getBoundingClientRect())"
            ".filter(r => r.width > 0 && r.height > 0).length")
        assert boxes > 0
        marks = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#query-words mark")]
        assert marks and set(marks) <= {"man", "dog"}  # "a" and "with" say nothing about a region
        noted = browser.execute_script("return [...document.querySelectorAll('.card')].filter("
                                       "c => c.querySelector('.note')).map(c => c.dataset.id)")
        shown = browser.execute_script("return [...document.querySelectorAll('.card')].map(c => c.dataset.id)")
        assert noted and noted == [i for i in shown if int(i[1:]) in DAMAGED]  # a damaged item says so on its card
        assert browser.find_element(By.CSS_SELECTOR, ".card .note").text == f"kept with a note: {TRUNCATED}"
        browser.save_screenshot(str(tmp_path / "results.png"))

        browser.find_elements(By.CSS_SELECTOR, ".card")[0].click()
        wait.until(lambda b: b.execute_script("return document.getElementById('detail').open"))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#detail-frames figure")) == 2)
        wait.until(lambda b: b.execute_script(loaded.replace(".card img", "#detail-frames img")))
        assert "item=" in browser.current_url
        browser.save_screenshot(str(tmp_path / "detail.png"))

        browser.get(browser.current_url)  # a result page can be linked and reloaded
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) == 12)
        assert browser.execute_script("return document.getElementById('detail').open")

        opened = browser.find_element(By.ID, "detail-title").text  # its items most like it, a link away
        browser.find_element(By.ID, "detail-like").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(f"12 items most like “{opened}” · "))
        assert urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query) == {"like": [opened], "k": ["12"]}
        liked = browser.execute_script("return [...document.querySelectorAll('.card')].map(c => c.dataset.id)")
        assert len(liked) == 12 and opened not in liked and not browser.find_elements(By.CSS_SELECTOR, ".card .box")
        wait.until(lambda b: b.execute_script(loaded))
        browser.save_screenshot(str(tmp_path / "like.png"))
        browser.find_element(By.CSS_SELECTOR, "#query-words a.example").click()  # the example's own frames
        wait.until(lambda b: b.execute_script("return document.getElementById('detail').open"))
        assert browser.find_element(By.ID, "detail-title").text == opened
        browser.find_element(By.ID, "detail-close").click()

        first = liked[0]  # a card's own "like this" link: the items most like it, its frames not opened
        browser.find_elements(By.CSS_SELECTOR, ".card a.like")[0].click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(f"12 items most like “{first}” · "))
        assert urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query) == {"like": [first], "k": ["12"]}
        assert not browser.execute_script("return document.getElementById('detail').open")
        second = browser.execute_script("return document.querySelectorAll('.card')[1].dataset.id")
        browser.find_elements(By.CSS_SELECTOR, ".card a.like")[1].send_keys(Keys.ENTER)  # by keyboard too
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(f"12 items most like “{second}” · "))
        assert not browser.execute_script("return document.getElementById('detail').open")

        browser.get(server.url + "?" + urllib.parse.urlencode({"q": LONG_QUERY}))  # the end the model does not read
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#query-words s.unread"))
        assert browser.find_element(By.CSS_SELECTOR, "#query-words s.unread").text == "umbrella"
        assert browser.find_element(By.ID, "query-words").text == LONG_QUERY
        status = browser.find_element(By.ID, "status").text
        assert " · run-001, epoch 1 · the end of the query, struck out below, is past what the model reads" in status
        browser.save_screenshot(str(tmp_path / "unread.png"))
    finally:
        browser.quit()
    assert Image.open(tmp_path / "results.png").size[0] > 0
    keep_screenshots(tmp_path, "results.png", "detail.png", "like.png", "unread.png")  # VLPCACHE_SCREENSHOTS=DIR pytest ...


def test_the_page_opened_with_a_query_that_is_not_utf8_names_its_byte_not_u_fffd(ws, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver(tmp_path)
    try:
        browser.get(server.url + "?q=caf%E9")  # a Latin-1 page's link: the browser's URLSearchParams reads "caf\ufffd"
        status = lambda b: b.find_element(By.ID, "status").text  # noqa: E731
        WebDriverWait(browser, 30).until(lambda b: "error: " in status(b) or " results for " in status(b))
        assert status(browser).startswith('error: the query "caf%E9" is not UTF-8 text'), status(browser)  # not "caf" searched
    finally:
        browser.quit()


def test_the_page_strikes_out_the_unread_end_once_and_underlines_unknown_parts_as_typed_with_tags_and_references(
        ws, server, tmp_path):
    """The model reads a query without its HTML tags and with its character references decoded: the page found
    none of what it read in the query as typed, and showed the whole query, then its end again struck out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver(tmp_path)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(server.url + "?" + urllib.parse.urlencode({"q": TAGGED_LONG_QUERY}))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#query-words s.unread"))
        assert browser.find_element(By.CSS_SELECTOR, "#query-words s.unread").text == "&amp; <b>umbrella</b>"
        assert browser.find_element(By.ID, "query-words").text == TAGGED_LONG_QUERY  # each word once
        browser.save_screenshot(str(tmp_path / "unread-tagged.png"))
        browser.get(server.url + "?" + urllib.parse.urlencode({"q": "a dog and a &#x732B; <b>猫</b>"}))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#query-words .unknown"))
        assert [part.text for part in browser.find_elements(By.CSS_SELECTOR, "#query-words .unknown")] == ["&#x732B;", "猫"]
        assert browser.find_element(By.ID, "query-words").text == "a dog and a &#x732B; <b>猫</b>"
    finally:
        browser.quit()
    keep_screenshots(tmp_path, "unread-tagged.png")


def test_the_page_by_keyboard_and_back_button_and_when_the_server_stops_answering(ws, server, tmp_path):
    """Enter on a card opens its item and it stays open; Escape closes it; Back closes an item opened
    from a card, leaving the results; Back to an earlier query shows that query in the box; each card
    says where its frame sits as its kind has it; a server that stopped answering is said so."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    first = server.url + "?" + urllib.parse.urlencode({"q": "a man with a dog"})
    is_open = "return document.getElementById('detail').open"
    browser = chromium_driver(tmp_path)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(first)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) == 12)
        times = browser.execute_script("return [...document.querySelectorAll('.card')].map("
                                       "c => [hitsById.get(c.dataset.id).kind, c.querySelector('.time').textContent])")
        assert {kind for kind, _ in times} == {"frames", "video"}, times  # both kinds among the 12
        assert all(re.fullmatch(r"@ image [12]" if kind == "frames" else r"@ \d+\.\d\d s", text) for kind, text in times), times
        from vlpcache.report import clock_text  # a long video's times as search says them: minutes and seconds
        moments = [1.844, 59.996, 2475.64, 3723.5, 5 / 30, float(np.float32(0.3)), float(np.float32(3600.3))]
        assert browser.execute_script(f"return {moments}.map(clockText)") == [clock_text(t) for t in moments] == [
            "1.84 s", "59.99 s", "41:15.64", "1:02:03.50", "0.16 s", "0.30 s", "1:00:00.30"]  # rounded down (below)

        browser.find_element(By.CSS_SELECTOR, ".card").send_keys(Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#detail-frames figure")) == 2)
        assert browser.execute_script(is_open) and "item=" in browser.current_url  # not closed by the same key press
        caption = browser.find_element(By.CSS_SELECTOR, "#detail-frames figcaption").text
        assert re.fullmatch(r"frame 1 of 2 · (image 1|0\.00 s)( · best match)?", caption), caption
        browser.find_element(By.ID, "detail").send_keys(Keys.ESCAPE)
        wait.until(lambda b: not b.execute_script(is_open))
        wait.until(lambda b: b.current_url == first)

        browser.find_elements(By.CSS_SELECTOR, ".card")[1].click()
        wait.until(lambda b: b.execute_script(is_open) and "item=" in b.current_url)
        browser.back()  # as a phone's Back closes an overlay
        wait.until(lambda b: not b.execute_script(is_open))
        assert browser.current_url == first and len(browser.find_elements(By.CSS_SELECTOR, ".card")) == 12

        box = browser.find_element(By.ID, "q")
        box.clear()
        box.send_keys("a red car", Keys.ENTER)
        wait.until(lambda b: "q=a+red+car" in b.current_url and b.find_element(By.ID, "status").text.startswith("12 results"))
        browser.find_element(By.ID, "q").send_keys(" typed")
        browser.back()
        wait.until(lambda b: b.current_url == first)
        wait.until(lambda b: b.find_element(By.ID, "q").get_attribute("value") == "a man with a dog")

        browser.get(server.url + "?" + urllib.parse.urlencode({"q": "a dog and a 猫"}))  # a word the text model does not know
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#query-words .unknown"))
        assert browser.find_element(By.CSS_SELECTOR, "#query-words .unknown").text == "猫"
        assert "“猫”: not known to the text model, the results follow the rest of the query" in browser.find_element(
            By.ID, "status").text
        browser.get(server.url + "?" + urllib.parse.urlencode({"q": "猫 🐶"}))  # nothing it knows: the server says so
        wait.until(lambda b: "the text model knows none of these words (“猫”, “🐶”)" in b.find_element(By.ID, "status").text)
        browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")  # the server gone
        browser.find_element(By.CSS_SELECTOR, ".card").click()
        wait.until(lambda b: "error:" in b.find_element(By.ID, "detail-meta").text)
        meta = browser.find_element(By.ID, "detail-meta").text
        assert meta.startswith("#1 · score ") and meta.endswith(
            " · error: the server does not answer: is `vlpcache serve` still running?"), meta
    finally:
        browser.quit()


# the page's fetch, with the /api/item answers of the ids given to hold() kept back until release(id); done[id] once
# the page has read that answer (a task after its JSON: openItem has done with it)
HOLD_ITEM_ANSWERS = """
window.held = {}; window.done = {};
const realFetch = window.fetch;
window.hold = (id) => { let release; const gate = new Promise((r) => { release = r; }); held[id] = { gate, release }; };
window.release = (id) => held[id].release();
window.fetch = async (url, ...rest) => {
  const response = await realFetch(url, ...rest);
  const id = String(url).startsWith("api/item?") && new URLSearchParams(String(url).split("?")[1]).get("id");
  if (!id || !(id in held)) return response;
  await held[id].gate;
  delete held[id];
  const json = response.json.bind(response);
  response.json = async () => { const body = await json(); setTimeout(() => { done[id] = true; }); return body; };
  return response;
};
"""


def test_an_item_answer_that_comes_late_is_dropped_not_shown_under_another_item(ws, server, tmp_path):
    # a busy server answered item A's /api/item after A was closed and B opened: B's dialog showed A's frames
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shown = "return [...document.querySelectorAll('#detail-frames img')].map((i) => new URL(i.src).searchParams.get('id'))"
    is_open = "return document.getElementById('detail').open"
    browser = chromium_driver(tmp_path)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(server.url + "?" + urllib.parse.urlencode({"q": "a man with a dog"}))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) == 12)
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        a, b = (card.get_attribute("data-id") for card in cards[:2])
        browser.execute_script(HOLD_ITEM_ANSWERS)

        browser.execute_script("hold(arguments[0])", a)
        cards[0].click()
        wait.until(lambda br: br.execute_script(is_open))
        browser.find_element(By.ID, "detail").send_keys(Keys.ESCAPE)  # closed before its frames came
        wait.until(lambda br: not br.execute_script(is_open))
        browser.execute_script("release(arguments[0])", a)
        wait.until(lambda br: br.execute_script("return done[arguments[0]] === true", a))
        assert browser.execute_script(shown) == []  # no thumbnails asked for a dialog nobody sees
        cards[1].click()
        wait.until(lambda br: br.execute_script(shown) == [b, b])
        assert browser.find_element(By.ID, "detail-title").text == b
        meta = browser.find_element(By.ID, "detail-meta").text
        assert meta.startswith("#2 · score "), meta

        browser.find_element(By.ID, "detail").send_keys(Keys.ESCAPE)
        wait.until(lambda br: not br.execute_script(is_open))
        browser.execute_script("hold(arguments[0]); hold(arguments[1]); done = {}", a, b)
        cards[0].click()
        wait.until(lambda br: br.execute_script(is_open) and "item=" in br.current_url)
        browser.back()  # closed by Back, then B opened, and A's answer comes after B's
        wait.until(lambda br: not br.execute_script(is_open) and "item=" not in br.current_url)
        cards[1].click()
        browser.execute_script("release(arguments[0])", b)
        wait.until(lambda br: br.execute_script(shown) == [b, b])
        browser.execute_script("release(arguments[0])", a)
        wait.until(lambda br: br.execute_script("return done[arguments[0]] === true", a))
        assert browser.execute_script(shown) == [b, b] and browser.find_element(By.ID, "detail-title").text == b
    finally:
        browser.quit()


def test_a_very_tall_photo_fits_the_item_view_with_its_boxes_over_it(ws, tmp_path, monkeypatch):
    """A photo of 40 x 4000 pixels was drawn as wide as its column: 35,000 pixels tall in the item view."""
    from selenium.webdriver.support.ui import WebDriverWait

    tall = tmp_path / "tall.png"
    Image.fromarray(np.linspace(0, 255, 4000 * 40 * 3).astype(np.uint8).reshape(4000, 40, 3)).save(tall)
    write_cache(ws / "cache", 1, prefix="x", seed=4, real_frames=1, sources=[(tall, "image")])
    index_workspace(monkeypatch, ws)
    with page_served(ws, tmp_path) as (running, browser):
        [frame] = json.loads(running.get("/api/item?id=x0")[2])["frames"]
        browser.get(running.url + "?item=x0")
        loaded = "const i = document.querySelector('#detail-frames img'); return i && i.complete && i.naturalWidth > 0"
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(loaded))
        picture, boxes, window_height = browser.execute_script(
            "const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };"
            "return [rect(document.querySelector('#detail-frames img')),"
            "  [...document.querySelectorAll('#detail-frames .box.detected')].map(rect), window.innerHeight]")
        left, top, right, bottom = picture
        assert bottom - top <= 0.6 * window_height + 1 and right - left < 10, picture  # its aspect kept, within sight
        assert len(boxes) == len(frame["regions"]) == 4
        for drawn, region in zip(boxes, frame["regions"]):  # where the item's boxes say, on the picture as drawn
            x1, y1, x2, y2 = region["box"]
            expected = [left + x1 * (right - left), top + y1 * (bottom - top), left + x2 * (right - left),
                        top + y2 * (bottom - top)]
            assert np.allclose(drawn, expected, atol=1), (drawn, expected)
        browser.save_screenshot(str(tmp_path / "tall-photo.png"))
    keep_screenshots(tmp_path, "tall-photo.png")


def test_the_page_says_the_items_like_one_extracted_again_since_it_was_indexed_are_like_its_old_content(ws, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_cache(ws / "cache", 1, prefix="v", seed=9)  # v0 extracted again: the index holds its old vector
    with page_served(ws, tmp_path) as (running, browser):
        browser.get(running.url + "?like=v0")
        status = lambda b: b.find_element(By.ID, "status").text  # noqa: E731
        WebDriverWait(browser, 30).until(lambda b: "items most like" in status(b) or "error" in status(b))
        assert status(browser).startswith("12 items most like “v0” · ") and (
            " · note: v0 was extracted again since it was indexed (its source changed): these are the items most like "
            "its old content; run `vlpcache index` to index it anew") in status(browser), status(browser)
        browser.save_screenshot(str(tmp_path / "like-extracted-again.png"))
    keep_screenshots(tmp_path, "like-extracted-again.png")


def test_the_page_fits_a_phone_and_a_long_word_wraps_instead_of_widening_it(ws, server, tmp_path):
    """At 375 px the query box takes the whole width on a line of its own, nothing scrolls sideways, and
    the detail's frames fit the dialog; a query word of 175 letters wraps, at phone and desktop width."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fits = "return document.documentElement.scrollWidth <= window.innerWidth"
    browser = chromium_driver(tmp_path)
    try:
        browser.set_window_size(375, 812)
        width = browser.execute_script("return window.innerWidth")
        if width > 420:
            pytest.skip(f"this chromium keeps its window {width} px wide")
        wait = WebDriverWait(browser, 30)
        browser.get(server.url + "?" + urllib.parse.urlencode({"q": "a man with a dog"}))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) == 12)
        query_box = browser.find_element(By.ID, "q").rect
        assert query_box["width"] >= 0.8 * width, query_box
        assert browser.execute_script(fits)
        browser.save_screenshot(str(tmp_path / "phone.png"))
        browser.find_elements(By.CSS_SELECTOR, ".card")[0].click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#detail-frames figure")) == 2)
        assert browser.execute_script(
            "const d = document.getElementById('detail').getBoundingClientRect();"
            "return [...document.querySelectorAll('#detail-frames figure')].every("
            "f => f.getBoundingClientRect().right <= d.right + 0.5)")
        assert browser.execute_script("const d = document.getElementById('detail'); return d.scrollWidth <= d.clientWidth")
        browser.save_screenshot(str(tmp_path / "phone-detail.png"))
        for size in ((375, 812), (1280, 1000)):
            browser.set_window_size(*size)
            browser.get(server.url + "?" + urllib.parse.urlencode({"q": "verylongwordwithoutspaces" * 7}))
            wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("12 results for "))
            assert browser.execute_script(fits), size
        browser.save_screenshot(str(tmp_path / "long-word.png"))
        # the words coloured as the tokenizer read them: "DOG's" is dog ' s, in any case
        browser.get(server.url + "?" + urllib.parse.urlencode({"q": "the DOG's man"}))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#query-words mark"))
        marks = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#query-words mark")]
        assert {"DOG", "man"} <= set(marks) and "'" not in marks, marks
        assert browser.find_element(By.ID, "query-words").text == "the DOG's man"
        # the words matched to a whole frame, on a picture as narrow as a portrait photo's in its card: all shown,
        # slid in from past the card's right edge (they start at the picture's left)
        whole = browser.execute_script(
            "const picture = document.querySelector('.card .picture'); picture.style.width = '110px';"
            "const whole = document.createElement('div'); whole.className = 'whole';"
            "for (const word of ['grass', 'field', 'trees']) { const m = document.createElement('mark');"
            "  m.textContent = word;"
            "  whole.append(m); }"
            "whole.append(' → whole frame'); picture.append(whole); placeTags(picture.parentElement);"
            "const f = picture.parentElement.getBoundingClientRect(), p = picture.getBoundingClientRect(),"
            "  w = whole.getBoundingClientRect();"
            "return [whole.scrollWidth <= whole.clientWidth, w.left >= f.left, w.right <= f.right, w.height < 30,"
            "  w.bottom <= p.bottom]")
        assert whole == [True] * 5, whole  # on one line, within the card's frame, over the picture's bottom
    finally:
        browser.quit()
    keep_screenshots(tmp_path, "phone.png", "phone-detail.png", "long-word.png")


def test_sighup_stops_the_server_by_uvicorns_own_exit_and_its_handler_is_given_back():
    # uvicorn takes Ctrl-C and SIGTERM; vlpcache's handler made SIGHUP a KeyboardInterrupt anywhere in uvicorn's event
    # loop, and a server so stopped now and then hung at its end (killed after 20 s, under load)
    import uvicorn

    from vlpcache.serve.command import hangup_stops

    def stop_handler(signum, frame):  # vlpcache's own, or the default (the suite may run under nohup: SIGHUP ignored)
        raise AssertionError("SIGHUP reached the command's stop handler")

    outside = signal.signal(signal.SIGHUP, stop_handler)
    try:
        server = uvicorn.Server(uvicorn.Config(app=None))
        with hangup_stops(server):
            signal.raise_signal(signal.SIGHUP)  # handled before raise_signal returns: no exception in the loop's code
            assert server.should_exit
        assert signal.getsignal(signal.SIGHUP) is stop_handler
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # under nohup it stays ignored
        with hangup_stops(ignored := uvicorn.Server(uvicorn.Config(app=None))):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            signal.raise_signal(signal.SIGHUP)
        assert not ignored.should_exit
    finally:
        signal.signal(signal.SIGHUP, outside)
