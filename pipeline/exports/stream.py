"""A committed shard's rows, one at a time, each with its image bytes read again from the input (or none).

The exports that carry images (consolidated Parquet, WebDataset tars) take rows one by one from here. Each row
of a shard gets a position, the same on every pass over the same committed shard, so an interrupted export can
start again right after the last row it finished (`skip`) without reading the images before it:

- rows whose image is a file (folder and file-list inputs) and error rows come first, in the part file's
  order (key order); a bounded window of file reads runs ahead of the consumer (object stores are
  latency-bound);
- rows whose image sits inside a WebDataset tar or a Parquet file come next, in the order the run's own
  reader gives their records (sources.archive_records: a tar in one pass, Parquet row group by row group),
  so one image is in memory at a time instead of a shard's worth;
- rows of such a container that the input no longer holds come last, in key order.

Without images (`access` None) a shard's rows come in the part file's order. Images are bytes as they came:
an image that cannot be read again is reported as `missing`, never replaced.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.exports.sources import InputAccess, archive_records
from pipeline.exports.table import Output, shard_batches
from pipeline.io.fs import open_fs, read_input

log = logging.getLogger("pipeline.exports.stream")
READERS = 8  # file reads in flight
WINDOW = 2 * READERS  # rows read ahead of the consumer at most (their images are in memory)


@dataclass(frozen=True)
class Item:
    """One row of a shard at `position` (0, 1, ...): exported when `problem` is None."""

    position: int
    row: dict[str, Any]
    data: bytes | None = None  # the image's bytes (exports with images)
    problem: str | None = None  # "error" (an error row), "missing" (its image could not be read again)
    reason: str = ""  # why it is missing


def _file_bytes(source: str, access: InputAccess) -> bytes:
    fs, path = open_fs(source, access.config.storage_options)
    return read_input(fs, path)


def _resolve(pending: Item | tuple[int, dict[str, Any], Future[bytes]]) -> Item:
    if isinstance(pending, Item):
        return pending
    position, row, future = pending
    try:
        return Item(position, row, future.result())
    except (OSError, ValueError) as err:  # gone, unreadable, or a path no file system takes (NUL)
        return Item(position, row, problem="missing", reason=f"{type(err).__name__}: {err}")


def _rows(output: Output, shard: str, columns: list[str] | None) -> Iterator[dict[str, Any]]:
    for batch in shard_batches(output, shard, columns):
        yield from batch.to_pylist()


def shard_items(output: Output, shard: str, columns: list[str] | None, access: InputAccess | None,
                skip: int = 0) -> Iterator[Item]:
    """The shard's items from position `skip` on (see the module doc for their order). `columns` must include
    `key`, `status`, and with `access` also `source` and `member`."""
    if access is None:
        for position, row in enumerate(_rows(output, shard, columns)):
            if position >= skip:
                yield Item(position, row, problem=None if row["status"] == "ok" else "error")
        return
    archived: dict[str, dict[str, Any]] = {}  # key -> row, images inside a container (no bytes held)
    position = 0
    with ThreadPoolExecutor(READERS) as pool:
        window: deque[Item | tuple[int, dict[str, Any], Future[bytes]]] = deque()
        for row in _rows(output, shard, columns):
            if row["status"] == "ok" and row.get("member") is not None:
                archived[row["key"]] = row
                continue
            if position >= skip:
                if row["status"] != "ok":
                    window.append(Item(position, row, problem="error"))
                elif row.get("source"):
                    window.append((position, row, pool.submit(_file_bytes, row["source"], access)))
                else:
                    window.append(Item(position, row, problem="missing", reason="no source recorded"))
            position += 1
            while len(window) > WINDOW or (window and isinstance(window[0], Item)):
                yield _resolve(window.popleft())
        while window:
            yield _resolve(window.popleft())
    if archived:
        yield from _archived(output, shard, access, archived, position, skip)


def _archived(output: Output, shard: str, access: InputAccess, archived: dict[str, dict[str, Any]],
              position: int, skip: int) -> Iterator[Item]:
    try:
        records = archive_records(output, shard, access)
    except FileNotFoundError as err:  # the shard's plan is gone: its rows are missing, the others still go
        records, reason = iter(()), str(err)
    else:
        reason = "the input no longer holds this key"
    for record in records:
        row = archived.pop(record.key, None)
        if row is None:
            continue
        if position >= skip:
            if record.data is not None:
                yield Item(position, row, record.data)
            else:
                yield Item(position, row, problem="missing", reason=record.error or "no image bytes")
        position += 1
    for key in sorted(archived):
        if position >= skip:
            yield Item(position, archived[key], problem="missing", reason=reason)
        position += 1


class Warnings:
    """Logs the first few rows of each kind of trouble (a hostile or vanished input must not flood the log)."""

    SHOWN = 20

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.seen: dict[str, int] = {}

    def __call__(self, kind: str, key: str, reason: str) -> None:
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if self.seen[kind] <= self.SHOWN:
            self.log.warning("%s %r: %s", kind, key, reason)
        elif self.seen[kind] == self.SHOWN + 1:
            self.log.warning("more rows %s; the count is in the export result", kind)

