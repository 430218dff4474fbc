"""Sidecar captions: one `.txt` per captioned image, one mode per line (the seed's dual-caption layout).

The extension may be another (`.caption` for kohya's sd-scripts), and `one_mode` writes one mode's caption
alone, on one line (kohya reads only a caption file's first line unless its `--enable_wildcard` is on).

Keys and sources come from the input (file names, tar members, list files) and are not trusted. A
key is cut down to plain path segments, and the resolved target (symlinks followed) must still lie
under the export root, or the row is refused with a warning: nothing is ever written outside it.
Like the seed's script, existing `.txt` files are kept unless `overwrite` is asked for, so an
export beside a dataset never clobbers captions a person wrote. A target that is a file is refused.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.captioning.images import IMAGE_EXTENSIONS
from pipeline.exports.table import Output, check_modes, open_output, shard_batches
from pipeline.exports.targets import check_folder_target
from pipeline.io.fs import is_local, open_fs, write_atomic

log = logging.getLogger("pipeline.exports.txt")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
_EXTENSION = re.compile(r"\.[\w-][\w.-]{0,31}")
WARNINGS_SHOWN = 20  # per export: a hostile input must not flood the log
WRITERS = 8  # files written at once (object stores are latency-bound)


@dataclass
class TxtCounts:
    """What an export did, row by row."""

    written: int = 0
    skipped_errors: int = 0  # error rows: no caption to write
    refused: int = 0  # the target would lie outside the root, or could not be named safely
    kept_existing: int = 0  # a .txt was already there and overwrite was off
    duplicates: int = 0  # another image of the same shard maps to the same .txt (a.jpg and a.png)
    failed: int = 0  # the write itself failed (name too long, permission, network)


def safe_segments(key: str) -> list[str]:
    """The key as relative path segments: backslashes are separators, `..`, `.` and empty parts go,
    and control characters (NUL included) become `_`."""
    cleaned = CONTROL_CHARACTERS.sub("_", key.replace("\\", "/"))
    return [segment for segment in cleaned.split("/") if segment not in ("", ".", "..")]


def txt_name(name: str, extension: str = ".txt") -> str:
    """`a.jpg` -> `a.txt`; a name without an image extension keeps it (`000001` -> `000001.txt`).
    `extension` replaces `.txt` (`.caption` for kohya's sd-scripts)."""
    stem, suffix = posixpath.splitext(name)
    return (stem if stem and suffix.lower() in IMAGE_EXTENSIONS else name) + extension


def check_extension(extension: str) -> str:
    """`--extension` as a suffix starting with a dot (`caption` -> `.caption`); refused when it is not a plain
    suffix, or an image extension (the sidecar would take an image's name, beside the images even its place)."""
    text = extension if extension.startswith(".") else "." + extension
    if not _EXTENSION.fullmatch(text) or ".." in text:
        raise ValueError(f"--extension {extension!r} is not a plain file extension like .txt or .caption")
    if text.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--extension {extension!r} is an image extension; sidecars would take images' names")
    return text


def one_line(text: str) -> str:
    """`text` on one line: each run of line boundaries, with the whitespace around it, becomes a space.

    The boundaries are whatever `str.splitlines` splits on (`\\r\\n`, `\\v`, `\\f`, `\\x1c`-`\\x1e`, U+0085,
    U+2028, U+2029 besides `\\n` and `\\r`), so a reader splitting the file with it, or with anything
    narrower, finds exactly one line per mode."""
    return " ".join(stripped for line in text.splitlines() if (stripped := line.strip()))


def sidecar_text(row: dict[str, Any], modes: list[str]) -> str:
    """One line per mode in order; line breaks inside a caption become spaces, a missing caption an
    empty line (line N is always mode N)."""
    return "".join(one_line(row.get(mode) or "") + "\n" for mode in modes)


class Confinement:
    """A root folder and the check that keeps every target inside it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.local = fs, is_local(fs)
        self.root = os.path.realpath(root) if self.local else posixpath.normpath(root)

    def resolve(self, path: str) -> str | None:
        """`path` with symlinks and `..` resolved, or None when that lands outside the root."""
        try:
            resolved = os.path.realpath(path) if self.local else posixpath.normpath(path)
        except (OSError, ValueError):  # NUL bytes, symlink loops
            return None
        inside = resolved != self.root and resolved.startswith(self.root.rstrip("/") + "/")
        return resolved if inside else None


class _Refusals:
    """Counts refusals and logs the first few with their reason."""

    def __init__(self, counts: TxtCounts) -> None:
        self.counts = counts

    def __call__(self, key: str, reason: str) -> None:
        self.counts.refused += 1
        if self.counts.refused <= WARNINGS_SHOWN:
            log.warning("refused %r: %s", key, reason)
        elif self.counts.refused == WARNINGS_SHOWN + 1:
            log.warning("more rows refused; the count is in the export result")


def _target_in(confinement: Confinement, key: str, extension: str) -> tuple[str | None, str]:
    segments = safe_segments(key)
    if not segments:
        return None, "key has no usable path segment"
    segments[-1] = txt_name(segments[-1], extension)
    target = confinement.resolve(posixpath.join(confinement.root, *segments))
    return target, "" if target else "target resolves outside the export folder"


def _target_beside(confinement: Confinement, row: dict[str, Any], extension: str) -> tuple[str | None, str]:
    source = row.get("source")
    if row.get("member") is not None or not source:
        return None, "image is inside an archive or table, not a file of the input folder"
    if fsspec.core.split_protocol(source)[0] not in (None, "file", "local"):
        return None, "source is not a local file"
    try:
        path = posixpath.normpath(open_fs(source)[1])
    except (ValueError, OSError) as err:
        return None, f"source is not a usable path: {err}"
    directory, name = posixpath.split(path)
    if not name:
        return None, "source names no file"
    target = confinement.resolve(posixpath.join(directory, txt_name(name, extension)))
    return target, "" if target else "source lies outside the input folder"


def _write_one(fs: fsspec.AbstractFileSystem, path: str, data: bytes, overwrite: bool) -> str:
    try:
        if not overwrite and fs.exists(path):
            return "kept_existing"
        write_atomic(fs, path, data)
    except OSError as err:
        log.warning("could not write %s: %s", path, err)
        return "failed"
    return "written"


def _jobs(output: Output, modes: list[str], confinement: Confinement, beside_images: bool,
          counts: TxtCounts, extension: str) -> Iterator[tuple[str, bytes]]:
    refuse = _Refusals(counts)
    columns = ["key", "source", "member", "status", *modes]
    for shard in output.shards:
        seen: set[str] = set()  # per shard: bounded memory, and a.jpg/a.png sit in the same shard
        for batch in shard_batches(output, shard, columns):
            for row in batch.to_pylist():
                if row["status"] != "ok":
                    counts.skipped_errors += 1
                    continue
                if beside_images:
                    target, reason = _target_beside(confinement, row, extension)
                else:
                    target, reason = _target_in(confinement, row["key"], extension)
                if target is None:
                    refuse(row["key"], reason)
                elif target in seen:
                    counts.duplicates += 1
                    log.warning("%r maps to %s, already written for another image; skipped", row["key"], target)
                else:
                    seen.add(target)
                    yield target, sidecar_text(row, modes).encode("utf-8")


def _input_root(output: Output) -> Confinement:
    uri = output.input_uri
    if uri:
        fs, root = open_fs(uri)
        if is_local(fs) and os.path.isdir(root):
            return Confinement(fs, root)
    raise ValueError(f"beside_images needs a local folder input; this run's input.uri is {uri!r}")


def export_txt(output_uri: str, target_dir: str | None, modes: list[str] | None = None,
               storage_options: dict[str, Any] | None = None, *, beside_images: bool = False,
               overwrite: bool = False, extension: str = ".txt", one_mode: str | None = None) -> TxtCounts:
    """Write `<key without image extension>.txt` under `target_dir` for every ok row (or, with
    `beside_images`, next to each source image of a local folder input) and count what happened.
    `extension` replaces `.txt`; `one_mode` writes that mode's caption alone, on one line."""
    extension = check_extension(extension)
    if one_mode is not None and modes is not None:
        raise ValueError("give --modes (one line per mode) or --one-mode (one mode, one line), not both")
    output = open_output(output_uri, storage_options)
    if one_mode is not None and one_mode not in output.mode_names:
        raise ValueError(f"--one-mode {one_mode!r} is not a mode of this output; it has {output.mode_names}")
    modes = check_modes(output, [one_mode] if one_mode is not None else modes)
    if beside_images:
        confinement = _input_root(output)
    elif target_dir:
        target_fs, root = open_fs(target_dir, storage_options)
        check_folder_target(target_dir, target_fs, root, "txt export")
        if is_local(target_fs):
            os.makedirs(root, exist_ok=True)
        confinement = Confinement(target_fs, root)
    else:
        raise ValueError("give a target folder, or beside_images=True")
    counts = TxtCounts()
    with ThreadPoolExecutor(WRITERS) as pool:
        window: list[Future[str]] = []
        for path, data in _jobs(output, modes, confinement, beside_images, counts, extension):
            window.append(pool.submit(_write_one, confinement.fs, path, data, overwrite))
            if len(window) >= 4 * WRITERS:
                _drain(window, counts)
        _drain(window, counts)
    return counts


def _drain(window: list[Future[str]], counts: TxtCounts) -> None:
    for future in window:
        outcome = future.result()
        setattr(counts, outcome, getattr(counts, outcome) + 1)
    window.clear()
