"""Every command fed bad input as a user would: damaged files, bytes that are not UTF-8, output paths that
cannot be written. Each case must end in one `error:` line naming the file, exit code 2, no traceback,
and every file that was there before still there, unchanged, with no temporary left behind.

The commands run in-process (the CLI entry point) on a private copy of a tiny real workspace (HDF5
cache, a run trained for one epoch, its index)."""

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from as_a_shell import as_a_shell_starts_it
from test_search import build_tiny_workspace, the_index, vlpcache
from waiting import HANG_GUARD_S

NOT_UTF8 = b'{"video": "v0", "captions": ["a dog"]}\n{"video": "v1", "captions": ["caf\xe9"]}\n'


@dataclass
class Case:
    name: str
    damage: Callable[[Path, Path], None]  # (root, ws): what the user did to the workspace beforehand
    args: Callable[[Path, Path], list]  # (root, ws): the command line
    says: str  # in the error line, with {root} and {ws} filled in


def truncate(path: Path, size: int = 50) -> None:
    path.write_bytes(path.read_bytes()[:size])


def checkpoint(ws: Path) -> Path:
    return next((ws / "runs" / "run-001" / "checkpoints").glob("epoch-*"))


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def nothing(root: Path, ws: Path) -> None:
    pass


def models(root: Path) -> Path:
    """A copy of the offline detector weights, for extract."""
    from conftest import SHARED

    folder = root / "models"
    if not folder.exists():
        if not (SHARED / "models").is_dir():
            pytest.skip(f"shared data not found at {SHARED} (set VLPCACHE_SHARED to the shared/ folder)")
        shutil.copytree(SHARED / "models", folder)
    return folder


def media(root: Path, ws: Path) -> Path:
    """A root with one real image, for extract."""
    folder = root / "media"
    if not folder.exists():
        folder.mkdir()
        from PIL import Image

        Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.png")
    return folder


CASES = [
    # extract
    Case("extract into a path below a file", nothing,
         lambda r, w: ["extract", media(r, w), "-o", w / "runs" / "run-001" / "config.json" / "cache",
                       "--models", models(r)],
         "{ws}/runs/run-001/config.json/cache"),
    Case("extract with a malformed --shard", nothing, lambda r, w: ["extract", media(r, w), "--shard", "3/2"],
         "--shard '3/2': need 0 <= i < n"),
    Case("extract with --decode-timeout nan", nothing, lambda r, w: ["extract", media(r, w), "--decode-timeout", "nan"],
         "Invalid value for '--decode-timeout': 'nan' is not a finite number"),
    Case("extract with a damaged detector file", lambda r, w: truncate(models(r) / "yolox_nano_coco.onnx", 1000),
         lambda r, w: ["extract", media(r, w), "-o", r / "new-cache", "--models", models(r), "--device", "cpu"],
         "{root}/models/yolox_nano_coco.onnx: not an ONNX file"),
    Case("models fetch into a folder below a file", nothing,
         lambda r, w: ["models", "fetch", "--models", w / "cache" / "manifest.json" / "models"],
         "{ws}/cache/manifest.json/models: Not a directory (ENOTDIR)"),
    # inspect
    Case("inspect a cache whose manifest is damaged", lambda r, w: truncate(w / "cache" / "manifest.json"),
         lambda r, w: ["inspect", w / "cache"], "{ws}/cache/manifest.json: unreadable manifest"),
    Case("inspect --render to a file name that is no picture", nothing,
         lambda r, w: ["inspect", w / "cache", "--render", "v0", "-o", r / "x.txt"],
         "-o {root}/x.txt: not a picture file name"),
    Case("inspect --render to a path below a file", nothing,
         lambda r, w: ["inspect", w / "cache", "--render", "v0", "-o", w / "cache" / "manifest.json" / "x.png"],
         "{ws}/cache/manifest.json/x.png: cannot write ("),
    # pretrain
    Case("pretrain on a caption file that is not UTF-8", lambda r, w: write(r / "latin1.jsonl", NOT_UTF8),
         lambda r, w: ["pretrain", "--captions", r / "latin1.jsonl", "--text-model", r / "tiny-bert", "--device", "cpu"],
         "{root}/latin1.jsonl:2: not UTF-8 text (byte 0xe9)"),
    Case("pretrain --resume with a damaged training state", lambda r, w: truncate(checkpoint(w) / "training_state.pt"),
         lambda r, w: ["pretrain", "--resume", "--epochs", "2", "--device", "cpu", "--quiet"],
         "training_state.pt: unreadable training state (PytorchStreamReader failed reading zip archive"),
    Case("pretrain --resume with damaged weights", lambda r, w: truncate(checkpoint(w) / "model.safetensors"),
         lambda r, w: ["pretrain", "--resume", "--epochs", "2", "--device", "cpu", "--quiet"],
         "model.safetensors: unreadable checkpoint"),
    Case("pretrain --resume with a damaged run config", lambda r, w: truncate(w / "runs" / "run-001" / "config.json"),
         lambda r, w: ["pretrain", "--resume", "--device", "cpu"], "{ws}/runs/run-001/config.json: unreadable run config"),
    Case("pretrain into a run folder that is a file", nothing,
         lambda r, w: ["pretrain", "--captions", r / "train.jsonl", "--text-model", r / "tiny-bert", "--device", "cpu",
                       "--quiet", "-o", w / "cache" / "manifest.json"], "{ws}/cache/manifest.json"),
    Case("pretrain on a cache whose manifest was edited", lambda r, w: edit_manifest(w, '"feature_dim": 16', '"feature_dim": 32'),
         lambda r, w: ["pretrain", "--captions", r / "train.jsonl", "--text-model", r / "tiny-bert", "--device", "cpu"],
         "{ws}/cache: none of its 2 shard(s) can be read as its manifest describes"),
    # index
    Case("index with a damaged checkpoint meta.json", lambda r, w: truncate(checkpoint(w) / "meta.json", 5),
         lambda r, w: ["index", "--device", "cpu"], "meta.json: unreadable checkpoint meta"),
    Case("index with a damaged index.json", lambda r, w: truncate(the_index(w) / "index.json", 5),
         lambda r, w: ["index", "--device", "cpu"], "index.json: unreadable index metadata"),
    Case("index with a truncated FAISS file", lambda r, w: truncate(the_index(w) / "index.faiss"),
         lambda r, w: ["index", "--device", "cpu"], "incomplete or unreadable index"),
    Case("index into a folder below a file", nothing,
         lambda r, w: ["index", "--device", "cpu", "-o", w / "cache" / "manifest.json" / "index"],
         "/cache/manifest.json/index/"),
    # search
    Case("search with a queries file that is not UTF-8", lambda r, w: write(r / "queries.txt", b"a dog\nun caf\xe9\n"),
         lambda r, w: ["search", "--queries", r / "queries.txt"], "{root}/queries.txt:2: not UTF-8 text (byte 0xe9)"),
    Case("search with a damaged checkpoint meta.json", lambda r, w: truncate(checkpoint(w) / "meta.json", 5),
         lambda r, w: ["search", "a dog"], "meta.json: unreadable checkpoint meta"),
    Case("search with a damaged index.json", lambda r, w: truncate(the_index(w) / "index.json", 5),
         lambda r, w: ["search", "a dog"], "index.json: unreadable index metadata"),
    Case("search with damaged region embeddings", lambda r, w: truncate(the_index(w) / "regions.npy"),
         lambda r, w: ["search", "a dog"], "incomplete or unreadable index"),
    # serve
    Case("serve with a damaged index.json", lambda r, w: truncate(the_index(w) / "index.json", 5),
         lambda r, w: ["serve", "--port", "0"], "index.json: unreadable index metadata"),
    # eval
    Case("eval on a caption file that is not UTF-8", lambda r, w: write(r / "latin1.jsonl", NOT_UTF8),
         lambda r, w: ["eval", "--captions", r / "latin1.jsonl", "--device", "cpu"], "{root}/latin1.jsonl:2: not UTF-8 text"),
    Case("eval with damaged weights", lambda r, w: truncate(checkpoint(w) / "model.safetensors"),
         lambda r, w: ["eval", "--captions", r / "val.jsonl", "--device", "cpu"], "model.safetensors: unreadable checkpoint"),
]


def edit_manifest(ws: Path, old: str, new: str) -> None:
    manifest = ws / "cache" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(old, new))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """root/ws with a cache, a run and its index; root/train.jsonl, val.jsonl, tiny-bert."""
    from vlpcache.index.build import run_index

    root = tmp_path_factory.mktemp("errors")
    ws = build_tiny_workspace(root)
    run_index(run_dir=ws / "runs" / "run-001", cache_dir=ws / "cache", index_dir=ws / "index", device="cpu", quiet=True)
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line_naming_the_file_and_nothing_is_lost(case, template, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    shutil.copytree(template, root)
    ws = root / "ws"
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(ws))
    case.damage(root, ws)
    before = snapshot(root)
    code, out, err = vlpcache(monkeypatch, capsys, *case.args(root, ws))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert case.says.format(root=root, ws=ws) in errors[0], errors[0]
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed"
    assert not [name for name in after if ".tmp" in name], "a temporary was left behind"


def test_the_last_line_of_a_command_stopped_under_a_progress_bar_starts_a_line_of_its_own(monkeypatch, capsys):
    import re
    import sys

    from vlpcache import cli
    from vlpcache.errors import UserError
    from vlpcache.report import progress_bar

    def stopped_mid_bar(*args, **kwargs):
        bar = progress_bar(total=10, desc="epoch 3/30", leave=False)
        bar.update(2)
        raise UserError("boom")  # as Ctrl-C's `interrupted; ...` or an error raised inside the loop

    monkeypatch.setattr(cli.cli, "main", stopped_mid_bar)
    monkeypatch.setattr(sys, "argv", ["vlpcache", "pretrain"])
    # a terminal's bar, redrawn in place (written to a file, a bar writes whole lines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with pytest.raises(SystemExit):
        cli.main()
    assert re.split(r"[\r\n]", capsys.readouterr().err.rstrip("\n"))[-1] == "error: boom"


@pytest.mark.parametrize("args, line", [
    (["extract", "--frames", "0", "videos"],
     "error: Invalid value for '--frames': 0 is not in the range 1<=x<=512 (vlpcache extract --help)"),
    (["serch", "a dog"], "error: No such command 'serch'. Did you mean 'search'? (vlpcache --help)"),
    (["serach", "a dog"], "error: No such command 'serach'. Did you mean 'search'? (vlpcache --help)"),  # not extract
    (["inspekt"], "error: No such command 'inspekt'. Did you mean 'inspect'? (vlpcache --help)"),
    (["xyzzy"], "error: No such command 'xyzzy' (vlpcache --help)"),
    (["pretrain", "--lr", "nan"], "error: Invalid value for '--lr': 'nan' is not a finite number (vlpcache pretrain --help)"),
    (["pretrain", "--rwa-weight", "inf"],
     "error: Invalid value for '--rwa-weight': 'inf' is not a finite number (vlpcache pretrain --help)"),
    (["pretrain", "--seed", "-1"],
     "error: Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295 (vlpcache pretrain --help)"),
    (["serve", "--thumbnails-max", "nan"],  # a traceback once the index was loaded (round(nan * 1e9))
     "error: Invalid value for '--thumbnails-max': 'nan' is not a finite number (vlpcache serve --help)"),
], ids=["option", "command", "command-extract-unlike", "command-one", "command-none", "nan", "inf", "seed",
        "thumbnails-nan"])
def test_a_bad_option_or_command_is_one_error_line_like_every_other_error(args, line, monkeypatch, capsys):
    import sys

    from vlpcache import cli

    monkeypatch.setattr(sys, "argv", ["vlpcache", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    without_suggestion = re.sub(r"\. \(Did you mean one of: .*?\?\)", "", line)  # click 8.1 suggests no command
    assert exited.value.code == 2 and capsys.readouterr().err in (line + "\n", without_suggestion + "\n")


def test_a_mistyped_option_is_offered_the_option_most_like_it_alone(monkeypatch, capsys):
    # click offered '--host' and '--port' for `--hots`
    import sys

    from vlpcache import cli

    monkeypatch.setattr(sys, "argv", ["vlpcache", "serve", "--hots", "h"])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    assert "--host" in err and "--port" not in err and err.endswith("(vlpcache serve --help)\n"), err


def test_a_folder_whose_name_begins_with_a_dash_is_said_to_be_one(tmp_path, monkeypatch, capsys):
    import sys

    from vlpcache import cli

    (tmp_path / "-clips").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["vlpcache", "extract", "-clips"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2 and re.fullmatch(  # click's words: 8.1.0 says "No such option: -c"
        r"error: No such option(: -c| '-c'); -clips is a file or folder here: pass it as \./-clips, or after -- "
        r"\(vlpcache extract --help\)\n", capsys.readouterr().err)


def test_a_text_model_that_cannot_be_had_is_its_one_line_before_the_captions_are_read(template, tmp_path, monkeypatch,
                                                                                        capsys):
    # it printed the resolved text pooling first, and only after reading every caption
    root = tmp_path / "root"
    shutil.copytree(template, root)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(root / "ws"))
    code, out, err = vlpcache(monkeypatch, capsys, "pretrain", "--captions", root / "train.jsonl", "--device", "cpu",
                              "--text-model", "no-such-org/no-such-model", "-o", root / "new-run")
    assert code == 2 and err == ("error: text model 'no-such-org/no-such-model' is not a local directory nor in the Hugging "
                                 "Face cache, and huggingface.co cannot be reached (or downloads are off); pass "
                                 "--text-model DIR (a downloaded model directory) or leave it out for the offline default "
                                 "all-MiniLM-L6-v2\n"), err
    assert not (root / "new-run").exists()


@pytest.mark.parametrize("code, says", [
    (13, "error: /shared/ws/index/index.json: Permission denied (EACCES); another user's file or folder, or a read-only "
         "one? ask its owner for access, or keep what this command writes in a folder of your own (-o, or "
         "VLPCACHE_WORKSPACE=DIR for the workspace); nothing was lost"),
    (28, "error: /shared/ws/index/index.json: No space left on device (ENOSPC); nothing committed before is lost: fix "
         "this and run the command again"),
], ids=["permission", "full-disk"])
def test_a_system_error_no_command_foresaw_is_one_line_with_a_way_out(code, says, monkeypatch, capsys):
    # a shared workspace read by another user: "fix this" named no way out
    import sys

    from vlpcache import cli

    def denied(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/shared/ws/index/index.json")

    monkeypatch.setattr(cli.cli, "main", denied)
    monkeypatch.setattr(sys, "argv", ["vlpcache", "search", "a dog"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2 and capsys.readouterr().err == says + "\n"


def test_a_picture_into_a_folder_this_user_may_not_write_is_refused_before_the_frames_are_decoded(template, tmp_path,
                                                                                                  monkeypatch, capsys):
    # another user's folder: root writes anywhere, so the operating system's answer is planted
    from vlpcache.extract import render

    root = tmp_path / "root"
    shutil.copytree(template, root)
    monkeypatch.setattr(render.os, "access", lambda path, mode: Path(path) != root)
    monkeypatch.setattr(render, "source_pictures", lambda *args: pytest.fail("decoded the frames"))
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", root / "ws" / "cache", "--render", "v0", "-o", root / "v0.png")
    assert code == 2 and err == (f"error: {root / 'v0.png'}: this user may not write in {root}; pass -o a file in a "
                                 "folder of your own\n")


@pytest.mark.parametrize("args", [["models", "list", "--models", "."], ["extract", "--help"], ["--help"], ["--version"]])
def test_a_reader_that_stops_before_the_output_ends_leaves_exit_status_0(tmp_path, args):
    # `vlpcache search ... | head -1` under `set -o pipefail`: click made the BrokenPipeError exit status 1,
    # and only when the reader had closed before the last write, so the same script failed now and then.
    # Without PYTHONUNBUFFERED (a user's shell) a pipe's buffer was written at the interpreter's exit:
    # "Exception ignored ... BrokenPipeError" and exit status 120; `vlpcache --help | true` exited 1
    import os
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with open(tmp_path / "err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "vlpcache", *args], stdout=subprocess.PIPE, stderr=err,
                                   cwd=tmp_path, env=env)
        process.stdout.close()  # the reader is gone before the first line (`| true`)
        assert process.wait(timeout=HANG_GUARD_S) == 0
    assert (tmp_path / "err").read_text() == ""


def test_a_stdout_that_cannot_encode_a_name_writes_escapes_not_a_traceback(tmp_path, monkeypatch):
    # PYTHONIOENCODING=ascii, or LC_ALL=C with PYTHONUTF8=0: print() of a non-ASCII path, id or query (or
    # eval's own `text→video` until stop 51) raised UnicodeEncodeError after the work was done
    import io
    import json
    import sys

    from test_pretrain import write_cache
    from vlpcache.cli import main

    cache = tmp_path / "café 猫 🐱" / "cache"
    write_cache(cache, 2)
    for args in (["inspect", cache], ["inspect", cache, "--json"]):
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
        monkeypatch.setattr(sys, "argv", ["vlpcache", *map(str, args)])
        main()
        sys.stdout.flush()
        written = sys.stdout.buffer.getvalue().decode("ascii")
        if "--json" in args:
            assert json.loads(written)["cache"] == str(cache)  # escapes that JSON reads
        else:
            assert "caf\\u00e9 \\u732b \\ud83d\\udc31" in written, written


def test_a_memory_cap_that_torch_cannot_load_under_is_one_line(tmp_path):
    # `ulimit -v` (some clusters cap every job's address space): a traceback of torch's loader or allocator
    import resource
    import subprocess
    import sys

    from test_pretrain import write_cache, write_captions

    ids = write_cache(tmp_path / "cache", 4)
    write_captions(tmp_path / "train.jsonl", ids)

    command = [sys.executable, "-m", "vlpcache", "pretrain", "--cache", str(tmp_path / "cache"), "--captions",
               str(tmp_path / "train.jsonl"), "--epochs", "1", "-o", str(tmp_path / "run")]
    capped = {"RLIMIT_AS": (3 * 2**29, resource.RLIM_INFINITY)}  # 1.5 GiB
    result = subprocess.run(as_a_shell_starts_it(command, limits=capped), cwd=tmp_path, capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: out of memory: this process may use 1.5 GiB"), result.stderr
