"""Run the detector over decoded items in frame batches and pack each item into cache arrays."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from vlpcache.cache.schema import VALUE_BOUNDS, CacheSettings, empty_item, not_finite, out_of_range
from vlpcache.cache.writer import ShardWriter
from vlpcache.extract.reader import IDLE, DecodedItem
from vlpcache.extract.detectors.regions import Detector, pack_frame_regions


@dataclass
class RegionItem:
    decoded: DecodedItem
    arrays: dict[str, np.ndarray] | None  # schema.ARRAYS for one video; None when it failed
    error: str | None = None

    def __post_init__(self):
        if self.arrays is not None and (name := not_finite(self.arrays)):  # never cached: a reader takes it for damage
            self.arrays, self.error = None, f"the detector gave values that are not numbers (NaN or infinity) for its {name}"
        elif self.arrays is not None and (beyond := out_of_range(self.arrays, VALUE_BOUNDS)):  # so too
            self.arrays, self.error = None, f"the detector gave values out of their range: {beyond.removeprefix('its ')}"

    @property
    def note(self) -> str:
        """What went wrong with an item kept anyway (decoding's notes), "" for most."""
        sampled = self.decoded.sampled
        return "; ".join(sampled.notes) if sampled is not None and self.arrays is not None else ""

    def write(self, writer: ShardWriter) -> int:
        """Into the writer's shard with its note, or (when it failed) its failure log; returns the
        item's frame count."""
        item = self.decoded.item
        if self.arrays is None:
            writer.record_failure(item.id, str(item.path), self.error, source=self.decoded.source)
            return 0
        writer.add(item.id, str(item.path), item.kind, self.arrays, note=self.note, source=self.decoded.source,
                   replaces=item.replaces)
        return int(self.arrays["frame_mask"].sum())


class RegionMapper:
    """Batches frames across items so the detector always sees `batch_size` frames or more."""

    def __init__(self, detector: Detector, settings: CacheSettings, batch_size: int):
        self.detector = detector
        self.settings = settings
        self.batch_size = batch_size
        self.wait_seconds = 0.0  # time the detector stood idle waiting for decoded frames
        self.detect_seconds = 0.0

    def __call__(self, decoded: Iterable[DecodedItem]) -> Iterator[RegionItem]:
        """The items' regions, in batches; where `decoded` yields IDLE (its decoding stalls), the frames held are
        detected at once, and IDLE passed on (the writer commits what is due)."""
        batch: list[DecodedItem] = []
        frames = 0
        decoded = iter(decoded)
        while True:
            waiting = time.perf_counter()
            item = next(decoded, None)
            self.wait_seconds += time.perf_counter() - waiting
            if item is None:
                break
            if item is IDLE:
                if batch:
                    yield from self._detect(batch)
                batch, frames = [], 0
                yield IDLE
                continue
            if item.sampled is None:
                yield RegionItem(item, None, item.error)
                continue
            batch.append(item)
            frames += len(item.sampled.frames)
            if frames >= self.batch_size:
                yield from self._detect(batch)
                batch, frames = [], 0
        if batch:
            yield from self._detect(batch)

    def _detect(self, batch: list[DecodedItem]) -> Iterator[RegionItem]:
        try:
            regions = self._regions([f for item in batch for f in item.sampled.frames])
        except Exception as err:  # an odd frame the detector cannot take: not the whole run's end
            if len(batch) == 1:
                raise
            yield from self._each_alone(batch, err)
            return
        start = 0
        for item in batch:
            count = len(item.sampled.frames)
            yield RegionItem(item, self._pack(item, regions[start : start + count]))
            start += count

    def _regions(self, frames: list[np.ndarray]) -> list:
        started = time.perf_counter()
        try:
            return self.detector.detect(frames, max_detections=self.settings.regions - 1)
        finally:
            self.detect_seconds += time.perf_counter() - started

    def _each_alone(self, batch: list[DecodedItem], err: Exception) -> list[RegionItem]:
        """After the detection of a batch raised: each item's frames alone. One that raises again fails with one
        line (the run goes on); where every one does, the trouble is the detector's (out of memory, a broken
        install), not an item's: the batch's error is raised."""
        results = []
        for item in batch:
            try:
                results.append(RegionItem(item, self._pack(item, self._regions(item.sampled.frames))))
            except Exception as own:
                results.append(RegionItem(item, None, f"the detector failed on its frames ({type(own).__name__}: "
                                                      f"{' '.join(str(own).split())[:200]})"))
        if all(result.arrays is None for result in results):
            raise err
        return results

    def _pack(self, item: DecodedItem, frame_regions) -> dict[str, np.ndarray]:
        arrays = empty_item(self.settings)
        sampled = item.sampled
        for t, regions in enumerate(frame_regions[: self.settings.frames]):
            packed = pack_frame_regions(regions, self.settings.regions)
            for name, value in packed.items():
                arrays[name][t] = value
            arrays["frame_mask"][t] = True
            arrays["timestamps"][t] = sampled.timestamps[t]
        arrays["frame_size"][:] = sampled.size
        arrays["duration"][...] = sampled.duration
        return arrays
