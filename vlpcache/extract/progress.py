"""What the driver of `vlpcache extract` counts and shows, whichever engine runs the stages: the
summary, the progress bar and one line per failed item, or per item kept despite problems."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path


from vlpcache.cache.manifest import open_shard
from vlpcache.cache.schema import SHARD_DIR, SHARD_SUFFIX
from vlpcache.report import human_size, printable, progress_bar, say


@dataclass
class ExtractSummary:
    done: int = 0
    skipped_cached: int = 0
    skipped_failed: int = 0
    failed: int = 0
    damaged: int = 0  # written, with a note of what went wrong (frames unreadable, data truncated)
    passed_over: int = 0  # paths discovery skipped, each said in a line (a broken link, a taken id...)
    other_shards: int = 0  # items under the roots that --shard i/n leaves to the other shards
    frames: int = 0
    seconds: float = 0.0
    detect_seconds: float = 0.0
    wait_seconds: float = 0.0
    load_seconds: float = 0.0  # from the start until the detector was ready (torch import, model loading)

    @property
    def ok(self) -> bool:
        """False only when items failed, now or in a run before (the same command again), and none of the
        roots' items is in the cache."""
        return self.done > 0 or self.skipped_cached > 0 or self.failed + self.skipped_failed == 0

    def line(self) -> str:
        rate = f"{self.done / self.seconds:.2f} items/s, {self.frames / self.seconds:.1f} frames/s" if self.seconds else "-"
        damaged = f"{self.damaged} kept with a note (inspect --failures lists them), " if self.damaged else ""
        passed_over = (f"{self.passed_over} path(s) passed over when looking for media (said above; inspect "
                       "--failures lists them), " if self.passed_over else "")
        # a job of an array given only its own folder with --shard i/n extracts 1/n of it: say what it left
        others = (f"{self.other_shards} left to the other --shard jobs (each takes its share of the items under the "
                  "same ROOTs), " if self.other_shards else "")
        counts = (f"extract: {self.done} done, {self.skipped_cached} already cached, {self.skipped_failed} skipped "
                  f"(failed before; --retry-failed retries), {self.failed} failed, {damaged}{passed_over}{others}")
        if not (self.done or self.failed or self.load_seconds):  # nothing to decode: no detector was loaded
            return f"{counts}{self.seconds:.1f} s; nothing left to extract"
        loaded = self.seconds - self.load_seconds  # the bar's clock: its rate counts from the detector's load
        after = f" ({self.frames / loaded:.1f} frames/s from then, as the bar counts)" if self.frames and loaded > 0 else ""
        return (
            f"{counts}{self.seconds:.1f} s, {rate}; detector loaded after {self.load_seconds:.1f} s{after}, "
            f"busy {self.detect_seconds:.1f} s, "
            f"waited {self.wait_seconds:.1f} s for decoded frames"
        )


class RoomCheck:
    """Whether the items still to extract fit in the cache's free space, judged once from the shards this
    run has committed: a large collection can need hundreds of GB, and its full disk would otherwise come
    hours into the run. It looks after 1, 2, 4, 8, ... items, until it finds a shard of this run's."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.since = time.time() - 1.0  # shards modified since are this run's (a second for coarse mtimes)
        self.checked = False

    def __call__(self, items_done: int, items_left: int) -> str | None:
        """One line when the rest will not fit, else None."""
        if self.checked or items_done < 1 or items_done & (items_done - 1):
            return None
        sizes, items = 0, 0
        for shard in (self.cache_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}"):
            try:
                if shard.stat().st_mtime >= self.since:
                    with open_shard(shard) as f:
                        items += len(f["ids"])
                    sizes += shard.stat().st_size
            except (OSError, KeyError):  # a shard being replaced or unreadable: the next look
                continue
        if not items:
            return None
        self.checked = True
        need, free = sizes / items * items_left, shutil.disk_usage(self.cache_dir).free
        if need <= free:
            return None
        return (f"{printable(str(self.cache_dir))}: the {items_left} items still to extract need about {human_size(need)} "
                f"({human_size(sizes / items)} an item in this run's shards), and {human_size(free)} is free there: make "
                "room, or extract stops at the first write that does not fit (committed shards are kept, and a re-run "
                "goes on)")


BAR_TICK_S = 1.0  # a bar not redrawn for this long is redrawn: its clock moves while one long item holds it


class ExtractProgress:
    """The progress bar over `total` items, advanced item by item on the driver; a context manager."""

    def __init__(self, summary: ExtractSummary, total: int, description: str, detector: str, started: float,
                 quiet: bool, cache_dir: Path):
        self.summary, self.description, self.started, self.quiet = summary, description, started, quiet
        self.bar = progress_bar(total=total, unit="item", disable=quiet, desc=f"{description} (loading {detector})")
        self.room = RoomCheck(cache_dir)
        self.closed = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="vlpcache-bar-tick", daemon=True)
        if not self.bar.disable:
            self.ticker.start()

    def _tick(self) -> None:
        """tqdm redraws only when the count moves: an hour of video decoded from one keyframe, or a file
        that runs into --decode-timeout, showed `0/1 [00:00<?` for minutes, as if the command hung."""
        while not self.closed.wait(BAR_TICK_S):
            if time.time() - self.bar.last_print_t >= BAR_TICK_S:
                self.bar.refresh()

    def ready(self, since: float | None = None) -> None:
        """The detector is loaded (at wall-clock time `since`, when that was earlier): rates and the
        ETA count from then."""
        self.summary.load_seconds = time.monotonic() - self.started
        self.bar.set_description(self.description)
        self.bar.reset()
        if since is not None and not self.bar.disable:
            self.bar.start_t = min(self.bar.start_t, since)  # tqdm's clock is time.time

    def advance(self, path: str, frames: int, error: str | None, note: str = "") -> None:
        """One item written (its frames; `note`: what went wrong with it) or recorded as failed (error)."""
        summary = self.summary
        if error is not None:
            summary.failed += 1
            if not self.quiet:
                say(f"{printable(path)}: {error}")
        else:
            summary.done += 1
            summary.frames += frames
            if note:
                summary.damaged += 1
                if not self.quiet:
                    say(f"{printable(path)}: {note}; kept with {frames} frame{'s' if frames != 1 else ''}")
        self.bar.update(1)
        advanced = summary.done + summary.failed  # this run's items so far (bar.n stands still under --quiet)
        if short_of_room := self.room(advanced, self.bar.total - advanced):
            say(short_of_room)  # --quiet too: this one will not be in the summary
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{summary.frames / elapsed:.1f} frames/s, {summary.failed} failed", refresh=False)

    def __enter__(self) -> "ExtractProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.closed.set()
        if self.ticker.is_alive():
            self.ticker.join()
        self.bar.close()
