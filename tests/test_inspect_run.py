"""`vlpcache inspect RUN` and `inspect --runs` on a real run (a tiny model trained for one epoch) as
pretraining leaves it, stops it or is still training it."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_search import template, vlpcache, ws  # noqa: F401  (template and ws: the tiny workspace's fixtures)
from vlpcache.locks import WriterLock
from vlpcache.model.run_layout import CONFIG_NAME, LOG_FIELDS, LOG_NAME, TRAINING_LOCK_NAME, latest_run, read_best


def inspect_json(monkeypatch, capsys, *args):
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def set_epochs(run: Path, epochs: int) -> None:
    config = json.loads((run / CONFIG_NAME).read_text())
    (run / CONFIG_NAME).write_text(json.dumps({**config, "train": {**config["train"], "epochs": epochs}}))


def test_a_finished_run_shows_its_settings_each_epochs_validation_and_the_best(ws, monkeypatch, capsys):
    run = ws / "runs" / "run-001"
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", run)
    assert code == 0, err
    lines = out.splitlines()
    best = read_best(run)
    assert lines[0] == f"run         {run}" and lines[1] == "state       finished: 1 of 1 epochs"
    assert any(line.startswith("caches      ") and line.endswith("/cache (synthetic, T=2, N=4, D=16)") for line in lines)
    assert any(line.startswith("video       region transformer 16 wide, 1 layer(s)") for line in lines)
    assert any(line.startswith("text        ") and "/tiny-bert, top 2 layer(s) train, 32 tokens per caption, mean pooling, "
               in line for line in lines)
    assert any(line.startswith("captions    ") and line.endswith("(16 videos trained on, 8 validated on)") for line in lines)
    # --precision auto, and what it was on this machine: bf16 on a CPU with native bf16, else fp32
    [record] = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    assert any(line.startswith("training    batch ") and line.endswith(f", precision auto ({record['precision']} as logged)")
               for line in lines)
    [row] = [line for line in lines if line.startswith("    1*")]  # the best epoch, marked
    r1, r5, r10, mdr = (float(x) for x in row.split()[2:6])
    assert (r1, r5, r10, mdr) == tuple(round(best["metrics"][k], 1) for k in ("R@1", "R@5", "R@10", "MdR"))
    assert any(line.startswith("best        epoch 1 (*) by R@1 + R@5 + R@10") for line in lines)
    # durations as a person reads them; their values depend on the machine's load, so only the form is checked
    assert any(re.fullmatch(r"time        [0-9.]+ (s|min) training \+ [0-9.]+ (s|min) validation over 1 epoch\(s\), as logged",
                            line) for line in lines)

    summary = inspect_json(monkeypatch, capsys, run)
    assert summary["state"] == "finished" and summary["epochs"] == summary["epochs_done"] == 1
    assert summary["best"]["epoch"] == 1 and summary["log"][0]["val"]["R@1"] == best["metrics"]["R@1"]
    assert summary["checkpoints"] == [1] and summary["model"]["width"] == 16
    assert summary["videos"] == {"trained": 16, "validation": 8}
    # the log line pretraining wrote has the fields of the log's schema, each one, no other
    [record] = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    assert set(record) == set(LOG_FIELDS) - {"resumed"}  # this run validates and trains with rwa; it was not resumed
    assert set(summary["log"][0]) == set(LOG_FIELDS) and summary["log"][0]["resumed"] is None


def test_a_batch_size_larger_than_the_training_videos_shows_the_batch_a_step_took_too(template, ws, monkeypatch, capsys):
    # inspect showed "batch 64" of a run whose 16 training videos made every step a batch of 16
    from vlpcache.model.train import run_pretrain

    run = ws / "runs" / "run-002"
    run_pretrain(cache_dirs=[ws / "cache"], captions=[template.parent / "train.jsonl"], run_dir=run,
                 text_model=str(template.parent / "tiny-bert"), width=16, layers=1, batch_size=64, epochs=1, workers=0,
                 quiet=True, device="cpu")
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", run)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("training    ")]
    assert line.startswith("training    batch 64 (16 as logged: a step takes at most the training videos a process "
                           "has), lr "), line
    assert inspect_json(monkeypatch, capsys, run)["log"][0]["batch"] == 16
    code, out, _ = vlpcache(monkeypatch, capsys, "inspect", ws / "runs" / "run-001")  # batch 8 of 16 videos: as asked
    assert code == 0 and "training    batch 8, lr " in out


def test_a_run_stopped_before_its_last_epoch_says_how_to_continue_it(ws, monkeypatch, capsys):
    run = ws / "runs" / "run-001"
    set_epochs(run, 3)
    code, out, _ = vlpcache(monkeypatch, capsys, "inspect", run)
    assert code == 0
    assert out.splitlines()[1] == f"state       stopped after 1 of 3 epochs; `vlpcache pretrain --resume -o {run}` continues it"
    # a lock file its holder left when it was killed: the run is stopped, not training
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / TRAINING_LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                      "since": time.time()}))
    assert inspect_json(monkeypatch, capsys, run)["state"] == "stopped"
    # the dead trainer's pid given to a live process since (a restarted container): it holds no lock, stopped
    (run / TRAINING_LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))
    expected = "stopped" if Path("/proc/locks").exists() else "training"  # without the kernel's table: the pid decides
    assert inspect_json(monkeypatch, capsys, run)["state"] == expected


def test_a_run_being_trained_names_the_process_training_it(ws, monkeypatch, capsys):
    run = ws / "runs" / "run-001"
    set_epochs(run, 3)
    with WriterLock.take(run / TRAINING_LOCK_NAME):  # as pretrain holds it: this process, alive
        summary = inspect_json(monkeypatch, capsys, run)
        code, out, _ = vlpcache(monkeypatch, capsys, "inspect", run)
    assert summary["state"] == "training" and summary["holder"]["pid"] == os.getpid()
    assert out.splitlines()[1].startswith(f"state       training now: pid {os.getpid()} on ")
    assert out.splitlines()[1].endswith("; 1 of 3 epochs done")


def test_a_run_starting_before_its_settings_are_saved_is_a_run_being_trained(ws, monkeypatch, capsys):
    # pretrain takes the lock, then reads captions and caches (minutes for millions) before config.json:
    # inspect then said "not a vlpcache cache", and --runs passed the run over
    run = ws / "runs" / "run-002"
    run.mkdir()
    with WriterLock.take(run / TRAINING_LOCK_NAME):  # as pretrain holds it: this process, alive
        code, out, err = vlpcache(monkeypatch, capsys, "inspect", run)
        summary = inspect_json(monkeypatch, capsys, run)
        listed = inspect_json(monkeypatch, capsys, "--runs")
        code_runs, text, _ = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert code == 0, err
    assert out.splitlines()[0] == f"run         {run}" and len(out.splitlines()) == 2
    assert re.fullmatch(rf"state       training now: pid {os.getpid()} on .*; starting: its settings are not saved yet",
                        out.splitlines()[1])
    assert summary["state"] == "training" and summary["holder"]["pid"] == os.getpid() and summary["epochs_done"] == 0
    assert [(Path(r["run"]).name, r["state"], r["differs"]) for r in listed] == [("run-001", "finished", {}),
                                                                                 ("run-002", "training", {})]
    assert code_runs == 0 and re.search(r"^run-002 +training +training now: pid \d+ .*; starting", text, re.M), text
    # its pretrain killed there: a lock whose process is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / TRAINING_LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                      "since": time.time()}))
    code, out, _ = vlpcache(monkeypatch, capsys, "inspect", run)
    assert code == 0 and out.splitlines()[1] == ("state       not started: its pretrain stopped before saving its "
                                                 "settings (config.json); run that pretrain command again")


def test_the_log_shows_each_epoch_once_as_last_written_and_passes_over_a_torn_line(ws, monkeypatch, capsys):
    run = ws / "runs" / "run-001"
    [record] = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    redone = {**record, "loss": 1.25, "val": {**record["val"], "R@1": 50.0}}  # the epoch redone after a resume
    (run / LOG_NAME).write_text(json.dumps(record) + "\n" + json.dumps(redone) + "\n" + '{"epoch": 2, "lo')
    summary = inspect_json(monkeypatch, capsys, run)
    assert [(r["epoch"], r["loss"], r["val"]["R@1"]) for r in summary["log"]] == [(1, 1.25, 50.0)]
    # an epoch logged without a loss or validation (a run without validation captions) shows dashes
    with open(run / LOG_NAME, "a") as log:
        log.write('\n{"epoch": 2, "epoch_seconds": 3.0}\n')
    shutil.copytree(run / "checkpoints" / "epoch-0001", run / "checkpoints" / "epoch-0002")  # its checkpoint
    meta = json.loads((run / "checkpoints" / "epoch-0002" / "meta.json").read_text())
    (run / "checkpoints" / "epoch-0002" / "meta.json").write_text(json.dumps({**meta, "epoch": 2, "best": False}))
    # and the line of an epoch whose checkpoint a kill (or a full disk) took after the line was written: not shown
    with open(run / LOG_NAME, "a") as log:
        log.write(json.dumps({**redone, "epoch": 3, "val": {**record["val"], "R@1": 99.0}}) + "\n")
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", run)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("    ") and line.split()[0][0].isdigit()]
    assert rows[0][:3] == ["1*", "1.250", "50.0"] and rows[1] == ["2", "-", "-", "-", "-", "-", "3", "0"] and len(rows) == 2
    assert "99.0" not in out and "over 2 epoch(s)" in out


def test_a_run_of_several_caches_shows_each_ones_settings_and_a_cache_gone(tmp_path):
    from vlpcache.model.inspect_run import _caches

    (tmp_path / "a").mkdir()
    settings = [{"detector": "yolox", "frames": t, "regions": 31, "feature_dim": 1280} for t in (2, 8)]
    summary = {"train": {"caches": [str(tmp_path / "a"), str(tmp_path / "b")]}, "cache_settings": settings[0],
               "cache_settings_each": settings}
    assert _caches(summary) == (f"{tmp_path / 'a'} (yolox, T=2, N=31, D=1280), {tmp_path / 'b'} (not found) "
                                "(yolox, T=8, N=31, D=1280)")
    summary["cache_settings_each"] = None  # a run made before each was recorded
    assert _caches(summary) == f"{tmp_path / 'a'}, {tmp_path / 'b'} (not found) (yolox, T=2, N=31, D=1280)"


def test_runs_lists_every_run_and_marks_the_one_search_uses(ws, tmp_path, monkeypatch, capsys):
    newer = ws / "runs" / "run-002"
    shutil.copytree(ws / "runs" / "run-001", newer)
    set_epochs(newer, 3)
    for folder in (newer, *(newer / "checkpoints").iterdir()):  # it saved a checkpoint last
        os.utime(folder, (time.time() + 10, time.time() + 10))
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert code == 0, err
    first, second = out.splitlines()
    assert first.startswith("run-001      finished        1/1   epochs  best epoch 1: val R@1 ")
    assert second.startswith("run-002      stopped         1/3   epochs")
    assert second.endswith("<- index, search and eval use it by default") and latest_run(ws / "runs") == newer
    listed = inspect_json(monkeypatch, capsys, "--runs")
    assert [Path(r["run"]).name for r in listed] == ["run-001", "run-002"]
    assert [(r["latest"], r["default"]) for r in listed] == [(False, False), (True, True)]  # as the text marks it
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", "--runs", newer)  # a run where a folder of runs goes
    assert code == 2 and err == (f"error: {newer} is a run, not a folder of runs: `vlpcache inspect {newer}` shows it "
                                 f"(--runs lists the runs of a folder such as {ws / 'runs'})\n")
    # the folder given, with or without --runs, is listed the same way
    for args in ((ws / "runs",), ("--runs", ws / "runs")):
        assert vlpcache(monkeypatch, capsys, "inspect", *args)[1] == out
    # runs kept elsewhere: the latest is marked, without the claim about what search uses
    shutil.copytree(ws / "runs", tmp_path / "kept")
    code, kept, _ = vlpcache(monkeypatch, capsys, "inspect", tmp_path / "kept")
    assert code == 0 and kept.splitlines()[-1].endswith("  <- the latest") and "by default" not in kept
    begun = tmp_path / "kept" / "run-003"  # validated at the end of each epoch: none ended yet ("no validation" said)
    shutil.copytree(ws / "runs" / "run-001", begun)
    shutil.rmtree(begun / "checkpoints")
    (begun / "best.json").unlink()
    code, kept, _ = vlpcache(monkeypatch, capsys, "inspect", tmp_path / "kept")
    assert code == 0 and [line for line in kept.splitlines() if line.startswith("run-003")][0].split("epochs")[1].startswith(
        "  no validation yet  (")


def test_runs_says_the_settings_that_tell_each_run_from_the_others(ws, monkeypatch, capsys):
    run = ws / "runs" / "run-001"
    other = ws / "runs" / "run-002"
    shutil.copytree(run, other)
    config = json.loads((other / CONFIG_NAME).read_text())
    config["train"].update(lr=0.002, epochs=5, workers=3, val_captions=None)  # epochs are listed already; workers are
    # the machine's; a run without validation has none, which is no setting unknown
    config["model"].update(global_path=False, rwa=False)
    (other / CONFIG_NAME).write_text(json.dumps(config))
    for folder in (other, *(other / "checkpoints").iterdir()):  # it saved a checkpoint last
        os.utime(folder, (time.time() + 10, time.time() + 10))
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert code == 0, err
    lr, val = (json.loads((run / CONFIG_NAME).read_text())["train"][key] for key in ("lr", "val_captions"))
    lines = out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("run-001 ") and lines[2].startswith("run-002 ")
    assert lines[1] == f"{'':12s} --lr {lr:g}, --global-path, rwa on, --val-captions {val}"
    assert lines[3] == f"{'':12s} --lr 0.002, --no-global-path, --no-rwa, no --val-captions"
    listed = inspect_json(monkeypatch, capsys, "--runs")
    assert [r["differs"] for r in listed] == [{"--lr": lr, "--global-path": True, "--rwa": True, "--val-captions": val},
                                              {"--lr": 0.002, "--global-path": False, "--rwa": False, "--val-captions": None}]
    # runs alike in what is compared: one line each, as before
    shutil.copy(run / CONFIG_NAME, other / CONFIG_NAME)
    code, out, _ = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert len(out.splitlines()) == 2 and all(r["differs"] == {} for r in inspect_json(monkeypatch, capsys, "--runs"))


def test_a_run_this_user_may_not_read_is_listed_as_such_and_never_the_default(ws, monkeypatch, capsys):
    # another user's run made with umask 077 stopped `inspect --runs`, search and eval with EACCES; root
    # reads everything, so the operating system's answer for that run's files is planted here
    newer = ws / "runs" / "run-002"
    shutil.copytree(ws / "runs" / "run-001", newer)
    for folder in (newer, *(newer / "checkpoints").iterdir()):  # it saved a checkpoint last
        os.utime(folder, (time.time() + 10, time.time() + 10))
    real_read_text, real_is_file = Path.read_text, Path.is_file

    def denied(method):
        def checked(path, *args, **kwargs):
            if newer in (Path(path), *Path(path).parents):
                raise PermissionError(13, "Permission denied", str(path))
            return method(path, *args, **kwargs)
        return checked

    monkeypatch.setattr(Path, "read_text", denied(real_read_text))
    monkeypatch.setattr(Path, "is_file", denied(real_is_file))
    assert latest_run(ws / "runs") == ws / "runs" / "run-001"  # the default: a run it can load
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert code == 0, err
    assert out.splitlines()[1] == ("run-002      unreadable    Permission denied (EACCES): another user's run? its owner "
                                   "can make it readable (chmod -R a+rX)")
    assert out.splitlines()[0].endswith("<- index, search and eval use it by default")


def test_a_cache_option_given_with_a_run_or_no_runs_at_all_is_one_line(ws, monkeypatch, capsys):
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", ws / "runs" / "run-001", "--render", "v0")
    assert code == 2 and err == "error: --render and --failures look at a cache, not at pretraining runs\n"
    shutil.rmtree(ws / "runs")
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert code == 2 and err.startswith("error: no pretraining run in ") and err.count("\n") == 1
    code, out, _ = vlpcache(monkeypatch, capsys, "inspect", ws / "cache")  # a cache is still a cache
    assert code == 0 and out.startswith(f"cache       {ws / 'cache'}")


def test_inspect_of_a_path_that_is_not_there_says_no_such_run_or_cache_and_names_the_runs(ws, tmp_path, monkeypatch,
                                                                                           capsys):
    # `inspect runs/run-001` for .vlpcache/runs/run-001 (a typo) said "no such cache directory; run `vlpcache extract`"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ws / "runs" / "run-001", ws / "runs" / "run-002")
    for epoch in (ws / "runs" / "run-002" / "checkpoints").iterdir():  # saved later: listed newest last
        os.utime(epoch, (time.time() + 60, time.time() + 60))
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", "runs/run-001")
    assert code == 2 and err == ("error: runs/run-001: no such run or cache; the runs in ws/runs/: ws/runs/run-001, "
                                 "ws/runs/run-002 (`vlpcache inspect --runs ws/runs` lists them)\n")
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", ws / "runs" / "run-01")  # the runs of the folder it names
    assert code == 2 and err.startswith(f"error: {ws / 'runs' / 'run-01'}: no such run or cache; the runs in ws/runs/: ")
    shutil.rmtree(ws / "runs")
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", "runs/run-001")
    assert code == 2 and err == (f"error: runs/run-001: no such run or cache; the workspace ({ws}) has no run yet: "
                                 "`vlpcache extract` makes a cache, `vlpcache pretrain` a run\n")


@pytest.mark.parametrize("text, says", [
    ('{"model": ', "unreadable run config (Expecting value"),  # cut short
    ("[1]", "unreadable run config (its model and train settings are missing or damaged)"),
    ('{"model": 1, "train": 2}', "unreadable run config (its model and train settings are missing or damaged)"),
])
def test_a_run_whose_config_is_damaged_is_one_line_naming_the_file(ws, monkeypatch, capsys, text, says):
    config = ws / "runs" / "run-001" / CONFIG_NAME
    config.write_text(text)
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", config.parent)
    assert code == 2 and err.startswith(f"error: {config}: {says}") and err.count("\n") == 1
    assert config.read_text() == text  # nothing rewritten


def test_durations_read_in_the_unit_a_person_would_use():
    from vlpcache.report import human_duration

    assert [human_duration(s) for s in (0.4, 6, 89, 90, 2244, 5399, 5400, 8280)] == [
        "0 s", "6 s", "89 s", "1.5 min", "37.4 min", "90.0 min", "1.5 h", "2.3 h"]
