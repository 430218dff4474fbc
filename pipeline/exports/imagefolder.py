"""A Hugging Face `imagefolder`: the committed ok rows' images beside one `metadata.jsonl`, a column per mode.

    DIR/metadata.jsonl   {"file_name": "cat/a.jpg", "tags": "...", "description": "..."} per image
    DIR/cat/a.jpg        the input's image bytes, copied (or with `link`, hard-linked) unchanged

`datasets.load_dataset("imagefolder", data_dir=DIR, split="train")` loads every image with its captions.
`file_name` is relative to the root, where the one metadata file lies; names come from keys, kept inside
the folder, unique and safe from the loader's split inference (names.py). Error rows have no caption and
are skipped (counted); a row whose image cannot be read again from the input is skipped and counted too.

Never a surprise: the folder is built under a hidden temporary name beside DIR and renamed into place at
the end (pipeline.io.fs's `atomic_folder`), so DIR is either untouched (a failed or interrupted export
leaves it as it was) or the whole export. A non-empty DIR is refused unless `overwrite`, and even then only
an earlier imagefolder (a `metadata.jsonl` at its root) is replaced (moved aside, the new one renamed in,
the old one deleted), never a folder of other files, nor one holding the run's input or output; a DIR
inside the input is refused too.

Streamed: one record batch of a shard at a time (for a tar or Parquet shard, its wanted keys and lines while
its file is read again), and a bounded window of copies in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from pipeline.exports.names import Namer, image_extension, relative_segments
from pipeline.exports.sources import (
    InputAccess,
    LinkError,
    archive_records,
    copy_file,
    input_access,
    write_file,
)
from pipeline.exports.table import Output, check_modes, open_output, shard_batches
from pipeline.exports.targets import TargetError
from pipeline.io.fs import atomic_folder, is_local, open_fs

log = logging.getLogger("pipeline.exports.imagefolder")
METADATA = "metadata.jsonl"
WRITERS = 8  # images copied at once (object stores are latency-bound)
WARNINGS_SHOWN = 20  # per kind and export: a hostile input must not flood the log


@dataclass
class ImagefolderCounts:
    """What an export did, row by row."""

    written: int = 0
    skipped_errors: int = 0  # error rows: no caption
    refused: int = 0  # the key leaves no usable file name
    missing: int = 0  # the image could not be read again from the input (moved, deleted, changed)
    renamed: int = 0  # written under another name than the key's, to stay unique and loadable


@dataclass(frozen=True)
class _Item:
    key: str
    relative: str  # under the export root, `/`-separated
    line: str  # its metadata.jsonl line
    renamed: bool  # the name is not the key's (plus the image's extension)


def check_columns(modes: list[str]) -> None:
    """Refuse modes the loader would read as something else than text (its image column, file names)."""
    clashing = [m for m in modes if m in ("image", "file_name", "file_names") or m.endswith(("_file_name",
                                                                                              "_file_names"))]
    if clashing:
        raise ValueError(f"modes {clashing} cannot be imagefolder columns: Hugging Face reads `image`, `file_name` "
                         "and `*_file_name` columns as images; export the other modes with --modes")


def _local_folder(uri: str, options: dict[str, Any] | None) -> str | None:
    fs, path = open_fs(uri, options)
    return os.path.realpath(path) if is_local(fs) else None


def _check_overlap(target_dir: str, path: str, output: Output, access: InputAccess) -> None:
    """Never replace the run's input or output, nor write into the input (a later run would caption the copies)."""
    input_folder = _local_folder(access.config.uri, access.config.storage_options)
    for folder in (input_folder, _local_folder(output.uri, None)):
        if folder is not None and (folder == path or folder.startswith(path.rstrip("/") + "/")):
            raise TargetError(f"--to {target_dir} holds the run's input or output ({folder}); choose another folder")
    if input_folder is not None and path.startswith(input_folder.rstrip("/") + "/"):
        raise TargetError(f"--to {target_dir} lies inside the run's input ({input_folder}), where a later run "
                          "would take the copies for new images; choose a folder outside it")


def _empty(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def check_target(target_dir: str, overwrite: bool, output: Output, access: InputAccess) -> str:
    """The real local path the export will occupy; TargetError for anything it must not replace."""
    fs, path = open_fs(target_dir)
    if not is_local(fs):
        raise TargetError(f"--to {target_dir}: imagefolder export writes a local folder (write it here, then upload)")
    path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise TargetError(f"--to {target_dir} is a file; imagefolder export writes a folder")
    _check_overlap(target_dir, path, output, access)
    if os.path.isdir(path) and not _empty(path):
        if not overwrite:
            raise TargetError(f"{target_dir} is not empty; choose an empty or new folder, or pass --overwrite to "
                              "replace an earlier imagefolder export there")
        if not os.path.isfile(os.path.join(path, METADATA)):
            raise TargetError(f"{target_dir} is not empty and holds no {METADATA}, so it is not an earlier "
                              "imagefolder export; --overwrite replaces only those: choose an empty or new folder")
    return path


class _Warn:
    """Logs the first few rows of each kind of trouble."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, kind: str, key: str, reason: str) -> None:
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if self.seen[kind] <= WARNINGS_SHOWN:
            log.warning("%s %r: %s", kind, key, reason)
        elif self.seen[kind] == WARNINGS_SHOWN + 1:
            log.warning("more rows %s; the count is in the export result", kind)


class _Builder:
    """Fills a fresh folder with images and their metadata lines, in shard and key order."""

    def __init__(self, output: Output, modes: list[str], root: str, access: InputAccess) -> None:
        self.output, self.modes, self.root, self.access = output, modes, root, access
        self.namer, self.counts, self.warn = Namer(root), ImagefolderCounts(), _Warn()
        self.window: list[tuple[_Item, Future[None]]] = []
        self.metadata: TextIO | None = None  # metadata.jsonl, open while building

    def _item(self, row: dict[str, Any]) -> _Item | None:
        segments = relative_segments(row["key"], image_extension(row))
        if segments is None:
            self.counts.refused += 1
            self.warn("refused", row["key"], "the key has no usable path segment")
            return None
        relative = self.namer.reserve(segments)
        extension = posixpath.splitext(segments[-1])[1]
        plain = row["key"] if row["key"].lower().endswith(extension.lower()) else row["key"] + extension
        line = json.dumps({"file_name": relative, **{mode: row.get(mode) for mode in self.modes}}, ensure_ascii=False)
        return _Item(row["key"], relative, line + "\n", relative != plain)

    def _submit(self, pool: ThreadPoolExecutor, item: _Item, work: Callable[..., None], *args: Any) -> None:
        self.window.append((item, pool.submit(work, *args, os.path.join(self.root, item.relative))))
        if len(self.window) >= 4 * WRITERS:
            self._drain()

    def _drain(self) -> None:
        for item, future in self.window:
            try:
                future.result()
            except LinkError:
                raise
            except (OSError, ValueError) as err:  # gone, unreadable, or a path no file system takes (NUL)
                self._missing(item, f"{type(err).__name__}: {err}")
            else:
                assert self.metadata is not None
                self.metadata.write(item.line)
                self.counts.written += 1
                self.counts.renamed += item.renamed
        self.window.clear()

    def _missing(self, item: _Item, reason: str) -> None:
        self.counts.missing += 1
        self.warn("missing", item.key, f"image not read again from the input ({reason}); skipped")
        with contextlib.suppress(FileNotFoundError):  # its reserved name (a failed link removed it already)
            os.remove(os.path.join(self.root, item.relative))

    def _shard(self, pool: ThreadPoolExecutor, shard: str) -> None:
        archived: dict[str, _Item] = {}  # key -> item, for images inside the shard's tar or Parquet file
        columns = ["key", "source", "member", "status", "format", *self.modes]
        for batch in shard_batches(self.output, shard, columns):
            for row in batch.to_pylist():
                if row["status"] != "ok":
                    self.counts.skipped_errors += 1
                    continue
                item = self._item(row)
                if item is None:
                    continue
                if row["member"] is not None:
                    archived[row["key"]] = item
                elif row["source"]:
                    self._submit(pool, item, _copy, row["source"], self.access)
                else:
                    self._missing(item, "no source recorded")
        if archived:
            self._from_archive(pool, shard, archived)

    def _from_archive(self, pool: ThreadPoolExecutor, shard: str, archived: dict[str, _Item]) -> None:
        try:
            records = archive_records(self.output, shard, self.access)
        except FileNotFoundError as err:  # the shard's plan is gone: the other shards can still be exported
            for item in archived.values():
                self._missing(item, str(err))
            return
        for record in records:
            item = archived.pop(record.key, None)
            if item is not None and record.data is not None:
                self._submit(pool, item, _write, record.data)
            elif item is not None:
                self._missing(item, record.error or "no image bytes")
        for item in archived.values():
            self._missing(item, "the input no longer holds this key")

    def build(self) -> ImagefolderCounts:
        with open(os.path.join(self.root, METADATA), "w", encoding="utf-8") as metadata, \
                ThreadPoolExecutor(WRITERS) as pool:
            self.metadata = metadata
            for shard in self.output.shards:
                self._shard(pool, shard)
            self._drain()
        return self.counts


def _copy(source: str, access: InputAccess, destination: str) -> None:
    copy_file(source, destination, access)


def _write(data: bytes, destination: str) -> None:
    write_file(destination, data)


def export_imagefolder(output_uri: str, target_dir: str, modes: list[str] | None = None,
                       storage_options: dict[str, Any] | None = None, *,
                       input_storage_options: dict[str, Any] | None = None, link: bool = False,
                       overwrite: bool = False) -> ImagefolderCounts:
    """Write the imagefolder of every committed ok row to the local folder `target_dir` and count what
    happened. Images are read with `input_storage_options` (else the manifest's, else the output's)."""
    output = open_output(output_uri, storage_options)
    modes = check_modes(output, modes)
    check_columns(modes)
    access = input_access(output, input_storage_options, storage_options, link)
    path = check_target(target_dir, overwrite, output, access)
    with atomic_folder(path) as staging:  # built beside `path`, renamed in whole at the end
        return _Builder(output, modes, staging, access).build()


def describe_counts(counts: ImagefolderCounts, target_dir: str) -> str:
    done = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in vars(counts).items())
    return f"{done} in {target_dir}\nload it with datasets.load_dataset(\"imagefolder\", data_dir={target_dir!r})"
