"""The run directory's checkpoint lookup (run_layout.py), which pretraining, index, search and eval share,
on real directories written the way checkpoint.save_checkpoint writes them."""

import os
from pathlib import Path

import numpy as np
import pytest

from vlpcache.errors import UserError
from vlpcache.model.run_layout import (
    BEST_NAME,
    META_NAME,
    VIDEOS_NAME,
    checkpoints,
    designated_checkpoint_sha256,
    epoch_dir,
    latest_run,
    read_best,
    read_run_videos,
    resolve_checkpoint,
    save_run_videos,
    video_keys,
)
from vlpcache.records import write_json


def add_checkpoint(run_dir, epoch: int) -> None:
    folder = epoch_dir(run_dir, epoch)
    folder.mkdir(parents=True)
    write_json(folder / META_NAME, {"epoch": epoch, "sha256": f"sha-of-epoch-{epoch}"})


def test_the_designated_checkpoint_is_the_best_by_validation_else_the_last(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for epoch in (2, 5, 7):
        add_checkpoint(run, epoch)
    assert designated_checkpoint_sha256(run) == "sha-of-epoch-7"
    write_json(run / BEST_NAME, {"epoch": 5, "metrics": {}})
    assert designated_checkpoint_sha256(run) == "sha-of-epoch-5"
    assert resolve_checkpoint(run) == resolve_checkpoint(run, "best") == epoch_dir(run, 5)
    assert resolve_checkpoint(run, "last") == resolve_checkpoint(run, 7) == epoch_dir(run, 7)
    (tmp_path / "last").mkdir()  # a folder of that name where the command runs: `--checkpoint last` is still the name
    (tmp_path / "7").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(run, "last") == resolve_checkpoint(run, "7") == epoch_dir(run, 7)
    assert resolve_checkpoint(run, "./last") == Path("./last")
    write_json(run / BEST_NAME, {"epoch": 4, "metrics": {}})  # a best epoch whose checkpoint is gone
    assert designated_checkpoint_sha256(run) == "sha-of-epoch-7"


def test_a_newest_checkpoint_saved_as_the_best_is_the_best_though_a_kill_came_before_best_json(tmp_path):
    # a kill between epoch 5's rename and best.json's write: best.json named epoch 4, --resume pruned epoch 5 (its
    # training state held epoch 5's score, so no later epoch was better) and search loaded epoch 4
    run = tmp_path / "run"
    for epoch in (4, 5):
        add_checkpoint(run, epoch)
    write_json(run / BEST_NAME, {"epoch": 4, "metrics": {"r1": 1.0}})
    assert read_best(run)["epoch"] == 4  # a checkpoint of before its meta said whether it was the best
    write_json(epoch_dir(run, 5) / META_NAME, {"epoch": 5, "sha256": "sha-of-epoch-5", "best": True, "metrics": {"r1": 2.0}})
    assert read_best(run) == {"epoch": 5, "metrics": {"r1": 2.0}} and resolve_checkpoint(run) == epoch_dir(run, 5)
    write_json(epoch_dir(run, 5) / META_NAME, {"epoch": 5, "sha256": "sha-of-epoch-5", "best": False})
    assert read_best(run)["epoch"] == 4


def test_checkpoints_being_written_are_never_listed(tmp_path):
    run = tmp_path / "run"
    add_checkpoint(run, 1)
    (run / "checkpoints" / "epoch-0002").mkdir()  # no meta.json yet: not complete
    (run / "checkpoints" / ".epoch-0003.tmp-123").mkdir()
    assert list(checkpoints(run)) == [1]
    assert latest_run(tmp_path) == run


def test_a_run_without_checkpoints_has_none_to_designate(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert designated_checkpoint_sha256(run) is None
    with pytest.raises(UserError, match="no checkpoint yet"):
        resolve_checkpoint(run)
    with pytest.raises(UserError, match="no pretraining run in"):
        latest_run(tmp_path)


def test_runs_still_in_their_first_epoch_are_said_when_no_run_has_a_checkpoint(tmp_path):
    # two students' pretrain started a minute ago: `vlpcache index` said "no pretraining run; run `vlpcache
    # pretrain` first", which sends a third one off
    from vlpcache.locks import WriterLock
    from vlpcache.model.run_layout import TRAINING_LOCK_NAME

    for name in ("run-001", "run-002"):
        (tmp_path / name).mkdir()
    with WriterLock.take(tmp_path / "run-001" / TRAINING_LOCK_NAME), WriterLock.take(tmp_path / "run-002" / TRAINING_LOCK_NAME):
        with pytest.raises(UserError, match=rf"^no run in {tmp_path} has a checkpoint yet: run-001 is being trained by "
                                            rf"pid {os.getpid()} on .*\) \(and 1 more run\(s\)\), and its first "
                                            "checkpoint is saved at the end of its first epoch: wait for that, or pass "
                                            "--run$"):
            latest_run(tmp_path)


def test_the_record_of_a_runs_videos_is_read_back_and_a_damaged_one_is_no_record(tmp_path):
    save_run_videos(tmp_path, ["b", "a", "b"], ["c"])
    trained, validation = read_run_videos(tmp_path)
    assert len(trained) == 2 and list(trained) == sorted(trained) and len(validation) == 1
    assert np.isin(video_keys(["a"]), trained).all() and not np.isin(video_keys(["c"]), trained).any()
    for damaged in (b"", b"PK\x03\x04not a zip", b"\x93NUMPY garbage"):
        (tmp_path / VIDEOS_NAME).write_bytes(damaged)
        assert read_run_videos(tmp_path) is None
    assert read_run_videos(tmp_path / "no-run") is None


def test_a_recorded_location_is_read_where_it_is_and_beside_a_moved_run_only_once_it_is_gone(tmp_path):
    from vlpcache.model.run_layout import located

    made_in, here = tmp_path / "a" / "runs" / "run-001", tmp_path / "b" / "runs" / "run-001"
    here.mkdir(parents=True)
    recorded = tmp_path / "a" / "cache"
    (tmp_path / "b" / "cache").mkdir()  # the same place beside the run, in another project
    recorded.mkdir(parents=True)
    assert located(str(recorded), str(made_in), here) == str(recorded)  # still there: read as it is
    recorded.rmdir()  # the project moved: gone from where it was
    assert located(str(recorded), str(made_in), here) == str(tmp_path / "b" / "cache")
    assert located(str(recorded), None, here) == str(recorded)  # a run that did not record where it was made


def test_the_latest_run_is_the_one_that_saved_a_checkpoint_last_not_the_last_written_into(tmp_path):
    """A resume of an old run that trains nothing writes a record into it (videos.npz): its folder is then the
    newest, and it became the run index, search and eval take by default."""
    import os

    from vlpcache.model.run_layout import latest_run

    for name, saved in (("run-001", 1_000), ("run-002", 2_000)):
        checkpoint = tmp_path / name / "checkpoints" / "epoch-0001"
        checkpoint.mkdir(parents=True)
        (checkpoint / "meta.json").write_text("{}")
        os.utime(checkpoint, (saved, saved))
        os.utime(tmp_path / name, (saved, saved))
    os.utime(tmp_path / "run-001", (3_000, 3_000))  # written into since
    assert latest_run(tmp_path) == tmp_path / "run-002"
