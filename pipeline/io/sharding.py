"""Listing an input and cutting it into shards, streamed (see pipeline.io.sources for the layouts).

Which layout an input has is decided first (pipeline.io.detect); a folder's listing then pairs each image
with the `.json`/`.txt` sidecars beside it (pipeline.io.listing), so reading asks only for those that exist.
"""

from __future__ import annotations

import io
import itertools
import logging
import posixpath
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import fsspec
import numpy as np

from pipeline.config import InputConfig
from pipeline.io.detect import detect_layout
from pipeline.io.fs import RetryingReader, is_local, open_fs
from pipeline.io.keys import resolve_list_entry
from pipeline.io.listing import files_under, images_with_sidecars, input_kind
from pipeline.io.parquet_source import footer_rows, row_group_ranges
from pipeline.io.shards import Shard

log = logging.getLogger("pipeline.io")
FOOTER_WORKERS = 16  # Parquet footers read at once while planning
T = TypeVar("T")
R = TypeVar("R")


# ------------------------------------------------------------------------------------------------ file lists
def _list_lines(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    # Bad UTF-8 spoils one line (which then names no file and becomes an error row), not the whole list.
    with RetryingReader(fs, path) as raw, io.TextIOWrapper(io.BufferedReader(raw), "utf-8", "replace") as text:
        for line in text:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _repeated_hashes(hashes: array) -> set[int]:
    values = np.sort(np.frombuffer(hashes, dtype=np.int64)) if len(hashes) else np.empty(0, np.int64)
    return set(np.unique(values[1:][values[1:] == values[:-1]]).tolist())


def filelist_entries(config: InputConfig) -> Iterator[str]:
    """The list's distinct entries as URIs, in list order (a repeated entry counts at its first place).

    Two passes in bounded memory: the first keeps an 8-byte hash per line and finds the hashes that
    repeat; the second keeps exact strings only for lines with such a hash."""
    fs, path, _ = input_kind(config)
    folder = posixpath.dirname(path)
    folder = folder if is_local(fs) else fs.unstrip_protocol(folder)

    def entries() -> Iterator[str]:
        return (resolve_list_entry(line, folder) for line in _list_lines(fs, path))

    repeated = _repeated_hashes(array("q", (hash(entry) for entry in entries())))
    seen: set[str] = set()
    dropped = 0
    for entry in entries():
        if hash(entry) in repeated:
            if entry in seen:
                dropped += 1
                continue
            seen.add(entry)
        yield entry
    if dropped:
        log.warning("%s: %d repeated lines dropped (each image is captioned once)", config.uri, dropped)


# ---------------------------------------------------------------------------------------------------- shards
def _kept(units: Iterable[str], skip: Callable[[str], bool] | None) -> Iterator[str]:
    return iter(units) if skip is None else (unit for unit in units if not skip(unit))


def map_in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the items' order, `workers` at a time, at most 2 x workers results held."""
    with ThreadPoolExecutor(workers, thread_name_prefix="plan") as pool:
        window: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 2 * workers:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()


def _chunked(members: Iterator[tuple[str, list[str]]], size: int, uri: str, ids: Iterator[int]) -> Iterator[Shard]:
    while chunk := list(itertools.islice(members, size)):
        sidecars = [found for _member, found in chunk]
        yield Shard(f"{next(ids):06d}", "files", uri, [member for member, _found in chunk], len(chunk),
                    sidecars=sidecars if any(sidecars) else None)


def _kept_pairs(pairs: Iterable[tuple[str, list[str]]],
                skip: Callable[[str], bool] | None) -> Iterator[tuple[str, list[str]]]:
    return iter(pairs) if skip is None else (pair for pair in pairs if not skip(pair[0]))


def _bare(units: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    return ((unit, []) for unit in units)


def _container_uri(config: InputConfig, relative: str) -> str:
    return config.uri if relative == "" else f"{config.uri.rstrip('/')}/{relative}"


def _parquet_shards(config: InputConfig, units: Iterator[str], ids: Iterator[int]) -> Iterator[Shard]:
    fs, root = open_fs(config.uri, config.storage_options)

    def footer(relative: str) -> list[int] | None:
        return footer_rows(fs, root if relative == "" else f"{root}/{relative}", config.image_column)

    for relative, rows in map_in_order(footer, units, FOOTER_WORKERS):
        for row_groups, first_row, size in row_group_ranges(rows, config.shard_size):
            yield Shard(f"{next(ids):06d}", "parquet", _container_uri(config, relative), [], size, relative,
                        row_groups, first_row)


def plan_shards(config: InputConfig, skip: Callable[[str], bool] | None = None,
                first_index: int = 0) -> Iterator[Shard]:
    """Stream the input's shards in a deterministic order.

    `skip(unit)` is called once for each unit the listing finds, in listing order; units it returns True
    for are left out. A unit is a member (folder and file-list inputs) or a container file's path relative
    to input.uri (tar and Parquet inputs; "" when input.uri is the file). Shard ids count from
    `first_index`."""
    layout = detect_layout(config).format
    ids = itertools.count(first_index)
    if layout == "folder":
        yield from _chunked(_kept_pairs(images_with_sidecars(config), skip), config.shard_size, config.uri, ids)
    elif layout == "filelist":
        yield from _chunked(_bare(_kept(filelist_entries(config), skip)), config.shard_size, "", ids)
    elif layout == "webdataset":
        for relative in _kept(files_under(config, frozenset({".tar"})), skip):
            yield Shard(f"{next(ids):06d}", "tar", _container_uri(config, relative), container=relative)
    else:
        yield from _parquet_shards(config, _kept(files_under(config, frozenset({".parquet"})), skip), ids)
