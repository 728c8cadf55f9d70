"""`vlpcache extract --engine ray`: the local engine's stages, placed on a Ray cluster by Ray Data.

The driver plans the run exactly as for the local engine (runner.py: discovery, the resume check;
progress.py: the progress bar and the summary); this module only decides where the stages run:

    items ──▶ decode tasks (CPU) ──▶ detector actors (one per GPU, or CPU actors) ──▶ rows ──▶ driver
              FrameReader             RegionMapper + a ShardWriter of their own

- Decoding: Ray tasks of a few items each, each decoding with the local engine's `FrameReader` (one
  worker process), so a decoder that crashes on a hostile file costs that item a failure record, as
  with `--engine local`, instead of a task that Ray retries for ever.
- Detection and writing: a pool of actors, each loading the detector once and running `RegionMapper`
  with today's batch size. Each actor writes through its own crash-safe `ShardWriter`, named
  `<shard set>-ray-<actor id>` (`s0of1-ray-6f1c0a2e9b3d`), so actors never collide and the shard set
  `s{i}of{n}` of `--shard i/n` stays the unit of ownership (the driver's).
- One shard per actor call: an actor takes a batch of decoded items (at most --items-per-shard and
  about 256 MB of frames), writes it, commits the shard, and only then returns the batch's rows; a row
  the driver has seen is on disk. A killed actor thus loses only the call in progress, which Ray
  retries on the restarted actor: same actor id, same writer name, so the new incarnation removes the
  unfinished shard and skips items that its previous life committed just before dying.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import socket
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from vlpcache.cache.manifest import read_failures
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import CacheSettings
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import UserError
from vlpcache.extract.detectors.choice import load_detector
from vlpcache.extract.detectors.spec import DetectorSpec
from vlpcache.extract.options import ExtractOptions
from vlpcache.extract.progress import ExtractProgress, ExtractSummary
from vlpcache.extract.reader import FrameReader, decoded_items_within_budget
from vlpcache.extract.sources import Item
from vlpcache.interrupts import sigterm_held, stop_if_interrupted, stops_deferred

RAY_MISSING = 'the ray engine needs Ray Data: pip install "vlpcache[ray]" (or pip install "ray[data]")'
DECODE_TASK_ITEMS = 64  # items per decoding task at most: one worker process start (about 0.5 s) each
DECODE_TASK_MIN_ITEMS = 16  # and at least, where the decoders have a task each: 8 tasks of 2 items each made a
# 17-item extract 12 s long on 2 cores, 1 task 7.2 s (BENCHMARKS.md)
DECODE_TASKS_PER_DECODER = 4  # this many tasks per decoder where there are items enough, for balance
# memory Ray reserves for each detector actor: the networks, a batch of decoded items and its regions
# (yolox on CPU: 1.2-1.7 GB resident). Asking for it also keeps Ray Data from fusing the decoding
# tasks into the actors on CPU, where both would otherwise ask for one CPU and nothing else
DETECTOR_ACTOR_MEMORY = 2 * 2**30


def require_ray():
    """The ray module, or one line saying how to install it. A Ctrl-C or SIGTERM while it imports (3 s) waits
    for the import's end: raised within it, Python may wrap it in another error (`Error calling __set_name__`),
    a traceback and exit 1."""
    try:
        with stops_deferred():
            import ray
            import ray.data  # noqa: F401
    except ImportError:
        raise UserError(RAY_MISSING) from None
    stop_if_interrupted()
    return ray


def address_named(address: str | None) -> str:
    """Where the cluster's address came from, for the one line that says it does not answer."""
    if address:
        return f"--ray-address {address}"
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    return "a new local Ray instance"


def recorded_cluster() -> Path:
    """Where `ray start` records its cluster's address for `auto` (Ray's temporary folder)."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"


def check_address(address: str | None) -> None:
    """A HOST:PORT (--ray-address, else $RAY_ADDRESS) that nothing answers at is one line now: Ray itself would
    retry it for minutes (a refused port from $RAY_ADDRESS: for good, deaf to Ctrl-C)."""
    named, given = address_named(address), address or os.environ.get("RAY_ADDRESS") or ""
    if given == "auto":  # the cluster `ray start` recorded on this machine: a head that died leaves the record
        recorded = recorded_cluster()
        given = recorded.read_text().strip() if recorded.is_file() else ""
        named += f" ({given}, as `ray start` recorded it in {recorded})"
    target = given.removeprefix("ray://")  # a Ray client's address: its server's port, the same check
    if given in ("", "local") or "://" in target:  # a new local instance, none recorded, another scheme: Ray's rules
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{named}: not an address of the form HOST:PORT; give the head node's, as "
                        "`ray start --head` printed it (e.g. 10.0.0.1:6379), or auto for the cluster on this machine")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise UserError(f"{named}: no Ray head node answers there ({err.strerror or err}); start one "
                        f"with `ray start --head`, or {'leave the address out' if address else 'unset RAY_ADDRESS'} "
                        "for a local instance") from None


def decode_items(batch: dict[str, np.ndarray], num_frames: int, max_side: int,
                 timeout: float | None) -> Iterator[dict[str, list]]:
    """Ray task: decode a block of items, yielding one row per item with its pickled DecodedItem."""
    items = [Item(str(i), Path(p), str(k), str(r))
             for i, p, k, r in zip(batch["id"], batch["path"], batch["kind"], batch["replaces"])]
    for decoded in FrameReader(num_frames, max_side, workers=1, timeout=timeout)(items):
        yield {"decoded": [pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)]}


class RegionShardActor:
    """One detector actor: each call detects a batch of decoded items, writes them into one shard
    of its own, commits it, and returns one row per item (id, path, frames, error, note) to the driver."""

    def __init__(self, cache_dir: str, settings: dict, spec: DetectorSpec, device: str, batch_size: int,
                 score_threshold: float, shard_set: str, autotune: bool = True):
        import ray

        from vlpcache.extract.mapper import RegionMapper  # imports torch: in the actor only

        context = ray.get_runtime_context()
        settings = CacheSettings.from_json(settings)
        # the actor id survives a restart: the new incarnation takes over its writer name, which
        # removes the unfinished shard of the killed one (ShardWriter) and lets the retried call skip
        # what the killed one committed between its last commit and returning
        name = f"{shard_set}-ray-{context.get_actor_id()[:12]}"
        self.refused: UserError | None = None
        try:  # the detector first: an actor that cannot load it holds no writer's lock (which kept the cache folder)
            self.mapper = RegionMapper(load_detector(spec, device, score_threshold, autotune), settings, batch_size)
            self.writer = ShardWriter(Path(cache_dir), settings, writer_name=name, max_items=sys.maxsize,
                                      max_seconds=math.inf)  # commits at the end of each call only
        except UserError as err:  # (weights damaged, a full disk): raised from the first call, which the driver says in
            self.refused = err    # one line; raised here, Ray keeps only its text, and the run ends in its tracebacks
        with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated property here
            warnings.simplefilter("ignore")
            reconstructed = context.was_current_actor_reconstructed
        self.committed = RegionCache(cache_dir) if reconstructed and self.refused is None else None
        # and the failures it recorded: those of the retried call's items were recorded a second time
        self.failed = read_failures(Path(cache_dir), writer=name) if self.committed is not None else {}
        self.ready_at = time.time()
        self.idle_since = time.perf_counter()

    def done_before(self, decoded) -> tuple | None:
        """The row of an item that the killed incarnation committed, or recorded as failed, from this source (not
        the cache's older row of a source that has changed since): the retried call writes neither again."""
        item_id = decoded.item.id
        failed = self.failed.get(item_id)
        if failed is not None and failed.get("source", "") == decoded.source:
            return decoded.item, 0, failed.get("reason", ""), ""
        cache = self.committed
        if cache is None or item_id not in cache or cache.sources[cache.index_of(item_id)] != decoded.source:
            return None
        return decoded.item, int(cache.get(item_id, ("frame_mask",))["frame_mask"].sum()), "", cache.note_of(item_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.refused is not None:
            raise self.refused
        waited = time.perf_counter() - self.idle_since
        detect_before = self.mapper.detect_seconds
        rows, fresh = [], []
        for decoded in (pickle.loads(b) for b in batch["decoded"]):
            if (row := self.done_before(decoded)) is not None:
                rows.append(row)
            else:
                fresh.append(decoded)
        for result in self.mapper(fresh):
            rows.append((result.decoded.item, result.write(self.writer), result.error or "", result.note))
        self.writer.commit()  # before the rows leave: whatever the driver counts is on disk
        self.idle_since = time.perf_counter()
        first = np.arange(len(rows)) == 0  # the call's timings ride on its first row
        return {
            "id": np.array([item.id for item, _, _, _ in rows], dtype=object),
            "path": np.array([str(item.path) for item, _, _, _ in rows], dtype=object),
            "frames": np.array([frames for _, frames, _, _ in rows], dtype=np.int64),
            "error": np.array([error for _, _, error, _ in rows], dtype=object),
            "note": np.array([note for _, _, _, note in rows], dtype=object),
            "detect_seconds": np.where(first, self.mapper.detect_seconds - detect_before, 0.0),
            "wait_seconds": np.where(first, waited, 0.0),
            "ready_at": np.full(len(rows), self.ready_at),
        }


def run_on_ray(todo: list[Item], spec: DetectorSpec, writer: ShardWriter, options: ExtractOptions,
               summary: ExtractSummary, started: float) -> None:
    """Run `todo` through decode tasks and detector actors on the Ray cluster at --ray-address (None:
    $RAY_ADDRESS, else a new local instance), advancing the driver's progress bar row by row. The
    driver's `writer` writes nothing here: the actors write, each through a writer of its own."""
    ray = require_ray()
    if options.workers == 0:
        raise UserError("--workers 0 (decoding in the detector's process) is for --engine local")
    started_here = _connect(ray, options.ray_address)
    try:
        dataset = _pipeline(ray, todo, spec, writer, options)
        with ExtractProgress(summary, len(todo), options.description(), spec.detector, started,
                             options.quiet, writer.cache_dir) as progress:
            try:
                _collect(dataset, progress, summary, started)
            except Exception as err:
                ours = user_error_inside(err)
                if ours is None:
                    raise
                raise UserError(str(ours).splitlines()[0]) from None  # Ray appends lines on its retries
    finally:
        if started_here:
            ray.shutdown()


def user_error_inside(err: BaseException) -> UserError | None:
    """The one-line error (a full disk: the actor's ShardWriter) that an actor raised, from inside the
    exceptions Ray wraps it in (a RayTaskError whose text is the actor's whole traceback); None if none."""
    from ray.exceptions import RayError

    seen, queue = set(), [err]
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError) and not isinstance(e, RayError):
            return e
        queue += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _connect(ray, address: str | None) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines beside our bar
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours show
    # an actor's error is logged by these with its traceback (the last by Ray up to 2.52 at least), then raised
    # here: run_on_ray says it (in one line where it is ours, a full disk), and Python prints any other's traceback
    for name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions",
                 "ray.data._internal.util"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return False
    try:
        # no address: a new local instance, as documented, not Ray's default of the last `ray start` cluster (a
        # stale record of one whose head died, /tmp/ray/ray_current_cluster, hangs ray.init for good)
        # a SIGTERM while Ray starts and connects waits for it to be done: Ray's handlers end the driver without a word
        with warnings.catch_warnings(), sigterm_held(), _instance_in_its_own_session(ray):
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)  # Ray up to 2.55, every init
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)
    except ConnectionError as err:
        if "InvalidAuthToken" in str(err.__cause__):  # Ray's text after its 20 s of retries
            raise UserError(f"{address_named(address)}: the cluster wants token authentication, which this shell has "
                            "not turned on: export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token "
                            "or RAY_AUTH_TOKEN (README: --engine ray)") from None
        raise UserError(f"{address_named(address)}: {str(err).rstrip('.')}; start the cluster with `ray start --head` "
                        "or leave the address out for a local instance; a cluster with token authentication also "
                        "needs RAY_AUTH_MODE=token and its token here (~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    except KeyboardInterrupt:  # a SIGTERM held while Ray started (sigterm_held)
        ray.shutdown()
        raise
    return True


@contextlib.contextmanager
def _instance_in_its_own_session(ray) -> Iterator[None]:
    """Within (ray.init, under sigterm_held): the processes of the local instance that ray.init starts (its GCS,
    raylet, dashboard...) lead sessions of their own, with SIGTERM unblocked. A job's SIGTERM to the process group
    (`timeout`, a shell's kill of a job) then reaches the driver only, which ends the instance itself (ray.shutdown;
    at its exit the kernel ends them, Ray's fate sharing), as Ray keeps Ctrl-C from them: the SIGTERM that ended
    them while the driver connected made Ray's C++ exit the driver with 1 and no line of ours."""
    services = getattr(getattr(ray, "_private", None), "services", None)
    popen = getattr(services, "ConsolePopen", None)
    if popen is None:  # another Ray: its own ways
        yield
        return

    class OwnSession(popen):
        def __init__(self, *args, preexec_fn=None, **kwargs):
            def in_the_child():
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked in the driver (sigterm_held)
                if preexec_fn is not None:
                    preexec_fn()

            super().__init__(*args, **{**kwargs, "preexec_fn": in_the_child, "start_new_session": True})

    services.ConsolePopen = OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = popen


def _pipeline(ray, todo: list[Item], spec: DetectorSpec, writer: ShardWriter, options: ExtractOptions):
    """decode tasks -> detector actor pool, as a lazy Ray Dataset of result rows."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts items
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # an actor's UserError reaches the driver (user_error_inside)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if options.device == "cuda" and not gpus:
        raise UserError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if options.device != "cpu" and gpus:
        actor_device, actors, resources = "cuda", gpus, {"num_gpus": 1, "num_cpus": 1}
        decoders = options.workers or None  # the CPUs the actors leave
    else:  # one CPU actor per node: the detector's own threads use the node's cores. It holds no CPU of Ray's:
        # a CPU each, two extracts on a 2-CPU cluster held them all, and neither decoded anything, for good
        actor_device, actors, resources = "cpu", sum(1 for n in ray.nodes() if n["Alive"]), {"num_cpus": 0}
        decoders = options.workers or max(1, cpus - actors)  # as many as when the actors held their CPU
    tasks = decode_tasks(len(todo), decoders or cpus)
    rows = [{"id": item.id, "path": str(item.path.absolute()), "kind": item.kind, "replaces": item.replaces}
            for item in todo]
    spec = replace(spec, detector_file=spec.detector_file and spec.detector_file.absolute(),  # for workers whose
                   backbone_file=spec.backbone_file and spec.backbone_file.absolute())  # current directory differs
    actor_items = min(options.items_per_shard, decoded_items_within_budget(spec.max_side, options.frames))
    return (
        ray.data.from_items(rows, override_num_blocks=tasks)
        .map_batches(decode_items, batch_size=None, batch_format="numpy", num_cpus=1,
                     fn_kwargs={"num_frames": options.frames, "max_side": spec.max_side,
                                "timeout": options.decode_time_limit()},
                     compute=ray.data.TaskPoolStrategy(size=decoders) if decoders else None)
        .map_batches(RegionShardActor, batch_size=actor_items, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=actors), memory=DETECTOR_ACTOR_MEMORY,
                     **resources,
                     fn_constructor_kwargs={
                         "cache_dir": str(writer.cache_dir.absolute()), "settings": writer.settings.to_json(),
                         "spec": spec,
                         "device": actor_device, "batch_size": options.detector_batch_size(actor_device),
                         "score_threshold": options.score_threshold, "shard_set": options.shard_set(),
                         "autotune": options.autotune})
    )


def decode_tasks(items: int, decoders: int) -> int:
    """How many decoding tasks share `items` among `decoders` at once: a few per decoder for balance, at most
    DECODE_TASK_ITEMS items each, and no fewer than DECODE_TASK_MIN_ITEMS where that still gives each decoder
    one (each task starts a worker process)."""
    balanced = max(DECODE_TASKS_PER_DECODER * decoders, math.ceil(items / DECODE_TASK_ITEMS))
    return min(items, balanced, max(decoders, items // DECODE_TASK_MIN_ITEMS))


def _collect(dataset, progress: ExtractProgress, summary: ExtractSummary, started: float) -> None:
    """Advance the progress bar and the summary with each row as the actors return it."""
    started_at = time.time() - (time.monotonic() - started)
    first = True
    for row in dataset.iter_rows():
        if first:
            progress.ready(since=row["ready_at"])  # rates count from the first actor being ready
            first = False
        summary.load_seconds = min(summary.load_seconds, row["ready_at"] - started_at)  # the first actor ready
        summary.detect_seconds += row["detect_seconds"]
        summary.wait_seconds += row["wait_seconds"]
        progress.advance(row["path"], int(row["frames"]), row["error"] or None, row["note"])
        stop_if_interrupted()
