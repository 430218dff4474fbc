"""How `pipeline plan` lists and reads an input: `run`'s own planner and read code, with counters beside it.

    survey            plan_shards (pipeline.io.sharding), streamed: counted (Listed), bytes seen on the way
                      (ListingSizes), units offered to the sample (Smallest); then the sample is read
    read_tally        read_shard + prepare_image exactly as the read stage calls them (pipeline.run.stages), so
                      a broken file gets the reason its row would get; the counts go into a Tally

The sample is the units of smallest hash (pipeline.run.planning.unit_hash): spread evenly over the input, the
same on every call, and held in memory bounded by its size while the listing streams past. Folder and
file-list inputs are sampled image by image (read in listing order); tar and Parquet inputs by whole shards
(a tar cannot be read in part), in hash order, a wave at a time, until the sample is full. `--sample all`
reads every shard while the listing goes on, through the planner's bounded thread pool.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

from pipeline.captioning.images import IMAGE_EXTENSIONS, prepare_image
from pipeline.config import InputConfig, RunConfig
from pipeline.io import walk
from pipeline.io.content import content_hash
from pipeline.io.fs import open_fs, retrying
from pipeline.io.listing import relative_path
from pipeline.io.sharding import map_in_order  # the planner's own bounded, ordered thread pool
from pipeline.io.shards import Shard, extension
from pipeline.io.sources import plan_shards, read_shard
from pipeline.run.estimate import Tally
from pipeline.run.planning import unit_hash

READ_WORKERS = 16  # files read and prepared at once (storage latency; Pillow decodes and resizes without the GIL)
PROGRESS_EVERY_S = 10.0
PLANNED_FILES = {"folder": IMAGE_EXTENSIONS, "webdataset": frozenset({".tar"}), "parquet": frozenset({".parquet"})}


# ------------------------------------------------------------------------------------------- the listing
@dataclass
class Listed:
    """What the listing found, counted as shards stream past (no key is kept)."""

    shards: int = 0
    images: int = 0  # known before reading: folder and file-list members, Parquet rows from footers
    unsized: int = 0  # shards whose image count is known only once read (tars)
    extensions: Counter[str] = field(default_factory=Counter)  # of members, or of container files
    _container: str | None = None

    def add(self, shard: Shard) -> None:
        self.shards += 1
        if shard.kind == "files":
            self.images += len(shard.members)
            self.extensions.update(extension(member) for member in shard.members)
            return
        if shard.size is None:
            self.unsized += 1
        else:
            self.images += shard.size
        if shard.uri != self._container:  # a Parquet file cut into several shards counts once
            self._container = shard.uri
            self.extensions[extension(shard.uri)] += 1


class ListingSizes(AbstractContextManager["ListingSizes"]):
    """The bytes of the files the plan covers, seen on their way through the listing's walk.

    Every walk (`pipeline.io.walk.walk_files`) returns each file's size with its path, so watching it
    (`walk.observing`) costs no request of its own, on S3 as locally. Layout detection walks the start of a
    folder before planning walks all of it: the walk that counts is the last one started. The files counted
    are the ones planning keeps: images (folders), `.tar` or `.parquet` files, with `input.glob` applied.
    Every walk of the process is seen while inside: for a process that plans and nothing else at the same
    time (the `plan` command)."""

    def __init__(self, config: InputConfig, layout_format: str) -> None:
        self.config = config
        self.wanted = PLANNED_FILES.get(layout_format, frozenset())
        self.walks: list[list[int]] = []  # [files, bytes] of each walk, in the order they started
        self._watch = ExitStack()

    def __enter__(self) -> ListingSizes:
        self._watch.enter_context(walk.observing(self))
        return self

    def __exit__(self, *_exc: object) -> None:
        self._watch.close()

    def started(self, root: str) -> Callable[[str, int], None]:
        counts = [0, 0]
        self.walks.append(counts)
        glob = self.config.glob

        def file_seen(path: str, size: int) -> None:
            relative = relative_path(path, root)
            if extension(relative) in self.wanted and (glob is None or fnmatch.fnmatch(relative, glob)):
                counts[0] += 1
                counts[1] += size

        return file_seen

    def total(self) -> int | None:
        """Bytes of the planned files; None when nothing was walked (a file list, or input.uri a file)."""
        return self.walks[-1][1] if self.walks else None


def single_file_bytes(config: InputConfig) -> int | None:
    """The size of input.uri when it is one file (no walk lists it): one request."""
    fs, path = open_fs(config.uri, config.storage_options)
    info = retrying(fs.info, path, what=config.uri)
    return int(info.get("size") or 0) if info.get("type") == "file" else None


class Ticker:
    """A line on stderr every PROGRESS_EVERY_S seconds while a long listing or read goes on."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.started = self.said = time.monotonic()

    def tick(self, what: str) -> None:
        now = time.monotonic()
        if not self.quiet and now - self.said >= PROGRESS_EVERY_S:
            self.said = now
            print(f"plan: {what} ({now - self.started:.0f} s)", file=sys.stderr, flush=True)


def counted(shards: Iterator[Shard], listed: Listed, ticker: Ticker) -> Iterator[Shard]:
    for shard in shards:
        listed.add(shard)
        ticker.tick(f"listed {listed.images:,} images in {listed.shards:,} shards")
        yield shard


# -------------------------------------------------------------------------------------------- the sample
class Smallest:
    """The `size` units of smallest hash seen so far, with their listing order: a deterministic sample
    spread evenly across the input, in memory bounded by `size` however long the listing is."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.heap: list[tuple[int, int, Shard]] = []  # (-hash, listing order, unit): the largest hash on top
        self.seen = 0

    def takes(self, value: int) -> bool:
        return len(self.heap) < self.size or value < -self.heap[0][0]

    def offer(self, value: int, unit: Shard) -> None:
        self.seen += 1
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, (-value, self.seen, unit))
        elif value < -self.heap[0][0]:
            heapq.heapreplace(self.heap, (-value, self.seen, unit))

    def skip(self) -> None:
        """A unit seen and left out unbuilt (`takes` said no)."""
        self.seen += 1

    @property
    def whole(self) -> bool:
        """Whether every unit seen is in the sample."""
        return self.seen == len(self.heap)

    def by_hash(self) -> list[Shard]:
        return [unit for _value, _order, unit in sorted(self.heap, key=lambda item: -item[0])]

    def in_listing_order(self) -> list[Shard]:
        return [unit for _value, _order, unit in sorted(self.heap, key=lambda item: item[1])]


def offer_units(sample: Smallest, shard: Shard) -> None:
    """A folder or file-list shard's members one by one (as one-member shards), a container shard whole."""
    if shard.kind != "files":
        sample.offer(unit_hash(f"{shard.uri}#{shard.first_row}"), shard)
        return
    sidecars = shard.sidecars or [[] for _member in shard.members]
    for member, found in zip(shard.members, sidecars, strict=True):
        value = unit_hash(member)
        if sample.takes(value):
            sample.offer(value, Shard(shard.id, "files", shard.uri, [member], 1,
                                      sidecars=[found] if shard.sidecars else None))
        else:  # the common case on a long listing: no Shard is built for a unit that cannot get in
            sample.skip()


# ------------------------------------------------------------------------------------------------ reading
def read_tally(shard: Shard, config: RunConfig) -> Tally:
    """Read and prepare every record of `shard` as the read stage does (pipeline.run.stages), counted."""
    tally = Tally()
    _size, records = read_shard(shard, config.input)
    for record in records:
        if record.error is not None:
            tally.add(record.key, record.source, record.error)
            continue
        prepared = prepare_image(record.data, record.member or record.key, config.input.max_pixels)
        tally.add(record.key, record.source, prepared.error, prepared.format, prepared.width, prepared.height,
                  len(record.data or b""))
        if prepared.error is None:  # the read stage's dedup key: duplicates are captioned once (engine/dedup.py)
            tally.add_content(content_hash(record.data, record.meta))
    if tally.rows == 0:  # the read stage's row for a shard that yielded nothing (pipeline.run.stages._rows_of)
        tally.add(shard.id, shard.uri, "no images in this shard")
    return tally


def read_everything(shards: Iterator[Shard], config: RunConfig, ticker: Ticker) -> Tally:
    """Every shard read while the listing goes on, READ_WORKERS at a time, at most twice that many held."""
    tally = Tally()
    for _shard, part in map_in_order(lambda shard: read_tally(shard, config), shards, READ_WORKERS):
        tally.merge(part)
        ticker.tick(f"read {tally.rows:,} images, {tally.broken:,} broken")
    return tally


@dataclass
class SampleRead:
    tally: Tally = field(default_factory=Tally)
    whole: bool = False  # the sample held every unit of the input, and all of it was read
    unsized_read: int = 0  # tars read (their image count was not known before)
    unsized_rows: int = 0  # rows those tars gave


def read_sample(sample: Smallest, config: RunConfig, wanted: int) -> SampleRead:
    """Read the sample: images in listing order, or container shards in hash order until `wanted` images."""
    units = sample.in_listing_order()
    if units and units[0].kind != "files":
        return read_containers(sample.by_hash(), config, wanted, sample.whole)
    result = SampleRead(whole=sample.whole)
    with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="plan-read") as pool:
        for part in pool.map(lambda unit: read_tally(unit, config), units):
            result.tally.merge(part)
    return result


def wave_size(units: list[Shard], start: int, wanted: int, rows_per_shard: float | None) -> int:
    """How many of the next containers (in hash order) should fill the sample: by their known sizes, by
    the mean of those read so far, or one to find that out; at most READ_WORKERS."""
    if units[start].size is not None:
        total, count = 0, 0
        for unit in units[start:start + READ_WORKERS]:
            if total >= wanted or unit.size is None:
                break
            total, count = total + unit.size, count + 1
        return max(1, count)
    if not rows_per_shard:
        return 1
    return max(1, min(READ_WORKERS, math.ceil(wanted / rows_per_shard)))


def read_containers(units: list[Shard], config: RunConfig, wanted: int, all_offered: bool) -> SampleRead:
    """Whole shards in hash order, a wave at a time, until `wanted` images are read: deterministic (the
    waves depend only on the input), and never a wave more than the sample needs."""
    result, start = SampleRead(), 0
    with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="plan-read") as pool:
        while start < len(units) and result.tally.rows < wanted:
            rows_per_shard = result.tally.rows / start if start else None
            wave = units[start:start + wave_size(units, start, wanted - result.tally.rows, rows_per_shard)]
            start += len(wave)
            for unit, part in zip(wave, pool.map(lambda unit: read_tally(unit, config), wave), strict=True):
                result.tally.merge(part)
                if unit.size is None:
                    result.unsized_read, result.unsized_rows = result.unsized_read + 1, result.unsized_rows + part.rows
    result.whole = all_offered and start == len(units)
    return result


# ------------------------------------------------------------------------------------------------ survey
@dataclass
class Survey:
    """What `plan` found: the listing, what was read of it, and how long each took."""

    listed: Listed
    sample: int | None  # images wanted in the sample; None: --sample all
    read: SampleRead
    listed_bytes: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def survey(config: RunConfig, layout_format: str, sample: int | None, ticker: Ticker) -> Survey:
    """List the input as `run` plans it, and read all of it (`sample` None) or a sample of it."""
    started = time.monotonic()
    listed, picks, read = Listed(), Smallest(sample or 0), SampleRead()
    with ListingSizes(config.input, layout_format) as sizes:
        shards = counted(plan_shards(config.input), listed, ticker)
        if sample is None:
            read = SampleRead(read_everything(shards, config, ticker), whole=True)
        else:
            for shard in shards:
                if sample:
                    offer_units(picks, shard)
    listed_bytes = sizes.total()
    if listed_bytes is None and layout_format in ("webdataset", "parquet"):
        listed_bytes = single_file_bytes(config.input)
    listing_s = time.monotonic() - started
    if sample:
        read = read_sample(picks, config, sample)
    reading_s = time.monotonic() - started - listing_s
    return Survey(listed, sample, read, listed_bytes, {"listing": round(listing_s, 2), "reading": round(reading_s, 2)})
