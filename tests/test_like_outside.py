"""`vlpcache search --like FILE` of a video, photo or frames folder the cache does not hold: extracted on its own
(the real detector, real decoding of the shared videos) into a temporary cache with the collection's settings,
encoded by the index's checkpoint, ranked as `--like ID` ranks: the same hits as extracting it into the
collection and indexing it would give, and nothing added to the collection, its index or the workspace."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from test_model import build_tiny_text_model
from test_pretrain import WORDS, write_captions
from test_search import vlpcache
from test_serve import index_workspace
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import SHARD_DIR
from vlpcache.extract.runner import run_extract
from vlpcache.index.faiss_index import VideoIndex
from vlpcache.model.train import run_pretrain
from vlpcache.workspace import Workspace
from waiting import HANG_GUARD_S, wait_until

VIDEOS = SHARED / "data" / "videos"
COLLECTION = ("bikes.mp4", "cup.mp4", "tests_data_test.avi", "carphone_pristine.mp4", "demo_demo.mp4")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace as a user has it: five real videos extracted (yolox, 2 frames), a tiny run, its index."""
    if not VIDEOS.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set VLPCACHE_SHARED to the shared/ folder)")
    root = tmp_path_factory.mktemp("like-outside")
    (root / "collection").mkdir()
    for name in COLLECTION:
        shutil.copy(VIDEOS / name, root / "collection" / name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("VLPCACHE_WORKSPACE", str(root / "ws"))
        monkeypatch.chdir(root)
        run_extract([root / "collection"], frames=2, workers=1, quiet=True)
        ids = RegionCache(root / "ws" / "cache").ids
        captions = {item_id: [f"a {word} here", f"the {word}"] for item_id, word in zip(ids, WORDS)}
        write_captions(root / "train.jsonl", [], extra=captions)
        run_pretrain(cache_dirs=[root / "ws" / "cache"], captions=[root / "train.jsonl"],
                     run_dir=root / "ws" / "runs" / "run-001", text_model=str(build_tiny_text_model(root / "tiny-bert")),
                     width=16, layers=1, batch_size=4, epochs=1, workers=0, quiet=True, device="cpu")
        index_workspace(monkeypatch, root / "ws")
    return root


@pytest.fixture
def user(template, tmp_path, monkeypatch):
    """A copy of the template's workspace, its own temporary folder (what --like leaves there is seen)."""
    root = tmp_path / "user"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(root / "ws"))
    monkeypatch.chdir(root)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return root


def like_json(monkeypatch, capsys, *args) -> tuple[list[dict], str]:
    code, out, err = vlpcache(monkeypatch, capsys, "search", *args, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()], err


def shown(result: dict) -> list[tuple[str, int]]:
    return [(hit["id"], hit["frame"]) for hit in result["results"]]


def test_a_clip_outside_the_cache_ranks_as_it_would_once_extracted_and_indexed_and_nothing_is_added(user, monkeypatch,
                                                                                                     capsys):
    clips = user / "clips"
    clips.mkdir()
    shutil.copy(VIDEOS / "bikes.mp4", clips / "bikes_again.mp4")  # a cached video's copy under another name
    shutil.copy(VIDEOS / "tree.avi", clips / "tree.avi")  # a video the collection does not hold
    cache_dir = user / "ws" / "cache"
    before = (sorted(RegionCache(cache_dir).ids), sorted(p.name for p in (cache_dir / SHARD_DIR).iterdir()),
              Workspace().extracted_roots())
    index_dir = next(p.parent for p in (user / "ws" / "index").rglob("index.json"))
    index_files = {p.name: p.read_bytes() for p in index_dir.iterdir() if p.is_file()}

    results, err = like_json(monkeypatch, capsys, "--like", str(clips / "bikes_again.mp4"), "--like", "clips/tree.avi",
                             "-k", "4")
    copy, tree = results
    assert copy["like"] == str(clips / "bikes_again.mp4") and copy["outside"] is True and tree["like"] == "clips/tree.avi"
    assert copy["results"][0]["id"] == "bikes" and copy["results"][0]["score"] > 0.999  # the same frames: itself
    assert copy["results"][0]["frame"] == 0, copy["results"][0]  # every frame its own: the first, not float noise's
    assert [len(r["results"]) for r in results] == [4, 4] and "bikes_again" not in str([r["results"] for r in results])
    assert err.count("is not in the cache: extracting it on its own to compare it (with the cache's settings; nothing "
                     "is added to the cache)") == 2
    # nothing was added: the cache, its shards, the index, the workspace's record of extracted folders, no leftovers
    assert (sorted(RegionCache(cache_dir).ids), sorted(p.name for p in (cache_dir / SHARD_DIR).iterdir()),
            Workspace().extracted_roots()) == before
    assert {p.name: p.read_bytes() for p in index_dir.iterdir() if p.is_file()} == index_files
    assert list(Path(tempfile.tempdir).iterdir()) == []

    # the same clip extracted into the collection and indexed: --like of its id gives the same hits, scores, frames
    run_extract([clips / "tree.avi"], frames=2, workers=1, quiet=True)  # (the command ends its process: os._exit)
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    [indexed], _ = like_json(monkeypatch, capsys, "--like", "tree", "-k", "4")
    assert "outside" not in indexed and shown(indexed) == shown(tree)
    np.testing.assert_allclose([h["score"] for h in indexed["results"]], [h["score"] for h in tree["results"]], atol=2e-3)
    assert len(VideoIndex.load(index_dir)) == len(COLLECTION) + 1


def test_a_frames_folder_and_a_photo_outside_the_cache_and_the_lines_of_what_is_no_item(user, monkeypatch, capsys):
    frames = sorted((SHARED / "data" / "msrvtt" / "frames" / "val").iterdir())[0]  # a folder of one video's frames
    photo = sorted((SHARED / "data" / "flickr8k" / "images").iterdir())[0]
    results, _ = like_json(monkeypatch, capsys, "--like", str(frames), "--like", str(photo), "-k", "2")
    assert [(r["like"], r["outside"], len(r["results"])) for r in results] == [(str(frames), True, 2), (str(photo), True, 2)]
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", str(photo), "-k", "2")
    assert code == 0 and out.splitlines()[0] == f"like: {photo}" and len(out.splitlines()) == 3
    # an index without its ONNX export: search runs the checkpoint through torch, and --like FILE encodes with it
    # (not loaded a second time), the same hits
    index_dir = next(p.parent for p in (user / "ws" / "index").rglob("index.json"))
    shutil.rmtree(index_dir / "query")
    from vlpcache.index import outside

    monkeypatch.setattr(outside, "index_checkpoint", lambda *args: pytest.fail("the checkpoint was loaded again"))
    again, _ = like_json(monkeypatch, capsys, "--like", str(photo), "-k", "2")
    assert shown(again[0]) == shown(results[1])
    np.testing.assert_allclose([h["score"] for h in again[0]["results"]], [h["score"] for h in results[1]["results"]],
                               atol=1e-5)

    # a file named as a cached item but another file: the file itself is compared, and said so; the cached
    # item's own file names the item
    (user / "mine").mkdir()
    shutil.copy(VIDEOS / "tree.avi", user / "mine" / "bikes.avi")
    [named], err = like_json(monkeypatch, capsys, "--like", "mine/bikes.avi", "-k", "2")
    assert named["outside"] is True and named["results"][0]["score"] < 0.99
    assert ("mine/bikes.avi is not 'bikes' of the cache, whose id it ends in (another file): extracting it on its own"
            in err)
    cache = RegionCache(user / "ws" / "cache")
    source = cache.paths[cache.index_of("bikes")]  # (the template's: this copy of the workspace reads its files)
    [cached], _ = like_json(monkeypatch, capsys, "--like", source, "-k", "2")
    assert cached["like"] == "bikes" and "outside" not in cached
    (user / "link.mp4").symlink_to(source)  # another path to the cached file: the item, not an extract of its own
    assert like_json(monkeypatch, capsys, "--like", "link.mp4", "-k", "2")[0] == [cached]
    (user / "hard").mkdir()  # a hard link named as the item: the same file by another path, found by samefile
    os.link(source, user / "hard" / "bikes.mp4")
    assert like_json(monkeypatch, capsys, "--like", "hard/bikes.mp4", "-k", "2")[0] == [cached]

    # the Python API: the same hits as the command line, for a file the cache does not hold and for a cached one
    from vlpcache import Searcher, like_file

    searcher, lines = Searcher(), []
    api = like_file(searcher, photo, k=2, say=lines.append)
    assert [(h.id, h.frame) for h in api] == shown(results[1]) and len(lines) == 1 and "extracting it" in lines[0]
    assert [h.id for h in like_file(searcher, source, k=2, say=lines.append)] == [h["id"] for h in cached["results"]]
    assert len(lines) == 1  # the cached file's hits: nothing extracted, nothing said

    (user / "two").mkdir()
    for name in ("cup.mp4", "tree.avi"):
        shutil.copy(VIDEOS / name, user / "two" / name)
    (user / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (user / "notes.txt").write_text("not media")
    for given, said in ((user / "two", f"error: {user / 'two'} is a folder of 2 items (videos, photos or frames "
                                       "folders): give one video, photo, or frames folder (a folder of one video's frames)"),
                        (user / "notes.txt", f"error: {user / 'notes.txt'}: not a video or image file (unknown extension, "
                                             "and its first bytes are of no known format)"),
                        (user / "broken.mp4", f"error: {user / 'broken.mp4'}: ")):
        code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", str(given))
        assert code == 2 and out == "" and err.strip().splitlines()[-1].startswith(said) and "Traceback" not in err, err
    assert list(Path(tempfile.tempdir).iterdir()) == []  # the failed extract's cache removed too


def test_like_file_from_a_script_without_a_main_guard_decodes_the_clip_in_its_own_process(user):
    # the clip was decoded by a spawned worker, which imports the calling script: its top-level code ran again in
    # each, and after ~30 s like_file failed, "decoding workers die before they are ready ... --workers 0"
    script = user / "script.py"  # as the README's example, no `if __name__ == "__main__":`
    script.write_text("import vlpcache\nfrom vlpcache import Searcher\ns = Searcher(say=lambda line: None)\n"
                      "print('top-level ran')\n"
                      f"print(*[h.id for h in vlpcache.like_file(s, {str(VIDEOS / 'tree.avi')!r}, k=3)])\n")
    done = subprocess.run([sys.executable, str(script)], cwd=user, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    ran, hits = done.stdout.splitlines()
    assert ran == "top-level ran" and len(hits.split()) == 3
    assert set(hits.split()) <= {Path(name).stem for name in COLLECTION}
    assert "tree.avi is not in the cache: extracting it on its own" in done.stderr


def test_a_cached_file_replaced_since_it_was_extracted_is_compared_as_it_is_now_with_a_note(user, monkeypatch, capsys):
    # --like of a cached file replaced by another video (not extracted again yet) answered for its old content, the
    # index's row, without a word, while the same new file at any other path was compared as it is
    mine = user / "mine"
    mine.mkdir()
    shutil.copy(VIDEOS / "tree.avi", mine / "clip.avi")
    run_extract([mine], frames=2, workers=1, quiet=True)
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    shutil.copy(VIDEOS / "vtest.avi", mine / "clip.avi")  # the user replaced the clip
    shutil.copy(VIDEOS / "vtest.avi", user / "vtest.avi")  # the same new content elsewhere
    [replaced], err = like_json(monkeypatch, capsys, "--like", str(mine / "clip.avi"), "-k", "3")
    [elsewhere], _ = like_json(monkeypatch, capsys, "--like", str(user / "vtest.avi"), "-k", "3")
    said = f'{mine / "clip.avi"} changed since it was extracted as "clip" (the cache and the index hold its old content)'
    assert replaced["outside"] is True and replaced["note"].startswith(said) and err.count(f"note: {said}") == 1
    assert shown(replaced) == shown(elsewhere)
    np.testing.assert_allclose([h["score"] for h in replaced["results"]], [h["score"] for h in elsewhere["results"]],
                               atol=1e-5)
    from vlpcache import Searcher, like_file

    lines = []
    hits = like_file(Searcher(), mine / "clip.avi", k=3, say=lines.append)
    assert [(h.id, h.frame) for h in hits] == shown(elsewhere) and len(lines) == 1 and lines[0].startswith(f"note: {said}")


def test_the_index_checkpoint_is_found_in_the_run_searched_where_the_project_moved(user, monkeypatch, capsys):
    index_json = next((user / "ws" / "index").rglob("index.json"))
    meta = json.loads(index_json.read_text())
    meta["run_dir"] = "/moved/away/ws/runs/run-001"  # where the project was when it was indexed
    meta["checkpoint_path"] = "/moved/away/ws/runs/run-001/checkpoints/epoch-0001/model.safetensors"
    index_json.write_text(json.dumps(meta))
    photo = sorted((SHARED / "data" / "flickr8k" / "images").iterdir())[1]
    [found], _ = like_json(monkeypatch, capsys, "--like", str(photo), "-k", "2")
    assert found["outside"] is True and len(found["results"]) == 2
    # the run searched with no longer holds those weights: one line naming them and the way out
    for weights in (user / "ws" / "runs" / "run-001" / "checkpoints").glob("*/model.safetensors"):
        weights.unlink()
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", str(photo))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: the checkpoint the index was built with (sha256 {meta['checkpoint_sha256'][:12]}, saved as "
        f"{meta['checkpoint_path']}) is not in run {user / 'ws' / 'runs' / 'run-001'} any more: pass the run it was "
        "trained in with --run, or `vlpcache index` the collection with the run's checkpoint now")


def test_the_page_api_compares_an_uploaded_clip_as_search_like_file_does(user, monkeypatch, capsys):
    from test_serve import client_for
    from vlpcache.serve import app as serve_app

    clip = VIDEOS / "tree.avi"
    [expected], _ = like_json(monkeypatch, capsys, "--like", str(clip), "-k", "3")
    client, _ = client_for(user / "ws")
    assert client.get("/api/info").json()["uploads"] is True
    answer = client.post("/api/like?k=3", content=clip.read_bytes(), headers={"x-vlpcache-filename": "my%20tree.avi"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["like"] == "my tree.avi" and body["outside"] is True
    assert shown(body) == shown(expected)
    np.testing.assert_allclose([h["score"] for h in body["results"]], [h["score"] for h in expected["results"]], atol=1e-5)
    assert list(Path(tempfile.tempdir).iterdir()) == []  # the upload and its cache are gone
    # what is no clip, nothing sent, too large, a name that is a path: one line each, nothing left behind
    for content, name, status, said in (
            (b"\x00\x00\x00\x18ftypmp42 not really a video", "x.mp4", 400, "x.mp4: "),
            (b"plain text", "../../notes.txt", 400, "notes.txt: not a video or image file"),
            (b"", "empty.mp4", 400, "no file: send the clip or photo as the request's body")):
        answer = client.post("/api/like", content=content, headers={"x-vlpcache-filename": name})
        assert answer.status_code == status and answer.json()["error"].startswith(said), answer.text
        assert "vlpcache-upload-" not in answer.text
    # another site's page, through the user's browser: a form posted here (no header of the page's), or a fetch
    # from its origin; the page's own origin is taken
    form = client.post("/api/like", files={"clip": ("tree.avi", clip.read_bytes(), "video/x-msvideo")})
    assert form.status_code == 400 and "x-vlpcache-filename" in form.json()["error"]
    other = client.post("/api/like", content=clip.read_bytes(),
                        headers={"x-vlpcache-filename": "t.avi", "origin": "http://example.com"})
    assert other.status_code == 403 and other.json()["error"] == (
        "uploads come from this server's own page, not from http://example.com (where that is the address of a "
        "proxy of yours, have it pass on the browser's Host: in X-Forwarded-Host, or as Host with --allow-host)")
    own = client.post("/api/like?k=1", content=clip.read_bytes(),
                      headers={"x-vlpcache-filename": "t.avi", "origin": str(client.base_url).rstrip("/")})
    assert own.status_code == 200, own.text
    limit = serve_app.MAX_UPLOAD_BYTES
    monkeypatch.setattr(serve_app, "MAX_UPLOAD_BYTES", 1000)
    answer = client.post("/api/like", content=clip.read_bytes(), headers={"x-vlpcache-filename": "big.avi"})
    assert answer.status_code == 413 and "at most 0 MB" in answer.json()["error"]
    chunks = iter([clip.read_bytes()[:800], clip.read_bytes()[800:1600]])  # sent in chunks: no length said before
    answer = client.post("/api/like", content=chunks, headers={"x-vlpcache-filename": "big.avi"})
    assert answer.status_code == 413 and "over 0 MB" in answer.json()["error"]
    monkeypatch.setattr(serve_app, "MAX_UPLOAD_BYTES", limit)
    assert list(Path(tempfile.tempdir).iterdir()) == []
    # a server that listens beyond this machine takes none
    from vlpcache.index.search import Searcher
    from vlpcache.serve.app import make_app
    from vlpcache.serve.thumbnails import ThumbnailStore
    import starlette.testclient as starlette_testclient

    searcher = Searcher()
    shared = starlette_testclient.TestClient(make_app(searcher, ThumbnailStore(user / "thumbs"), None))
    assert shared.get("/api/info").json()["uploads"] is False
    refused = shared.post("/api/like", content=clip.read_bytes(), headers={"x-vlpcache-filename": "t.avi"})
    assert refused.status_code == 403 and refused.json()["error"] == (
        "this server takes no uploads: it listens beyond this machine (--host); `vlpcache serve --uploads` takes them "
        "from anyone who can reach it; or run `vlpcache search --like FILE` where the collection is")
    # --uploads: a lab's server takes them from its own page, whatever name it is reached by; --no-uploads: none
    lab = starlette_testclient.TestClient(make_app(searcher, ThumbnailStore(user / "thumbs"), None, uploads=True),
                                          base_url="http://workstation.lan:8000")
    assert lab.get("/api/info").json()["uploads"] is True
    answer = lab.post("/api/like?k=1", content=clip.read_bytes(),
                      headers={"x-vlpcache-filename": "t.avi", "origin": "http://workstation.lan:8000"})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 1
    other = lab.post("/api/like", content=clip.read_bytes(),
                     headers={"x-vlpcache-filename": "t.avi", "origin": "http://example.com"})
    assert other.status_code == 403
    closed = starlette_testclient.TestClient(make_app(searcher, ThumbnailStore(user / "thumbs"), uploads=False),
                                             base_url="http://127.0.0.1:8000")
    assert closed.get("/api/info").json()["uploads"] is False
    refused = closed.post("/api/like", content=clip.read_bytes(), headers={"x-vlpcache-filename": "t.avi"})
    assert refused.status_code == 403 and refused.json()["error"].startswith(
        "this server takes no uploads: it was started with --no-uploads;")


def test_a_full_temporary_folder_is_one_line_for_the_command_and_for_the_page_and_leaves_nothing(user, disk,
                                                                                                 monkeypatch, capsys):
    from test_serve import client_for

    monkeypatch.setattr(tempfile, "tempdir", str(disk.folder))
    small = VIDEOS / "carphone_distorted.mp4"  # 7 KB: its upload fits where its own cache does not
    reason = "No space left on device (ENOSPC)" if disk.tmpfs else "File too large (EFBIG)"
    no_cache = (f"on its own to compare it: a write to the temporary folder {disk.folder} failed ({reason}); make "
                "room there, or set TMPDIR to another folder (nothing was added to the cache)")
    with disk.full(room=20_000):  # (a process of its own: after a failed write the command ends without teardown)
        failed = subprocess.run([sys.executable, "-m", "vlpcache", "search", "--like", str(small)], capture_output=True,
                                text=True, env={**os.environ, "TMPDIR": str(disk.folder)}, timeout=HANG_GUARD_S)
    assert failed.returncode == 2 and failed.stdout == "" and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == f"error: cannot extract {small} {no_cache}"
    client, _ = client_for(user / "ws")
    with disk.full(room=20_000):
        answer = client.post("/api/like", content=small.read_bytes(), headers={"x-vlpcache-filename": "c.mp4"})
    assert answer.status_code == (507 if disk.tmpfs else 500)
    assert answer.json()["error"] == f"cannot extract c.mp4 {no_cache}"
    with disk.full(room=100_000):  # the upload itself (1.2 MB) does not fit
        answer = client.post("/api/like", content=(VIDEOS / "tree.avi").read_bytes(),
                             headers={"x-vlpcache-filename": "tree.avi"})
    assert answer.status_code == (507 if disk.tmpfs else 500)
    kept = ("the server could not keep the file while comparing it: a write to its temporary folder "
            f"{disk.folder} failed ({reason}) after ")
    assert answer.json()["error"].startswith(kept) and answer.json()["error"].endswith(
        " MB of it; make room there, or serve with TMPDIR set to another folder")
    said = capsys.readouterr().err  # the server's log says it too: its user mends it
    assert f"error: an upload: cannot extract c.mp4 {no_cache}" in said and f"error: an upload: {kept}" in said
    assert not [p for p in disk.folder.iterdir() if p.name.startswith("vlpcache-")]
    assert len(RegionCache(user / "ws" / "cache")) == len(COLLECTION)  # nothing added to the collection


def test_what_a_killed_search_like_file_left_in_the_temporary_folder_the_next_one_removes(user, tmp_path):
    temporary = tmp_path / "tmpdir"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    command = [sys.executable, "-m", "vlpcache", "search", "--like", str(VIDEOS / "tree.avi"), "-k", "1"]
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = lambda: [p for p in temporary.iterdir() if p.name.startswith("vlpcache-like-")]  # noqa: E731
    def begun() -> bool:  # its clip's cache
        try:
            return any(any(folder.iterdir()) for folder in left())
        except FileNotFoundError:  # gone between the listing and the look
            return False

    wait_until(begun, alive=killed)
    killed.kill()  # kill -9: no cleanup
    killed.wait()
    assert left() and left()[0].name.startswith(f"vlpcache-like-{killed.pid}@{socket.gethostname()}-")
    live = temporary / f"vlpcache-like-1@{socket.gethostname()}-abcd"  # a live process's (pid 1): left alone
    elsewhere = temporary / f"vlpcache-like-{killed.pid}@another-machine-abcd"  # of a machine sharing TMPDIR
    live.mkdir()
    elsewhere.mkdir()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert sorted(left()) == sorted([live, elsewhere])


def test_an_upload_whose_request_is_cancelled_while_it_waits_its_turn_leaves_the_comparison_lock_free(monkeypatch):
    """The worker thread takes the lock and lets it go; a handler cancelled meanwhile (its connection gone, a
    server stopping) keeps nothing, and the next upload is compared."""
    import asyncio

    from starlette.concurrency import run_in_threadpool
    from vlpcache.serve import app as serve_app

    slots = serve_app.UploadSlots()
    slots.comparing.acquire()  # an upload received before it, being compared
    compared = []

    async def cancelled_while_waiting():
        waiting = asyncio.create_task(run_in_threadpool(slots.in_turn, compared.append, "mine"))
        await asyncio.sleep(0.2)  # (order only: had the thread not begun to wait, the outcome is the same)
        waiting.cancel()
        threading.Timer(0.2, slots.comparing.release).start()  # the one before it ends
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(cancelled_while_waiting())
    wait_until(lambda: compared == ["mine"], guard_s=30)  # its turn came (the handler may have gone before: anyio lets it)
    wait_until(lambda: slots.comparing.acquire(blocking=False), guard_s=30)  # and nothing keeps the lock
    slots.comparing.release()
    monkeypatch.setattr(serve_app, "COMPARE_WAIT_S", 0.1)
    with slots.comparing:  # one that waits in vain: a 503 saying so, the lock as it was
        with pytest.raises(serve_app.ApiError) as refused:
            slots.in_turn(compared.append, "late")
    assert refused.value.status_code == 503 and refused.value.headers == {"retry-after": "5"}
    assert compared == ["mine"] and slots.comparing.acquire(blocking=False)


def test_a_slow_upload_keeps_no_other_waiting_and_one_whose_sender_goes_away_is_a_line_in_the_log(user, tmp_path, monkeypatch):
    import http.client

    from test_serve import Server

    temporary = tmp_path / "server-tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    ended = subprocess.Popen(["true"])
    ended.wait()
    killed = temporary / f"vlpcache-upload-{ended.pid}@{socket.gethostname()}-abcd"  # a server killed while it received a file
    killed.mkdir()
    (killed / "upload.mp4").write_bytes(bytes(1000))
    server = Server(user / "ws")
    uploads = lambda: [p for p in temporary.iterdir() if p.name.startswith("vlpcache-upload-") and p != killed]  # noqa: E731
    try:
        def slow_sender(name: str) -> socket.socket:  # a page sending a large file over a slow network
            sender = socket.create_connection((server.host, int(server.port)), timeout=HANG_GUARD_S)
            sender.sendall(f"POST /api/like HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Length: 1000000\r\n"
                           f"x-vlpcache-filename: {name}\r\n\r\n".encode() + bytes(200_000))
            return sender

        def post(name: str, body: bytes):
            connection = http.client.HTTPConnection(server.host, int(server.port), timeout=HANG_GUARD_S)
            connection.request("POST", "/api/like?k=2", body=body, headers={"x-vlpcache-filename": name})
            answer = connection.getresponse()
            status, retry, text = answer.status, answer.getheader("retry-after"), answer.read()
            connection.close()
            return status, retry, json.loads(text)

        received = lambda: sum(p.stat().st_size > 0 for folder in uploads() for p in folder.iterdir())  # noqa: E731
        senders = [slow_sender("tree.avi")]
        wait_until(lambda: received() == 1, alive=server.process)  # being received
        small = (VIDEOS / "carphone_distorted.mp4").read_bytes()
        status, _, body = post("c.mp4", small)  # another user's clip meanwhile: received and compared at once
        assert status == 200 and body["like"] == "c.mp4"
        senders += [slow_sender(f"slow{n}.avi") for n in range(3)]
        wait_until(lambda: received() == 4, alive=server.process)
        status, retry, body = post("c.mp4", small)  # four held at once: each may be 2 GiB of TMPDIR
        assert (status, retry) == (503, "5")
        assert body == {"error": "4 uploads are being received or compared; try again in a moment"}
        for sender in senders:  # the pages closed
            sender.close()
        wait_until(lambda: not uploads(), alive=server.process)  # the page closed: its folder goes
        connection = http.client.HTTPConnection(server.host, int(server.port), timeout=HANG_GUARD_S)
        connection.request("POST", "/api/like?k=2", body=(VIDEOS / "carphone_distorted.mp4").read_bytes(),
                           headers={"x-vlpcache-filename": "c.mp4"})
        assert connection.getresponse().status == 200  # the next upload is compared
        assert not killed.exists()  # and what a killed server left is gone
        connection.close()
    finally:
        server.stop()
    log = server.process.stderr.read()
    assert re.search(r"^note: the upload of tree\.avi stopped after 0\.[0-2] MB: its sender went away \(a page closed\?\)$",
                     log, re.M), log  # (what was received before the sender went: uvicorn drops what it still held)
    assert "Traceback" not in log and not uploads()


def test_an_upload_refused_before_it_is_read_hears_why_not_a_reset_connection(user):
    """A refusal answered before the body arrives (another Origin, too many held, uploads off) is read first, up
    to DRAIN_BYTES: else the connection is reset while the body still comes, and a proxy says 502, the page "does
    not answer", and nobody why."""
    from test_serve import Server

    def as_a_proxy_sends(server, headers: str) -> bytes:
        """POST 8 MB (a phone's short clip) in 64 KB pieces as nginx passes a body on, every piece of it (a reset
        on the way is nginx's 502), then the answer."""
        sender = socket.create_connection((server.host, int(server.port)), timeout=120)  # (a server that stops
        try:  # reading the body and never answers is waited for no longer than nginx's proxy_send_timeout, 60 s)
            sender.sendall(f"POST /api/like HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Length: {8 << 20}\r\n"
                           f"Connection: close\r\nx-vlpcache-filename: c.mp4\r\n{headers}\r\n".encode())
            for _ in range(128):
                sender.sendall(bytes(64 << 10))
            answer = b""
            while chunk := sender.recv(65536):
                answer += chunk
            return answer
        finally:
            sender.close()

    for args, headers, said in (
            ((), "Origin: http://example.com\r\n", "uploads come from this server's own page, not from "),
            (("--no-uploads",), "", "this server takes no uploads: it was started with --no-uploads")):
        server = Server(user / "ws", *args)
        try:
            for _ in range(3):
                head, _, body = as_a_proxy_sends(server, headers).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 403 ") and json.loads(body)["error"].startswith(said), head
        finally:
            server.stop()


def test_the_page_finds_the_items_most_like_a_clip_chosen_or_dropped_and_back_returns_to_the_query(user, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import page_served

    with page_served(user / "ws", tmp_path) as (server, browser):
        browser.get(server.url + "?q=a+dog")
        wait = WebDriverWait(browser, 60)
        status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda b: "results for “a dog”" in status())
        wait.until(lambda b: b.find_element(By.ID, "upload-label").is_displayed())  # this server takes uploads
        browser.find_element(By.ID, "upload").send_keys(str(VIDEOS / "tree.avi"))
        wait.until(lambda b: "most like" in status() or "error" in status())
        assert status().startswith(f"{len(COLLECTION)} items most like “tree.avi” · ") and "nothing added" in status()
        assert browser.find_element(By.ID, "query-words").text == "like tree.avi"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .card")) == len(COLLECTION)
        assert browser.find_element(By.ID, "q").get_attribute("value") == ""
        browser.back()  # the query's own results again
        wait.until(lambda b: "results for “a dog”" in status())
        # a photo dropped on the page: the browser's file, as a drag from the desktop brings it
        browser.execute_script("const i = document.createElement('input'); i.type = 'file'; i.id = 'probe'; "
                               "i.hidden = true; document.body.append(i);")
        photo = sorted((SHARED / "data" / "flickr8k" / "images").iterdir())[0]
        browser.find_element(By.ID, "probe").send_keys(str(photo))
        browser.execute_script("const dt = new DataTransfer(); dt.items.add(document.getElementById('probe').files[0]); "
                               "document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, "
                               "cancelable: true}));")
        wait.until(lambda b: "most like" in status() or "error" in status())
        assert status().startswith(f"{len(COLLECTION)} items most like “{photo.name}” · ")
        browser.back()
        wait.until(lambda b: "results for “a dog”" in status())
        # over a slow network (a lab's server, --uploads): how much is sent, then that it is being compared
        browser.execute_script("window.said = []; new MutationObserver(() => said.push("
                               "document.getElementById('status').textContent)).observe("
                               "document.getElementById('status'), {childList: true, characterData: true, subtree: true});")
        browser.set_network_conditions(offline=False, latency=5, download_throughput=1 << 20, upload_throughput=300_000)
        browser.find_element(By.ID, "upload").send_keys(str(VIDEOS / "tree.avi"))
        wait.until(lambda b: "most like" in status() or "error" in status())
        browser.delete_network_conditions()
        said = [line for line in browser.execute_script("return said") if not line.startswith(f"{len(COLLECTION)} items")]
        sending = [int(re.fullmatch(r"Sending “tree\.avi” · (\d+)% of 1\.2 MB…", line)[1]) for line in said[:-1]]
        assert len(sending) >= 3 and sending == sorted(sending) and sending[0] == 0 and 0 < sending[-2] < 100, said
        assert said[-1] == "Comparing “tree.avi” with the collection (its frames sampled, its regions detected)…"
        browser.back()
        wait.until(lambda b: "results for “a dog”" in status())
        # a file larger than the server takes: said at once, nothing sent
        browser.execute_script("maxUpload = 1000;")  # (as /api/info's max_upload_bytes would say it)
        browser.find_element(By.ID, "upload").send_keys(str(VIDEOS / "tree.avi"))
        wait.until(lambda b: status().startswith("error: "))
        assert status() == "error: “tree.avi” is 1.2 MB; this server takes files of at most 1 KB"
        browser.execute_script(f"maxUpload = {2 << 30};")
        # a file that is no clip: its line in the status, as an error
        (tmp_path / "notes.txt").write_text("not a video")
        browser.find_element(By.ID, "upload").send_keys(str(tmp_path / "notes.txt"))
        wait.until(lambda b: status().startswith("error: "))
        assert "notes.txt: not a video or image file" in status()


def test_the_number_of_results_chosen_after_a_clip_is_shown_applies_to_the_items_most_like_that_clip(user, tmp_path):
    # the select changed nothing: it acted on the box's query or the address's ?like= alone (the server keeps no
    # upload: the page sends its file again)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from test_serve import keep_screenshots, page_served

    with page_served(user / "ws", tmp_path) as (server, browser):
        browser.get(server.url + "?q=a+dog&k=2")
        wait = WebDriverWait(browser, 60)
        status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda b: "results for “a dog”" in status() and b.find_element(By.ID, "upload-label").is_displayed())
        browser.find_element(By.ID, "upload").send_keys(str(VIDEOS / "tree.avi"))
        wait.until(lambda b: status().startswith("2 items most like “tree.avi” · "))
        Select(browser.find_element(By.ID, "k")).select_by_value("12")
        wait.until(lambda b: status().startswith(f"{len(COLLECTION)} items most like “tree.avi” · ") or "error" in status())
        assert "nothing added" in status() and browser.current_url == server.url + "?k=12"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .card")) == len(COLLECTION)
        browser.save_screenshot(str(tmp_path / "clip-more-results.png"))
        browser.back()  # one step back, as before: the query's own results
        wait.until(lambda b: "results for “a dog”" in status())
        assert browser.current_url == server.url + "?q=a+dog&k=2"
    keep_screenshots(tmp_path, "clip-more-results.png")


def test_the_page_through_a_jupyterhub_style_https_proxy_under_a_prefix_searches_shows_and_takes_uploads(user, tmp_path,
                                                                                                    monkeypatch):
    """As a lab's JupyterHub shows it: https://HUB/user/NAME/proxy/PORT/, the browser's Host and Origin passed on,
    the request handed to the server as http:// with the prefix stripped (tests/proxy.py)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from proxy import PrefixProxy, certificate
    from test_serve import Server, chromium_driver, keep_screenshots

    cert, key = certificate(tmp_path, "hub.test")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ann/")  # as in a terminal of the user's JupyterLab
    server = Server(user / "ws")  # not told of the proxy: the page is its one line, the log says what to do
    proxy = PrefixProxy(int(server.port), cert, key)
    browser = chromium_driver(tmp_path, "--host-resolver-rules=MAP hub.test 127.0.0.1", "--ignore-certificate-errors")
    try:
        page = f"https://hub.test:{proxy.port}{proxy.prefix}"
        browser.get(page)
        assert "start it with --allow-host hub.test" in browser.find_element(By.TAG_NAME, "body").text
        server.stop()
        log = server.process.stderr.read()
        assert (f"note: in JupyterHub, open https://HUB/user/ann/proxy/{server.port}/ (HUB: your hub's address) with "
                "--allow-host HUB given here (the page names it if not)") in log
        assert ("note: refused a request for Host hub.test (this server answers 127.0.0.1, [::1], localhost); where "
                "hub.test is a proxy of yours, restart with --allow-host hub.test") in log
        server = Server(user / "ws", "--allow-host", "hub.test", "--uploads")
        proxy.upstream, proxy.prefix = int(server.port), f"/user/ann/proxy/{server.port}"
        page = f"https://hub.test:{proxy.port}{proxy.prefix}"
        browser.get(page + "?q=a+dog")  # the prefix without its slash: the proxy adds it, as JupyterHub's does
        wait = WebDriverWait(browser, 60)
        status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda b: "results for “a dog”" in status() or "error" in status())
        assert browser.current_url == page + "/?q=a+dog" and len(browser.find_elements(By.CSS_SELECTOR, ".card")) == 5
        loaded = "return [...document.querySelectorAll('%s img')].every(i => i.complete && i.naturalWidth > 0)"
        wait.until(lambda b: b.execute_script(loaded % ".card"))
        browser.find_elements(By.CSS_SELECTOR, ".card")[0].click()  # an item's frames
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#detail-frames figure"))
        wait.until(lambda b: b.execute_script(loaded % "#detail-frames"))
        opened = browser.find_element(By.ID, "detail-title").text
        browser.find_element(By.ID, "detail-like").click()  # the items most like it, still under the prefix
        wait.until(lambda b: status().startswith(f"4 items most like “{opened}” · "))
        assert browser.current_url.startswith(page + "/?like=")
        browser.find_element(By.ID, "upload").send_keys(str(VIDEOS / "tree.avi"))  # https:// page, http:// server
        wait.until(lambda b: "most like “tree.avi”" in status() or "error" in status())
        assert status().startswith(f"{len(COLLECTION)} items most like “tree.avi” · "), status()
        browser.save_screenshot(str(tmp_path / "proxied.png"))
        browser.back()
        wait.until(lambda b: status().startswith(f"4 items most like “{opened}” · "))
        browser.find_element(By.CSS_SELECTOR, "a.brand").click()  # the page's own name: its empty query, there
        wait.until(lambda b: b.current_url == page + "/")
    finally:
        browser.quit()
        server.stop()
        proxy.close()
    assert proxy.missed == []  # every address the page asked was under the prefix
    [upload] = [f for f in proxy.forwarded if f[0] == "POST"]
    assert upload == ("POST", "/api/like?k=12", f"hub.test:{proxy.port}", f"https://hub.test:{proxy.port}")
    assert {path.split("?")[0] for _, path, _, _ in proxy.forwarded} >= {
        "/", "/page.js", "/page.css", "/api/info", "/api/search", "/api/item", "/media/frame", "/api/like"}
    assert ("note: answering requests for hub.test too (--allow-host): whoever that proxy lets in can search the "
            "collection and see its frames and send it clips and photos to compare (--uploads); open "
            f"https://hub.test/user/ann/proxy/{server.port}/") in server.process.stderr.read()
    keep_screenshots(tmp_path, "proxied.png")


def test_a_clip_outside_a_cache_extracted_with_weights_file_is_extracted_with_that_file(tmp_path, monkeypatch):
    # a cache extracted with `--detector frcnn --weights FILE`: --like FILE (and every upload to the page) asked for
    # torchvision's own weights instead, and so refused each clip ("cannot download ... weights")
    import torch
    from torchvision.models import get_model_builder

    from broken_media import make_video_after_audio
    from vlpcache.errors import NotComparable
    from vlpcache.extract.outside import extract_outside

    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    model = get_model_builder(arch)(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    (tmp_path / "collection").mkdir()
    make_video_after_audio(tmp_path / "collection" / "a.mp4", lead_ms=0, frames=20)
    clip = make_video_after_audio(tmp_path / "clip.mp4", lead_ms=0, frames=30)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("VLPCACHE_OFFLINE", "1")  # torchvision's weights neither downloaded nor needed
    run_extract([tmp_path / "collection"], detector="frcnn", backbone=arch, weights=str(tmp_path / "ours.pth"),
                frames=2, workers=1, quiet=True)
    settings = RegionCache(tmp_path / "ws" / "cache").settings
    item_id = extract_outside(str(clip), settings, tmp_path / "outside")
    with RegionCache(tmp_path / "outside") as outside:
        assert outside.ids == [item_id] and not outside.settings.differences(settings)

    (tmp_path / "ours.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(NotComparable) as gone:
        extract_outside(str(clip), settings, tmp_path / "again")
    assert str(gone.value) == (f"the cache's frcnn weights, {tmp_path / 'ours.pth'} (given to extract as --weights), "
                               "are gone: put the file back there")


def test_a_frcnn_cache_from_before_weights_json_names_the_extract_that_records_its_weights_file(tmp_path, monkeypatch):
    # a workspace of a release before weights.json (9085d6e): its frcnn cache, extracted with --weights FILE, has no
    # record of the file; --like FILE and uploads asked for torchvision's weights ("cannot download ...", online a
    # 20-160 MB download, then refused as other weights), and named no way out
    import dataclasses

    import torch
    from torchvision.models import get_model_builder

    from broken_media import make_video_after_audio
    from vlpcache.errors import NotComparable
    from vlpcache.extract.outside import extract_outside
    from vlpcache.workspace import WEIGHTS_NAME

    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    torch.save(get_model_builder(arch)(weights=None, weights_backbone=None, num_classes=91).state_dict(), tmp_path / "ours.pth")
    (tmp_path / "collection").mkdir()
    make_video_after_audio(tmp_path / "collection" / "a.mp4", lead_ms=0, frames=20)
    clip = make_video_after_audio(tmp_path / "clip.mp4", lead_ms=0, frames=30)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("VLPCACHE_OFFLINE", "1")
    given = dict(detector="frcnn", backbone=arch, weights=str(tmp_path / "ours.pth"), frames=2, workers=1, quiet=True)
    run_extract([tmp_path / "collection"], **given)
    (tmp_path / "ws" / WEIGHTS_NAME).unlink()  # as the older release left the workspace
    settings = RegionCache(tmp_path / "ws" / "cache").settings
    with pytest.raises(NotComparable) as unknown:
        extract_outside(str(clip), settings, tmp_path / "outside")
    assert str(unknown.value) == (
        f"the cache's frcnn weights (sha256 {settings.detector_weights_sha256[:12]}…) are a file given to extract as "
        "--weights that this workspace has no record of (extracted before vlpcache recorded it in weights.json, or in "
        "another workspace): run that extract again with the same --weights FILE, which extracts nothing again and "
        "records the file")
    # torchvision's own weights (the sha256 its file's name begins) are still looked for as before: here offline
    own = dataclasses.replace(settings, detector_weights_sha256="907ea3f9" + "0" * 56)
    with pytest.raises(NotComparable, match="cannot download fasterrcnn_mobilenet_v3_large_320_fpn weights"):
        extract_outside(str(clip), own, tmp_path / "torchvisions")

    assert run_extract([tmp_path / "collection"], **given).done == 0  # the way out it names: nothing extracted again
    item_id = extract_outside(str(clip), settings, tmp_path / "again")
    with RegionCache(tmp_path / "again") as outside:
        assert outside.ids == [item_id] and not outside.settings.differences(settings)


def test_a_vg_cache_without_a_record_of_its_weights_file_names_the_extract_that_records_it(tmp_path, monkeypatch):
    # a vg cache extracted with --weights FILE by a release before weights.json: --like FILE looked for the models
    # folder's checkpoint and said "or pass --weights FILE", which search and the page do not take
    from vlpcache.cache.schema import CacheSettings
    from vlpcache.errors import NotComparable
    from vlpcache.extract.detectors.spec import VG_DETECTOR
    from vlpcache.extract.outside import extract_outside

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("VLPCACHE_MODELS", str(tmp_path / "models"))  # empty: the published checkpoint is not there
    monkeypatch.setenv("VLPCACHE_OFFLINE", "1")
    settings = CacheSettings(frames=2, regions=11, feature_dim=2048, detector=VG_DETECTOR, detector_weights_sha256="ab" * 32,
                             backbone="vg", backbone_weights_sha256="ab" * 32, attributes=True)
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(photo)
    with pytest.raises(NotComparable) as unknown:
        extract_outside(str(photo), settings, tmp_path / "outside")
    assert str(unknown.value).endswith(
        "; where the cache was extracted with --weights FILE (before vlpcache recorded it in weights.json, or in "
        "another workspace), run that extract again with the same --weights FILE, which extracts nothing again and "
        "records the file")
