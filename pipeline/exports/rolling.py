"""Exports into files of a target size, streamed and resumable: the engine under the Parquet and WebDataset exports.

Rows go out in committed shard order (sorted shard ids; within a shard, stream.py's order) into the current
file; a file is finished once it reaches the target size, and the next row opens the next one. The format
(consolidated.py, webdataset.py) says how a row is written and how many bytes its file holds so far; this
module decides where files end:

- before a row goes in, if the file plus what it buffers plus the row would pass the target, the buffer is
  written out; if the file then holds at least 90% of the target, it is finished and the row opens the next.
  So every file but the last ends between 90% of the target and the target plus one row (plus a Parquet
  footer), whatever the rows' sizes as long as one row is small beside the target.
- one file is open at a time, holding one Parquet row group (or nothing: tar samples are written at once).

Files are written under a temporary name beside their own (targets.new_file) and renamed when finished. After
each finished file `_export_state.json` is replaced (atomically): the options, the finished files with the
shards each completed and where the last one stopped (shard and row position), and the running counts.
Re-running with the same options resumes after the last finished file: the file being written when the export
stopped is written again from its first row, and shards committed since (a run still writing) are added.
Other options are refused unless `overwrite`, which starts over; a non-empty folder that holds no such state
is never written into.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipeline.exports.sources import InputAccess
from pipeline.exports.stream import Item, Warnings, shard_items
from pipeline.exports.table import Output
from pipeline.exports.targets import TargetError, new_file, write_new
from pipeline.io.fs import is_local, open_fs

log = logging.getLogger("pipeline.exports.rolling")
STATE = "_export_state.json"
STATE_VERSION = 1
FULL = 0.9  # a file is finished early (before the target) only once it holds this share of it
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# The names of each format's files (HF's default split pattern for Parquet: `train-*` loads as split train).
PATTERNS = {"parquet": re.compile(r"train-[0-9]{5,}\.parquet"), "webdataset": re.compile(r"shard-[0-9]{6,}\.tar")}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """`256MB`, `1GB`, `500kB`, `2GiB` or a number of bytes (MB and GB are powers of ten, as Hugging Face's
    `max_shard_size` counts them; MiB and GiB powers of two); ValueError in words otherwise."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text).lower())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"--target-size {text!r} is not a size: give bytes or a number with kB, MB, GB "
                             "(or KiB, MiB, GiB), e.g. 256MB")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size < 1024:
        raise ValueError(f"--target-size {text!r} is below 1 kB; give e.g. 256MB")
    return size


class PartWriter(Protocol):
    """One file of an export while it is written (its temporary name)."""

    def add(self, item: Item, index: int) -> None: ...  # index: the row's number in the whole export

    def written(self) -> int: ...  # bytes in the file so far

    def buffered(self) -> int: ...  # bytes (estimated) held in memory, not written yet

    def flush(self) -> None: ...  # write what is buffered

    def close(self) -> None: ...  # write the rest and close: the file is whole

    def abort(self) -> None: ...  # close without finishing (the file is thrown away)


@dataclass(frozen=True)
class Layout:
    """What a format tells the rolling writer."""

    name: str  # parquet | webdataset (its file names: PATTERNS)
    file_name: Callable[[int], str]  # the file of number N
    open: Callable[[str], PartWriter]  # a writer for a new file at this (temporary) path
    item_size: Callable[[Item], int]  # about how many bytes a row adds to a file


@dataclass
class RollingCounts:
    """What the export holds (this call's work and that of the calls it resumes)."""

    written: int = 0  # rows in the export's files
    skipped_errors: int = 0  # error rows: no caption
    missing: int = 0  # the image could not be read again from the input
    files: int = 0  # files in the export
    new_files: int = 0  # of which this call wrote


@dataclass
class State:
    """The `_export_state.json` of an export folder."""

    format: str
    options: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)  # name, rows, bytes, shards (completed), end
    tail: list[str] = field(default_factory=list)  # shards completed after the last file (no rows to write)
    counts: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    version: int = STATE_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def _read_state(path: str) -> State | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return State(**{name: data[name] for name in ("format", "options", "files", "tail", "counts", "complete",
                                                      "version")})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise TargetError(f"{path} is not an export state this version reads ({err}); pass --overwrite to start "
                          "the export over") from None


def _local_folder(uri: str | None, options: dict[str, Any] | None) -> str | None:
    if not uri:
        return None
    fs, path = open_fs(uri, options)
    return os.path.realpath(path) if is_local(fs) else None


def _check_overlap(target_dir: str, path: str, output: Output, access: InputAccess | None) -> None:
    """Never write over the run's input or output, nor into the input (a later run would read the files)."""
    input_folder = _local_folder(output.input_uri, access.config.storage_options if access else None)
    for folder in (input_folder, _local_folder(output.uri, None)):
        if folder is not None and (folder == path or folder.startswith(path.rstrip("/") + "/")):
            raise TargetError(f"--to {target_dir} holds the run's input or output ({folder}); choose another folder")
    if input_folder is not None and path.startswith(input_folder.rstrip("/") + "/"):
        raise TargetError(f"--to {target_dir} lies inside the run's input ({input_folder}), where a later run "
                          "would take the export for new images; choose a folder outside it")


def _visible(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if not entry.name.startswith("."))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return "; ".join(f"{name} {old.get(name)!r} there, {new.get(name)!r} now" for name in changed)


def _own_files(root: str, layout_name: str) -> list[str]:
    """The files an export of `layout_name` may have left in `root`: its files and their temporaries."""
    pattern = PATTERNS.get(layout_name)
    if pattern is None:
        return []
    temporary = re.compile(rf"^\..*{pattern.pattern}$")
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False)
                      and (pattern.fullmatch(entry.name) or temporary.match(entry.name)))


def _remove(root: str, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, name))


def prepare(target_dir: str, layout: Layout, options: dict[str, Any], output: Output,
            access: InputAccess | None, overwrite: bool) -> tuple[str, State]:
    """The local folder to write and the state to go on from (a fresh one, or the interrupted export's)."""
    fs, path = open_fs(target_dir)
    if not is_local(fs):
        raise TargetError(f"--to {target_dir}: {layout.name} export writes a local folder (write it here, then "
                          "upload it, e.g. with `huggingface-cli upload` or `aws s3 sync`)")
    path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise TargetError(f"--to {target_dir} is a file; {layout.name} export writes a folder of files")
    _check_overlap(target_dir, path, output, access)
    try:
        state = _read_state(os.path.join(path, STATE)) if os.path.isdir(path) else None
    except TargetError:
        if not overwrite:
            raise
        _remove(path, [name for layout_name in PATTERNS for name in _own_files(path, layout_name)] + [STATE])
        state = None
    if state is not None:
        same = state.format == layout.name and state.options == options
        if same and not overwrite:
            _remove(path, [name for name in _own_files(path, layout.name)
                           if name not in {entry["name"] for entry in state.files}])
            return path, state
        if not overwrite:
            what = (f"a {state.format} export" if state.format != layout.name
                    else f"a {layout.name} export of other options ({_differences(state.options, options)})")
            raise TargetError(f"{target_dir} holds {what}; pass --overwrite to replace it, or choose another folder")
        _remove(path, [*_own_files(path, state.format), STATE])
    elif os.path.isdir(path) and _visible(path):
        raise TargetError(f"{target_dir} is not empty and holds no {STATE}, so it is not an export to resume or "
                          "replace; choose an empty or new folder")
    os.makedirs(path, exist_ok=True)
    state = State(layout.name, options)
    write_new(fs, os.path.join(path, STATE), state.to_json(), True)
    return path, state


@dataclass
class _Open:
    number: int
    name: str
    writer: PartWriter
    publish: contextlib.ExitStack
    rows: int = 0


class _Rolling:
    def __init__(self, output: Output, root: str, layout: Layout, state: State, target: int) -> None:
        self.output, self.root, self.layout, self.state, self.target = output, root, layout, state, target
        self.fs = open_fs(root)[0]
        known = {name: int(state.counts.get(name, 0)) for name in ("written", "skipped_errors", "missing")}
        self.counts = RollingCounts(**known, files=len(state.files))
        self.current: _Open | None = None
        self.done: list[str] = []  # shards completed since the last file was finished
        self.warn = Warnings(log)

    def work(self) -> list[tuple[str, int]]:
        """(shard, first position) still to export: where the last finished file stopped, then every committed
        shard that no finished file completed, in shard order."""
        covered = {shard for entry in self.state.files for shard in entry["shards"]} | set(self.state.tail)
        end = self.state.files[-1]["end"] if self.state.files else None
        todo = [(end["shard"], int(end["position"]))] if end and end["shard"] not in covered else []
        started = {shard for shard, _ in todo}
        return todo + [(shard, 0) for shard in self.output.shards if shard not in covered and shard not in started]

    def _open(self) -> _Open:
        number = len(self.state.files)
        name = self.layout.file_name(number)
        publish = contextlib.ExitStack()
        # Overwrite: a file of this name is ours (a run cut short between the rename and the state update).
        temporary = publish.enter_context(new_file(self.fs, os.path.join(self.root, name), True))
        try:
            writer = self.layout.open(temporary)
        except BaseException:
            publish.close()
            raise
        return _Open(number, name, writer, publish)

    def _finish(self, end: dict[str, Any] | None) -> None:
        current = self.current
        assert current is not None
        current.writer.close()
        current.publish.close()  # the rename
        self.current = None
        size = os.path.getsize(os.path.join(self.root, current.name))
        self.state.files.append({"name": current.name, "rows": current.rows, "bytes": size,
                                 "shards": self.done, "end": end})
        self.done = []
        self.counts.files += 1
        self.counts.new_files += 1
        self._save()

    def _save(self) -> None:
        self.state.counts = {"written": self.counts.written, "skipped_errors": self.counts.skipped_errors,
                             "missing": self.counts.missing}
        write_new(self.fs, os.path.join(self.root, STATE), self.state.to_json(), True)

    def _add(self, shard: str, item: Item) -> None:
        size = self.layout.item_size(item)
        current = self.current
        if current is not None and current.rows and \
                current.writer.written() + current.writer.buffered() + size > self.target:
            current.writer.flush()
            if current.writer.written() >= FULL * self.target:
                self._finish({"shard": shard, "position": item.position})
        if self.current is None:
            self.current = self._open()
        self.current.writer.add(item, self.counts.written)
        self.current.rows += 1
        self.counts.written += 1

    def run(self, columns: list[str] | None, access: InputAccess | None) -> RollingCounts:
        work = self.work()
        if work and self.state.complete:
            self.state.complete = False
            self._save()
        try:
            for shard, skip in work:
                for item in shard_items(self.output, shard, columns, access, skip):
                    if item.problem == "error":
                        self.counts.skipped_errors += 1
                    elif item.problem == "missing":
                        self.counts.missing += 1
                        self.warn("missing", item.row["key"], f"image not read again from the input ({item.reason})")
                    else:
                        self._add(shard, item)
                self.done.append(shard)
            if self.current is not None:
                self._finish(None)
        except BaseException as err:
            if self.current is not None:
                with contextlib.suppress(Exception):
                    self.current.writer.abort()
                self.current.publish.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
                self.current = None
            raise
        self.state.tail.extend(self.done)
        self.state.complete = True
        self._save()
        return self.counts


def export_rolling(output: Output, target_dir: str, layout: Layout, options: dict[str, Any], target_size: int,
                   columns: list[str] | None, access: InputAccess | None, overwrite: bool) -> RollingCounts:
    """Write (or go on writing) the export of `output` into `target_dir`; `options` are what a resumed export
    must share with the one it resumes."""
    options = {"output": output.uri, "fingerprint": output.manifest.get("fingerprint"), **options,
               "target_size": target_size}
    root, state = prepare(target_dir, layout, options, output, access, overwrite)
    return _Rolling(output, root, layout, state, target_size).run(columns, access)


def describe(counts: RollingCounts, target_dir: str, what: str) -> str:
    resumed = "" if counts.new_files == counts.files else f" ({counts.new_files} written by this call)"
    return (f"{counts.written} rows in {counts.files} {what}{resumed}, {counts.skipped_errors} skipped errors, "
            f"{counts.missing} missing in {target_dir}")
